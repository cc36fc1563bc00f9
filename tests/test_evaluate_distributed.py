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

import sslbench

from conftest import run_torchrun
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
def test_every_rank_embeds_with_rank_0s_buffers_and_keeps_its_own(ranks_out):
    """Ranks whose BatchNorm statistics differ (each rank's last DDP forward updates its own) embed with
    rank 0's, so the results above equal one process's with rank 0's model; each gets its own back."""
    _world, records = ranks_out
    assert all(record["kept_own_statistics"] for record in records)


@pytest.mark.slow
def test_ranks_holding_different_weights_are_refused_on_every_rank(ranks_out):
    _world, records = ranks_out
    expected = (
        "evaluate_model: rank 1's parameter 'encoder.head.bias' differs from rank 0's; every rank must hold "
        "the same weights (each embeds its shard of the images with its own copy)"
    )
    assert [record["mismatch"] for record in records] == [expected] * len(records)


@pytest.mark.slow
def test_rank_0_alone_evaluates_in_one_process_when_told(ranks_out):
    """``ranks=ONE_PROCESS``: the other ranks of the initialised group take no part, and rank 0 gets the
    one-process results."""
    _world, records = ranks_out
    np.testing.assert_equal(records[0]["rank_0_alone"], records[0]["one_process"]["digits"])


@pytest.mark.slow
def test_a_refusal_on_rank_0_is_raised_on_every_rank(ranks_out):
    """Rank 0 alone clusters: what it refuses reaches every rank (none waits forever), in one process's words."""
    _world, records = ranks_out
    expected = records[0]["one_process_refused"]
    assert "fewer than the 5000 clusters" in expected
    assert [r["refused"] for r in records] == [expected] * len(records)


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
