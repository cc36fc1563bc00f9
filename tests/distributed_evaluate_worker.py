"""Run by ``torchrun --nproc_per_node N``: evaluate_model on every rank of a gloo group, then (the group
gone) the same call in one process; with 2 ranks also a DDP training with and without evaluations.

Each rank writes ``rank<r>.json`` into the output folder: the Results it got, the rows its model
embedded, the message of a call rank 0 refuses, the one-process Results and refusal and the Results of
a call on rank 0 alone inside the group (rank 0), and
(2 ranks) the weights after both trainings.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import sslbench
from sslbench.errors import SSLBenchError
from sslbench.interfaces import Dataset
from sslbench.ranks import ONE_PROCESS
from sslbench.results import Results
from sslbench_plugins.datasets import ArraySplit

#: A protocol small enough for a test: two seeds, a few epochs, a kNN probe.
PROTOCOL: dict[str, Any] = {"epochs": 3, "seeds": 2, "probes": [{"id": "knn", "options": {"k": [5]}}]}


class Encoder(nn.Module):
    """A small network with what an evaluation could disturb: BatchNorm statistics and Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(6 * 4 * 4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(self.conv(x))), 4).flatten(1)
        return self.head(self.drop(pooled))


class Counting(nn.Module):
    """The encoder, counting the rows it embeds; inputs with a second channel carry each sample's
    index there, which it records (and strips)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.rows = 0
        self.indices: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        if x.shape[1] == 2:
            self.indices += x[:, 1, 0, 0].round().long().tolist()
            x = x[:, :1]
        return self.encoder(x)


def digits_tensor(sample: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample, dtype=np.float32) / 255.0)[None]


def indexed_tensor(sample: Any) -> torch.Tensor:
    return torch.from_numpy(np.asarray(sample, dtype=np.float32))


#: Added to the index a val sample carries, to tell the splits apart.
VAL_OFFSET = 100_000


def indexed_blobs(n_train: int = 1001, n_val: int = 2) -> Dataset:
    """3 classes of noisy 8×8 patterns; channel 1 of sample i holds i (train) or VAL_OFFSET + i (val)."""
    rng = np.random.default_rng(5)
    patterns = rng.normal(size=(3, 8, 8)).astype(np.float32)

    def split(n: int, offset: int) -> ArraySplit:
        labels = np.arange(n, dtype=np.int64) % 3
        images = patterns[labels] + 0.5 * rng.normal(size=(n, 8, 8)).astype(np.float32)
        index = np.broadcast_to(np.arange(offset, offset + n, dtype=np.float32)[:, None, None], (n, 8, 8))
        return ArraySplit(np.stack([images, index], axis=1), labels, as_image=False)

    return Dataset("indexed", ["a", "b", "c"], {"train": split(n_train, 0), "val": split(n_val, VAL_OFFSET)})


def evaluations(model: nn.Module, scratch: Path) -> dict[str, Results]:
    return {
        "digits": sslbench.evaluate_model(
            model, "digits", transform=digits_tensor, batch_size=100, scratch_dir=scratch, **PROTOCOL
        ),
        "indexed": sslbench.evaluate_model(
            model, indexed_blobs(), transform=indexed_tensor, batch_size=50, scratch_dir=scratch, **PROTOCOL
        ),
    }


def refusal(model: nn.Module, scratch: Path) -> str:
    """The message of a call that rank 0 refuses after the extraction (more clusters than samples)."""
    try:
        sslbench.evaluate_model(model, "digits", transform=digits_tensor, scratch_dir=scratch, n_clusters=5000)
    except SSLBenchError as exc:
        return str(exc)
    raise AssertionError("5,000 clusters of 1,348 samples were not refused")


def mismatch(model: Counting, scratch: Path, rank: int) -> str:
    """The message of a call whose ranks hold different weights (rank r's head bias moved by r)."""
    other = Counting(Encoder())
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.encoder.head.bias += rank
    try:
        sslbench.evaluate_model(other, "digits", transform=digits_tensor, scratch_dir=scratch, **PROTOCOL)
    except SSLBenchError as exc:
        return str(exc)
    return "not refused"


def comparable(results: Results) -> dict[str, Any]:
    """What must be equal between ranks and with one process: every number, not the timings."""
    return {
        "runs": [{"protocol": r.protocol.model_dump(mode="json"), "metrics": r.metrics} for r in results.runs],
        "probes": [p.metrics for p in results.probes],
        "summary": [{n: [m.mean, m.std] for n, m in row.metrics.items()} for row in results.summary],
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model: nn.Module, epochs: int, evaluate: bool, scratch: Path) -> list[float]:
    """A few epochs of a supervised fit on digits (shuffled by NumPy, Python and torch: every random
    state the evaluation must leave alone is read), evaluating between epochs when asked; its weights."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(digits.target)
    classifier = nn.Linear(12, 10)
    optimiser = torch.optim.SGD([*model.parameters(), *classifier.parameters()], lr=0.1)
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(np.random.permutation(len(x)))[torch.randperm(len(x))]
        start = random.randrange(64)
        for at in range(start, len(x) - 64, 64):
            rows = order[at : at + 64]
            loss = nn.functional.cross_entropy(classifier(model(x[rows])), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if evaluate:
            sslbench.evaluate_model(model, "digits", transform=digits_tensor, scratch_dir=scratch, **PROTOCOL)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return [float(x) for v in state.values() for x in v.flatten().double().tolist()]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(out)
    scratch = folder / f"scratch-{rank}"
    torch.manual_seed(0)
    model = Counting(Encoder())
    with torch.no_grad():  # each rank's own BatchNorm statistics, as after a DDP step: rank 0's are used
        model.encoder.norm.running_mean += rank
    own_statistics = model.encoder.norm.running_mean.clone()
    found = {name: comparable(results) for name, results in evaluations(model, scratch).items()}
    record: dict[str, Any] = {"results": found, "rows": model.rows, "indices": model.indices}
    record["kept_own_statistics"] = torch.equal(model.encoder.norm.running_mean, own_statistics)
    record["mismatch"] = mismatch(model, scratch, rank)
    record["refused"] = refusal(model, scratch)  # on every rank, not only where it happened
    if rank == 0:  # alone, inside the group: the other ranks do not take part
        alone = sslbench.evaluate_model(
            model, "digits", transform=digits_tensor, batch_size=100, scratch_dir=scratch, ranks=ONE_PROCESS, **PROTOCOL
        )
        record["rank_0_alone"] = comparable(alone)
    dist.barrier()
    if world == 2:
        weights = {}
        for evaluate in (False, True):
            seed_everything(1)
            ddp = nn.parallel.DistributedDataParallel(Encoder())
            weights[str(evaluate)] = train(ddp, 3, evaluate, scratch)
        record["weights"] = weights
    dist.destroy_process_group()
    if rank == 0:  # the same call in one process, on the same thread count
        model.rows, model.indices = 0, []
        record["one_process"] = {name: comparable(results) for name, results in evaluations(model, scratch).items()}
        record["one_process_refused"] = refusal(model, scratch)
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
