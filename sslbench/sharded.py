"""A split's features extracted across the ranks of a process group and assembled once, on rank 0.

What :func:`sslbench.evaluate_model` does under ``torch.distributed``: each rank embeds its contiguous,
batch-aligned shard of the split (:func:`~sslbench.extract.batch_shards`: no sample twice, no padding,
empty shards when the split has fewer batches than there are ranks) into its own scratch folder, then
sends it to rank 0 through the process group in bounded chunks; rank 0 writes the rows, in sample
order, into one memory-mapped file. No rank ever holds more than its shard and one chunk, and no folder
needs to be shared between the ranks (they may be on different machines). The batches are the very
batches one process would embed, so rank 0's features are bit-identical to a one-process extraction
with the same numeric settings.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from sslbench.arrays import RowReader, RowWriter
from sslbench.cache import CacheKey, FeatureCache
from sslbench.errors import SSLBenchError, exception_line
from sslbench.extract import Extracted, ExtractionSettings, batch_shards, extract_split, precision_check
from sslbench.interfaces import Backbone, Split
from sslbench.ranks import Ranks

#: Rows per message from a rank to rank 0 (4,096 × 2,048 float32 = 32 MiB).
CHUNK_ROWS = 4096


class ShardOfSplit(Split):
    """Rows ``[start, stop)`` of ``split``, numbered from 0."""

    def __init__(self, split: Split, start: int, stop: int) -> None:
        self.split, self.start, self.stop = split, start, stop

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.split.labels)[self.start : self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Any:
        return self.split[self.start + index]

    def reduced_sample(self, index: int, min_side: int) -> Any:
        return self.split.reduced_sample(self.start + index, min_side)

    def describe(self, index: int) -> str:
        return self.split.describe(self.start + index)


def raise_if_any_failed(ranks: Ranks, error: BaseException | None, what: str) -> None:
    """A collective: every rank learns whether any rank failed at ``what``. The rank that failed raises
    its own exception, the others a :class:`RuntimeError` naming the first rank that failed and why, so
    no rank waits forever for one that has stopped."""
    shown = None if error is None else f"{type(error).__name__}: {exception_line(error)}"
    failures = ranks.all_gather_object(shown)
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise RuntimeError(f"{what}: rank {rank} of {ranks.world} failed: {failure}")


def picklable(error: BaseException) -> BaseException:
    """``error`` as it can travel to the other ranks (its one line in a RuntimeError when it cannot)."""
    try:
        pickle.dumps(error)
    except Exception:  # noqa: BLE001 - any pickling failure means: send the text instead
        return RuntimeError(exception_line(error))
    return error


def use_rank_zero_state(model: Any, ranks: Ranks) -> None:
    """Give every rank's copy of ``model`` rank 0's buffers, after checking that the ranks hold the same
    parameters: each rank embeds its shard with its own copy, so copies that differ would give one split
    features of several models.

    Under ``DistributedDataParallel`` the parameters agree (the optimiser steps on all-reduced
    gradients) but the buffers need not: each rank's last training forward updated BatchNorm's running
    statistics with its own batch, and DDP only copies rank 0's over them at the start of the next
    forward. The evaluation therefore uses rank 0's, as that next forward would (the caller's buffers are
    given back afterwards by :func:`~sslbench.isolation.untouched_training`). Parameters are compared
    through per-tensor float64 sums and sums of squares computed where they live; ranks that differ are
    a one-line error on every rank naming the first parameter, never silently mixed.
    """
    import torch
    import torch.distributed as dist

    if not ranks.distributed or not isinstance(model, torch.nn.Module):
        return
    names = [name for name, _ in model.named_parameters()]
    with torch.no_grad():
        sums = [
            torch.stack((p.detach().double().sum(), p.detach().double().square().sum())).cpu()
            for p in model.parameters()
        ]
    fingerprint = torch.stack(sums) if sums else torch.zeros((0, 2), dtype=torch.float64)
    gathered = ranks.all_gather(fingerprint)
    for rank, other in enumerate(gathered[1:], start=1):
        if not torch.equal(other, gathered[0]):
            differing = next(i for i in range(len(names)) if not torch.equal(other[i], gathered[0][i]))
            raise SSLBenchError(
                f"evaluate_model: rank {rank}'s parameter '{names[differing]}' differs from rank 0's; every "
                "rank must hold the same weights (each embeds its shard of the images with its own copy)"
            )
    transport = ranks.transport_device()
    with torch.no_grad():
        for buffer in model.buffers():
            moved = buffer.detach().to(transport)
            dist.broadcast(moved, src=ranks.global_rank(0), group=ranks.group)
            if ranks.rank != 0:
                buffer.copy_(moved)


def extract_across_ranks(
    backbone: Backbone,
    split: Split,
    *,
    ranks: Ranks,
    settings: ExtractionSettings,
    device: str,
    name: str,
    key: CacheKey,
    scratch: Path,
) -> Extracted | None:
    """Every rank embeds its shard of ``split``; rank 0 gets the whole split's features (a memory map
    in ``scratch``), the other ranks ``None``. Called by every rank of ``ranks``, with the same split."""
    n = len(split)
    start, stop = batch_shards(n, settings.batch_size, ranks.world)[ranks.rank]
    shard: Extracted | None = None
    error: BaseException | None = None
    try:
        scratch.mkdir(parents=True, exist_ok=True)  # rank 0 writes the split there, shard or no shard
        if stop > start:
            entry = FeatureCache(scratch / f"shard-{start}-{stop}").entry(key)
            shard = extract_split(
                backbone, ShardOfSplit(split, start, stop), settings=settings, device=device, name=name, entry=entry
            )
    except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows
        error = exc
    raise_if_any_failed(ranks, error, f"extracting {name}")
    import torch

    dims = shard.features.shape[1] if shard is not None else -1
    found = ranks.all_gather(torch.tensor([stop - start, dims], dtype=torch.int64))
    all_dims = {int(d) for _, d in (f.tolist() for f in found) if d >= 0}
    if len(all_dims) != 1:
        raise RuntimeError(f"extracting {name}: the ranks' features have different dims {sorted(all_dims)}")
    width = all_dims.pop()
    assembled: Extracted | None = None
    error = None
    try:
        if ranks.rank != 0:
            if shard is not None:
                _send(ranks, shard.features)
        else:
            features = _assemble(ranks, found, shard, scratch / f"{key.split_fingerprint}.npy", width)
            check = precision_check(backbone, split, settings, device) if settings.precision != "float32" else None
            assembled = Extracted(features, np.asarray(split.labels, dtype=np.int64), precision_check=check)
    except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows (none waits for rank 0)
        error = exc
    raise_if_any_failed(ranks, error, f"assembling {name}")
    return assembled


def _assemble(ranks: Ranks, found: list[Any], shard: Extracted | None, path: Path, width: int) -> np.ndarray:
    """Rank 0: its own shard and every other rank's, received in rank order, written to ``path``."""
    writer = RowWriter(path, sum(int(got[0]) for got in found), width)
    try:
        for rank, got in enumerate(found):
            rows = int(got[0])
            if rank == 0 and shard is not None:
                reader = RowReader(shard.features)
                for at in range(0, rows, CHUNK_ROWS):
                    writer.write(reader.rows(slice(at, min(at + CHUNK_ROWS, rows)), as_float32=True))
                reader.release()
            elif rows:
                _receive(ranks, rank, rows, width, writer)
        features = writer.finish()
    finally:
        writer.close()
    return features


def _send(ranks: Ranks, features: np.ndarray) -> None:
    import torch
    import torch.distributed as dist

    reader = RowReader(features)
    try:
        for at in range(0, len(reader), CHUNK_ROWS):
            rows = reader.rows(slice(at, min(at + CHUNK_ROWS, len(reader))), as_float32=True)
            chunk = torch.from_numpy(np.ascontiguousarray(rows)).to(ranks.transport_device())
            dist.send(chunk, dst=ranks.global_rank(0), group=ranks.group)
    finally:
        reader.release()


def _receive(ranks: Ranks, rank: int, rows: int, width: int, writer: RowWriter) -> None:
    import torch
    import torch.distributed as dist

    for at in range(0, rows, CHUNK_ROWS):
        chunk = torch.empty((min(CHUNK_ROWS, rows - at), width), dtype=torch.float32, device=ranks.transport_device())
        dist.recv(chunk, src=ranks.global_rank(rank), group=ranks.group)
        writer.write(chunk.cpu().numpy())
