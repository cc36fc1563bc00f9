"""The framework-free training-loop helper: Evaluator returns, as flat metric names, what direct
evaluate_model calls return; from_torch makes the user's torch datasets score like the registered ones."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import sslbench
from sslbench.errors import SSLBenchError
from sslbench.training import Evaluator, from_torch

from conftest import REPO, run_torchrun

PROTOCOL = {"epochs": 3, "seeds": 2, "batch_size": 128}


def to_tensor(sample) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0)[None]


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())


class DigitPairs(torch.utils.data.Dataset):
    """(uint8 image, label) pairs of scikit-learn's digits, split as the registered dataset is (every
    fourth sample to val), written here from scikit-learn's arrays, not from sslbench's loader."""

    def __init__(self, split: str) -> None:
        digits = load_digits()
        keep = (np.arange(len(digits.target)) % 4 == 3) == (split == "val")
        self.images = np.rint(digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.labels = digits.target[keep]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class DigitPairsWithTargets(DigitPairs):
    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


def test_flat_metrics_are_the_results_means_and_probe_values(plugins):
    model = encoder()
    probes = [{"id": "knn", "options": {"k": [5, 10]}}]
    evaluator = Evaluator(["digits"], transform=to_tensor, probes=probes, plugins=plugins, **PROTOCOL)
    metrics = evaluator.evaluate(model)
    direct = sslbench.evaluate_model(model, "digits", transform=to_tensor, probes=probes, plugins=plugins, **PROTOCOL)
    (row,) = direct.summary
    (knn,) = direct.probes
    expected = {
        f"sslbench/digits/{name}": float(np.mean([run.metrics[name] for run in direct.runs])) for name in ("acc", "nmi")
    }
    expected |= {f"sslbench/digits/knn_top1_k{k}": knn.metrics[f"knn_top1_k{k}"] for k in (5, 10)}
    assert {name: metrics[name] for name in expected} == pytest.approx(expected, abs=1e-15)
    clustering = {name for name in row.metrics if not name.startswith("knn")}
    assert set(metrics) == {f"sslbench/digits/{name}" for name in clustering} | {
        "sslbench/digits/knn_top1_k5",
        "sslbench/digits/knn_top1_k10",
    }
    assert evaluator.results["digits"].summary[0].metrics == row.metrics


def test_a_sweep_names_each_point_and_logs_probes_once(plugins):
    evaluator = Evaluator(
        [{"dataset": "digits", "log_name": "d"}],
        transform=to_tensor,
        overcluster=[1.0, 1.5],
        probes=[{"id": "knn", "options": {"k": [5]}}],
        plugins=plugins,
        **PROTOCOL,
    )
    metrics = evaluator.evaluate(encoder())
    rows = evaluator.results["d"].summary
    assert [row.protocol.n_clusters for row in rows] == [10, 15]
    dims = rows[0].protocol.pca_dims
    assert metrics[f"sslbench/d/acc@overcluster=1,pca={dims}"] == rows[0].metrics["acc"].mean
    assert metrics[f"sslbench/d/acc@overcluster=1.5,pca={dims}"] == rows[1].metrics["acc"].mean
    assert [name for name in metrics if "knn" in name] == ["sslbench/d/knn_top1_k5"]


@pytest.mark.parametrize("pairs", [DigitPairs, DigitPairsWithTargets])
def test_torch_datasets_score_as_the_registered_dataset(plugins, pairs):
    mine = from_torch("my_digits", {"train": pairs("train"), "val": pairs("val")})
    assert mine.num_classes == 10 and len(mine.splits["train"]) == 1348
    model = encoder()
    evaluator = Evaluator([mine, "digits"], transform=to_tensor, plugins=plugins, **PROTOCOL)
    metrics = evaluator.evaluate(model)
    assert evaluator.results["my_digits"].runs[0].n_eval == 449
    ours = {name.split("/")[-1]: value for name, value in metrics.items() if name.startswith("sslbench/my_digits/")}
    registered = {name.split("/")[-1]: value for name, value in metrics.items() if name.startswith("sslbench/digits/")}
    assert ours == registered and len(ours) >= 8


def test_due_every_nth_epoch_and_nothing_in_between(plugins):
    evaluator = Evaluator(["digits"], every=3, transform=to_tensor, plugins=plugins, **PROTOCOL)
    assert [index for index in range(10) if evaluator.due(index)] == [2, 5, 8]
    assert evaluator.maybe_evaluate(encoder(), 1) == {} and evaluator.results == {}
    assert "sslbench/digits/acc" in evaluator.maybe_evaluate(encoder(), 2)


def test_bad_arguments_fail_when_the_evaluator_is_made(plugins):
    cases = [
        (["digitz"], {}, "digitz"),
        ([{"dataset": "fashion_mnist", "dataset_options": {"limit": 0}}], {}, r"datasets\[0\]\.dataset_options\.limit"),
        (["digits", "digits"], {}, "two datasets are logged as 'digits'"),
        ([{"dataset": "digits", "log_name": "a/b"}], {}, "log_name must be a non-empty name without '/'"),
        ([{"dataset": "digits", "transfrom": None}], {}, "unknown key 'transfrom'"),
        ([torch.utils.data.TensorDataset(torch.zeros(2))], {}, "a torch Dataset has no train/eval splits; wrap it"),
        (["digits"], {"epoch": 3}, "unknown keyword 'epoch'"),
        (["digits"], {"every": 0}, "every must be a positive integer"),
        ("digits", {}, "datasets must be a non-empty list"),
    ]
    for datasets, keywords, message in cases:
        with pytest.raises(SSLBenchError, match=message):
            Evaluator(datasets, plugins=plugins, **keywords)


def test_from_torch_checks_labels():
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(SSLBenchError, match="non-negative"):
        from_torch("x", {"train": torch.utils.data.TensorDataset(images, torch.tensor([0, 1, -1, 0]))})
    with pytest.raises(SSLBenchError, match="label 3 but num_classes is 2"):
        from_torch("x", {"train": torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 3, 0]))}, num_classes=2)


EXAMPLE = REPO / "examples" / "ddp_training_loop.py"


def _example_module():
    spec = importlib.util.spec_from_file_location("ddp_training_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_ddp_loop_example_logs_the_single_process_numbers(tmp_path, plugins):
    """examples/ddp_training_loop.py under torchrun (2 CPU processes, gloo): both ranks get the metrics a
    single process computes with the trained weights, to the last digit."""
    proc = run_torchrun(str(EXAMPLE), str(tmp_path), cwd=tmp_path, port=29517)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("epoch ") == 3  # rank 0 printed after each of the three epochs
    example = _example_module()
    model = example.make_encoder()
    model.load_state_dict(torch.load(tmp_path / "encoder.pt"))
    direct = sslbench.evaluate_model(model, "digits", transform=example.to_tensor, plugins=plugins, **example.PROTOCOL)
    (knn,) = direct.probes
    expected = {f"sslbench/digits/{name}": s.mean for name, s in direct.summary[0].metrics.items()}
    expected |= {f"sslbench/digits/{name}": value for name, value in knn.metrics.items()}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"metrics_rank{rank}.json").read_text()) == expected, rank


def test_the_callback_module_without_lightning_is_one_line(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")] + ["sslbench.lightning"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "lightning", None)  # what Python does for a package that is not installed
    with pytest.raises(
        SSLBenchError, match=r"^sslbench\.lightning needs PyTorch Lightning: pip install 'sslbench\[lightning\]'$"
    ):
        importlib.import_module("sslbench.lightning")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("same", "ok"),  # NaN on both ranks counts as the same
        ("value", "sslbench/d/acc is 0.5 on rank 0 but 0.5000000000009095 on rank 1"),
        ("names", "rank 1 computed other metrics than rank 0"),
        ("alone", "ok"),  # one rank evaluating alone waits for no other
    ],
)
def test_ranks_that_disagree_raise_on_every_rank(tmp_path, case, message):
    worker = REPO / "tests" / "rank_agreement_worker.py"
    proc = run_torchrun(str(worker), str(tmp_path), case, cwd=tmp_path, port=29531)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert message in (tmp_path / "rank0.txt").read_text()
    assert (
        (tmp_path / "rank1.txt").read_text() != "ok"
        if case not in ("same", "alone")
        else (tmp_path / "rank1.txt").read_text() == "ok"
    )
