"""One path: ``sslbench run``, evaluate_features and evaluate_model take the protocol's defaults from one
place and record the splits they fitted and scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import sslbench
from sslbench.errors import SSLBenchError
from sslbench.interfaces import Dataset
from sslbench.runner import run_spec
from sslbench.spec import ProtocolSpec, parse_spec, resolve_spec
from sslbench_plugins.datasets import ArraySplit

from conftest import blobs

PROTOCOL = {"epochs": 3, "seeds": 2, "probes": [{"id": "knn", "options": {"k": [5]}}]}


def test_the_api_takes_the_protocol_defaults_of_a_spec(plugins):
    """Left unsaid, every protocol parameter is a spec's default: one place sets them."""
    x, y = blobs(30, 3, 4, seed=1)
    results = sslbench.evaluate_features(x[:60], y[:60], x[60:], y[60:], device="cpu", plugins=plugins)
    assert results.spec is not None and results.spec["protocol"] == ProtocolSpec().model_dump(mode="json")
    assert {r.protocol.epochs for r in results.runs} == {60} and [r.seed for r in results.runs] == [0, 1, 2, 3, 4]


def _train_test() -> Dataset:
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    features = (rng.normal(size=(3, 8)) * 4)[labels] + rng.normal(size=(120, 8))
    images = features.astype(np.float32)[:, None, :, None].repeat(8, axis=3)  # (n, 1, 8, 8)
    split = {"train": slice(0, 90), "test": slice(90, 120)}
    return Dataset(
        "train_test",
        ["a", "b", "c"],
        {name: ArraySplit(images[rows], labels[rows], as_image=False) for name, rows in split.items()},
    )


def test_every_run_of_a_train_test_dataset_records_the_split_it_scored(tmp_path, plugins):
    """evaluate_model scores ``test`` when there is no ``val``: its runs, probe records, spec and the
    reports' caption say ``test``; an explicit eval_split is recorded as given; ``sslbench run`` on the
    same rows (a features dataset with train/test splits) records ``test`` too."""
    data = _train_test()
    model = nn.Flatten()
    found = sslbench.evaluate_model(
        model, data, transform=torch.from_numpy, scratch_dir=tmp_path, plugins=plugins, **PROTOCOL
    )
    on_train = sslbench.evaluate_model(
        model, data, transform=torch.from_numpy, eval_split="train", scratch_dir=tmp_path, plugins=plugins, **PROTOCOL
    )
    for results, scored, n_eval in ((found, "test", 30), (on_train, "train", 90)):
        assert {(r.protocol.fit_split, r.protocol.eval_split, r.n_eval) for r in results.runs} == {
            ("train", scored, n_eval)
        }
        assert {(p.fit_split, p.eval_split) for p in results.probes} == {("train", scored)}
        assert results.spec is not None and results.spec["eval_split"] == scored
        assert f"scored on {scored}" in plugins.reporters.get("md").reporter.render(results)
    for name in ("train", "test"):
        split = data.splits[name]
        np.save(tmp_path / f"{name}_x.npy", split.as_array().reshape(len(split), -1))
        np.save(tmp_path / f"{name}_y.npy", split.labels)
    spec = f"""\
models: [{{id: raw}}]
datasets:
  - id: features
    eval_split: test
    options: {{splits: {{train: {{features: {tmp_path}/train_x.npy, labels: {tmp_path}/train_y.npy}},
                        test: {{features: {tmp_path}/test_x.npy, labels: {tmp_path}/test_y.npy}}}}}}
protocol: {{epochs: 3, seeds: 2}}
cache_dir: {tmp_path}/cache
device: cpu
"""
    ran = run_spec(resolve_spec(parse_spec(spec), plugins), plugins, out_dir=tmp_path / "out")
    assert {(r.protocol.eval_split, r.n_eval) for r in ran.runs} == {("test", 30)}
    # The same rows, the same protocol: the API and the CLI's path give the same numbers.
    assert [r.metrics for r in ran.runs] == [r.metrics for r in found.runs]


@pytest.mark.parametrize(
    ("option", "value", "spec_says"),
    [
        ("cpu_memory_format", "nchw", "Input should be 'auto', 'channels_last' or 'contiguous'"),
        ("batch_size", 0, "Input should be greater than or equal to 1"),
        ("workers", -1, "Input should be greater than or equal to 0"),
    ],
)
def test_evaluate_model_validates_extraction_options_as_a_spec_does(plugins, option, value, spec_says):
    """evaluate_model's extraction options go through the spec's model: the spec's rule and words."""
    from sslbench.spec import ExtractionSpec

    with pytest.raises(ValidationError) as by_spec:
        ExtractionSpec.model_validate({option: value})
    assert by_spec.value.errors()[0]["msg"].startswith(spec_says)
    with pytest.raises(SSLBenchError) as refused:
        sslbench.evaluate_model(nn.Flatten(), "digits", plugins=plugins, **{option: value})
    assert str(refused.value) == f"evaluate_model: {option}: {by_spec.value.errors()[0]['msg']} (got {value!r})"


class _CountingFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return x.flatten(1)


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ({"seed": 3}, "evaluate_model: unknown keyword 'seed' (did you mean 'seeds'?)"),
        ({"epochs": 0}, "evaluate_model: epochs: Input should be greater than or equal to 1 (got 0)"),
        ({"preset": "mteb"}, "evaluate_model: preset: Value error, unknown preset 'mteb' (did you mean 'mieb'?)"),
    ],
)
def test_evaluate_model_refuses_a_protocol_before_embedding_anything(plugins, protocol, expected):
    model = _CountingFlatten()
    with pytest.raises(SSLBenchError) as refused:
        sslbench.evaluate_model(model, "digits", plugins=plugins, **protocol)
    assert str(refused.value).startswith(expected) and model.rows == 0


@pytest.mark.slow
def test_a_first_evaluate_model_in_a_fresh_process_leaves_pythons_random_numbers(tmp_path):
    """Loading plugins, datasets and scikit-learn for the first time may draw Python's random numbers:
    the state is captured before any of it, so a training's next draw is the one it would have made."""
    import subprocess
    import sys

    script = tmp_path / "first_call.py"
    script.write_text(
        "import random\n"
        "import numpy as np, torch\n"
        "import sslbench\n"
        "random.seed(1); expected = random.random(); random.seed(1)\n"
        "sslbench.evaluate_model(torch.nn.Flatten(), 'digits', transform=lambda s: torch.from_numpy("
        "np.asarray(s, dtype=np.float32))[None], seeds=1, epochs=1, scratch_dir=" + repr(str(tmp_path)) + ")\n"
        "print(random.random() == expected)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"
