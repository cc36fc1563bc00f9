"""evaluate_model inside a training: under torch.distributed (CPU gloo, 2 and 3 processes) each rank
embeds a contiguous shard of every split and every rank returns the one-process Results; and an
evaluation changes nothing the training reads (modes, buffers, random states, threads, autocast)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed_evaluate_worker import (
    PROTOCOL,
    VAL_OFFSET,
    Counting,
    Encoder,
    digits_tensor,
    indexed_blobs,
    seed_everything,
    train,
)
from torch import nn

import sslbench
from sslbench.interfaces import Dataset
from sslbench.runner import run_spec
from sslbench.spec import parse_spec, resolve_spec
from sslbench_plugins.datasets import ArraySplit

from conftest import run_torchrun

WORKER = Path(__file__).with_name("distributed_evaluate_worker.py")
DIGITS_ROWS = {"train": 1348, "val": 449}


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks_out(request, tmp_path_factory) -> tuple[int, list[dict[str, Any]]]:
    """Every rank's record of the worker run on ``world`` gloo processes."""
    world = request.param
    folder = tmp_path_factory.mktemp(f"world{world}")
    proc = run_torchrun(str(WORKER), str(folder), cwd=folder, port=29640 + world, processes=world)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return world, [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_every_rank_returns_the_one_process_results(ranks_out):
    _world, records = ranks_out
    reference = records[0]["one_process"]
    for rank, record in enumerate(records):
        for name in ("digits", "indexed"):
            # To the last digit (NaN-aware: a 2-sample eval split scores what it can).
            np.testing.assert_equal(record["results"][name], reference[name], err_msg=f"rank {rank} {name}")
    assert len(reference["digits"]["runs"]) == 2 and reference["digits"]["probes"][0]["knn_top1_k5"] > 0.5


@pytest.mark.slow
def test_each_rank_embeds_a_contiguous_shard_once(ranks_out):
    """No padding, no duplicates: the ranks' rows add up to the splits' sizes; the 1,001 + 2 indexed
    samples come out as one contiguous run of indices per rank and split, in rank order, covering each
    split once (the 2-sample split is smaller than 3 ranks: some ranks embed none of it)."""
    world, records = ranks_out
    indexed = indexed_blobs()
    sizes = {name: len(split) for name, split in indexed.splits.items()}
    assert sum(r["rows"] for r in records) == sum(DIGITS_ROWS.values()) + sum(sizes.values())
    for name, offset in (("train", 0), ("val", VAL_OFFSET)):
        parts = [[i - offset for i in r["indices"] if (i >= VAL_OFFSET) == (offset > 0)] for r in records]
        for part in parts:  # each rank: one contiguous run of samples
            assert part == list(range(part[0], part[0] + len(part))) if part else True, (name, parts)
        assert [i for part in parts for i in part] == list(range(sizes[name])), name  # in rank order, once
        if name == "val" and world == 3:
            assert sum(1 for part in parts if part) < world  # a split smaller than the world


def _digits_train(evaluate: bool, scratch: Path) -> list[float]:
    seed_everything(1)
    return train(Encoder(), 3, evaluate, scratch)


def test_training_with_evaluations_ends_with_the_same_weights(tmp_path):
    """BatchNorm statistics, Dropout's and the shuffles' random numbers: three epochs with an evaluation
    after each end bit for bit where three epochs without do."""
    # The first training of a process on several threads differs from later ones in the last bits
    # (measured: identical from the second on, and always on one thread), evaluation or not.
    _digits_train(False, tmp_path)
    assert _digits_train(True, tmp_path) == _digits_train(False, tmp_path)


@pytest.mark.slow
def test_ddp_training_with_evaluations_ends_with_the_same_weights(ranks_out):
    world, records = ranks_out
    if world != 2:
        pytest.skip("the DDP training runs on 2 ranks")
    for record in records:
        assert record["weights"]["True"] == record["weights"]["False"]
    assert records[0]["weights"]["True"] == records[1]["weights"]["True"]  # DDP kept the ranks equal


def test_an_evaluation_leaves_every_state_a_training_reads(tmp_path):
    model = Counting(Encoder())
    model.train()
    model.encoder.norm.eval()  # a frozen BatchNorm inside a training model stays frozen
    model.encoder.head.weight.requires_grad_(False)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if threads > 1 else 1)

    def state() -> dict[str, Any]:
        return {
            "modes": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "python": random.getstate(),
            "numpy": np.random.get_state()[1].tolist(),
            "torch": torch.get_rng_state(),
            "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
            "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
            "grad": torch.is_grad_enabled(),
        }

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            before = state()
            sslbench.evaluate_model(model, "digits", transform=digits_tensor, scratch_dir=tmp_path, **PROTOCOL)
            after = state()
    finally:
        torch.set_num_threads(threads)
    assert before["modes"] == after["modes"] and before["modes"][3:5] == [False, True]  # norm eval, drop train
    assert before["requires_grad"] == after["requires_grad"]
    assert all(torch.equal(before["weights"][k], after["weights"][k]) for k in before["weights"])
    assert before["python"] == after["python"] and before["numpy"] == after["numpy"]
    assert torch.equal(before["torch"], after["torch"])
    assert before["threads"] == after["threads"] and before["autocast"] == after["autocast"]
    assert before["grad"] == after["grad"]
    assert model.rows == sum(DIGITS_ROWS.values())  # it did embed every sample


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
