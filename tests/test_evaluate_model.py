"""A model in memory: evaluate_model extracts, clusters and scores exactly as `sslbench run` does, and
can be called from a training loop without disturbing the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sslbench
from sslbench.errors import SSLBenchError
from sslbench.runner import run_spec
from sslbench.spec import parse_spec, resolve_spec
from sslbench_plugins.basic_backbones import RandomCNN, RandomCNNOptions

SPEC = """\
models: [{{id: random_cnn, options: {{image_size: 16, width: 4}}}}]
datasets: [{{id: digits}}]
protocol: {{epochs: 3, seeds: 2, overcluster: [1.0, 1.5]}}
extraction: {{workers: 0, batch_size: 64}}
cache_dir: {cache}
device: cpu
"""


def test_same_numbers_as_sslbench_run_for_the_same_network(tmp_path, plugins):
    """The built-in random CNN handed over as a plain module and transform gives the run's numbers."""
    results = run_spec(
        resolve_spec(parse_spec(SPEC.format(cache=tmp_path / "cache")), plugins), plugins, out_dir=tmp_path / "out"
    )
    cnn = RandomCNN(RandomCNNOptions(image_size=16, width=4))
    mine = sslbench.evaluate_model(
        cnn.net,
        "digits",
        transform=cnn.preprocess,
        batch_size=64,
        epochs=3,
        seeds=2,
        overcluster=[1.0, 1.5],
        device="cpu",
        plugins=plugins,
        scratch_dir=tmp_path / "scratch",
    )
    assert [r.metrics for r in mine.runs] == [r.metrics for r in results.runs]
    assert mine.spec is not None and mine.spec["api"] == "evaluate_model" and mine.spec["eval_split"] == "val"


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)  # behaves differently in train and eval mode
        self.head = nn.Linear(8 * 4 * 4, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 4).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _to_tensor(sample) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0)[None]


def test_called_every_epoch_of_a_training_loop(tmp_path, plugins):
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(digits.target)
    encoder = TinyEncoder()
    classifier = nn.Linear(8 * 4 * 4, 10)
    optimiser = torch.optim.SGD([*encoder.parameters(), *classifier.parameters()], lr=0.5)
    accuracy = []
    for epoch in range(3):
        encoder.train()
        for start in range(0, len(x), 128):
            loss = nn.functional.cross_entropy(classifier(encoder(x[start : start + 128])), y[start : start + 128])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        before = {k: v.clone() for k, v in encoder.state_dict().items()}
        results = sslbench.evaluate_model(
            encoder, "digits", transform=_to_tensor, epochs=5, seeds=1, plugins=plugins, scratch_dir=tmp_path
        )
        # The model is back in training mode, and evaluation changed nothing in it (BatchNorm's
        # running statistics included: it ran in eval mode).
        assert encoder.training
        after = encoder.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), epoch
        accuracy.append(results.summary[0].metrics["acc"].mean)
        assert results.runs[0].n_train == 1348 and results.runs[0].n_eval == 449
    assert accuracy[-1] > 0.5  # supervised training makes the features cluster well
    assert len(set(accuracy)) > 1  # each call sees the model as it is now
    assert list(tmp_path.rglob("*.npy")) == []  # the features were not kept


def test_a_model_returning_the_wrong_shape_is_one_line(plugins):
    with pytest.raises(SSLBenchError, match=r"must return \(batch, dims\) features, got \(4, 1, 8, 8\)"):
        sslbench.evaluate_model(lambda batch: batch, "digits", transform=_to_tensor, batch_size=4, plugins=plugins)


def test_unknown_split_and_bad_options_are_one_line(plugins):
    with pytest.raises(SSLBenchError, match="has no split 'nope'; it has: train, val"):
        sslbench.evaluate_model(nn.Identity(), "digits", fit_split="nope", plugins=plugins)
    with pytest.raises(SSLBenchError, match=r"dataset_options\.limit"):
        sslbench.evaluate_model(nn.Identity(), "fashion_mnist", dataset_options={"limit": 0}, plugins=plugins)
