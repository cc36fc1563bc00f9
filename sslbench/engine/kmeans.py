"""scikit-learn-faithful k-means by GEMM, CPU or GPU, across ``torch.distributed`` ranks.

* **Mini-batch k-means** with scikit-learn's ``MiniBatchKMeans`` semantics: greedy k-means++ on an
  ``init_size`` sample, per-centre counts as learning rates, the paper's batch size, ``epochs``
  shuffled passes, and low-count centres re-seeded from the batch every ``10·k`` samples (always
  while a centre is empty). Counts are kept in float64 (scikit-learn's float32 counts stop
  incrementing past 2^24 samples, which a 60-epoch ImageNet fit exceeds).
* **Lloyd** (``protocol.algorithm: lloyd``): full-batch k-means, k-means++ initialisation, ``max_iter`` and
  ``tol`` as scikit-learn's ``KMeans``; empty clusters take the points farthest from their centres.

Nearest centres come from :mod:`sslbench.engine.nearest` (exact on the CPU), and mini-batch fits skip
rows whose centre provably stays the nearest (:class:`~sslbench.engine.bounds.Bounds`). Inputs may be
memory-mapped files read through :class:`~sslbench.arrays.RowReader`. All randomness comes from one
``torch.Generator`` seeded with the run's seed (on the CPU, whatever the device), so a fit is
deterministic on the CPU.

Handed the ranks of a process group (``ClustererConfig.ranks``, a :class:`~sslbench.ranks.Ranks`), the
clusterer runs across them: each rank passes its contiguous shard of the rows (rank order = row order),
every rank draws the same
permutations, works on the part of each global batch it holds, and centre sums and counts are
all-reduced, so the result matches a single-process fit up to floating-point summation order.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from sslbench.arrays import RowReader
from sslbench.engine.bounds import Bounds
from sslbench.engine.device import resolve_device, torch_module
from sslbench.engine.gemm import FP32_UNIT, cpu_has_bf16
from sslbench.engine.nearest import Screening, closest_centres, nearest_centres
from sslbench.engine.options import torch_options
from sslbench.engine.rows import DeviceRows, RowShards, gather_rows
from sslbench.engine.seeding import kmeans_plus_plus
from sslbench.errors import SSLBenchError
from sslbench.interfaces import Clusterer, ClustererConfig, iter_chunks
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    import torch as torch_types
    from torch import Tensor


#: k·d below which bfloat16 screening is not worth its second pass over the scores.
SCREEN_MIN_WORK = 1 << 14


def update_centres(centers: Tensor, total: Tensor, sums: Tensor, batch_counts: Tensor, bound: bool) -> Tensor | None:
    """One mini-batch step, in place: ``c ← (c·n + Σx) / (n + m) = c + (Σx − m·c) / (n + m)`` (``total``:
    the counts ``n + m`` after the batch) in two passes over the centres (untouched ones add 0; ``sums``
    becomes each centre's shift). With ``bound``, returns a proven bound on how far each centre moved
    (float64): the step's norm, and the rounding of every coordinate of a moved centre to float32 (up
    to ``u·|c|`` however small the step — a centre nudged by a few units in the last place for
    thousands of updates moves that much more)."""
    torch = torch_module()
    inverse = torch.where(batch_counts > 0, 1.0 / total.clamp_min(1.0), 0.0)
    shift = sums.addcmul_(batch_counts.float()[:, None], centers, value=-1.0)
    step = torch.linalg.vector_norm(shift, dim=1).double() * inverse if bound else None
    centers.addcmul_(shift, inverse.float()[:, None])
    if step is None:
        return None
    d = centers.shape[1]
    rounding = torch.linalg.vector_norm(centers, dim=1).double() * (1.01 * FP32_UNIT)
    # (d + 4)·u: the computed norm's own error and the float32 inverse's and product's roundings.
    return torch.where(batch_counts > 0, step * (1 + (d + 4) * FP32_UNIT) + rounding, 0.0)


class TorchKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        options = config.options
        self.options = torch_options(options)
        self.device = resolve_device(config.device)
        self.centers: Tensor | None = None
        #: Rows whose bounds settled them without a product: in all, and per epoch (mini-batch).
        self.pruned_rows = 0
        self.pruned_per_epoch: list[int] = []

    def fit(self, features: np.ndarray) -> None:
        cfg = self.config
        with torch_threads(2 * cfg.batch_size * cfg.n_clusters * features.shape[1]):
            self._fit(features)

    def _fit(self, features: np.ndarray) -> None:
        torch = torch_module()
        stream = RowReader(features)
        reader = DeviceRows(stream, self.device)
        cfg, opts = self.config, self.options
        ranks = RowShards(len(reader), self.device, cfg.ranks)
        if ranks.n_total < cfg.n_clusters:
            raise SSLBenchError(f"{ranks.n_total} samples are fewer than the {cfg.n_clusters} clusters")
        generator = torch.Generator().manual_seed(cfg.seed)
        init_size = min(opts.init_size or 3 * cfg.batch_size, ranks.n_total)
        init_size = max(init_size, cfg.n_clusters)
        if init_size < ranks.n_total:
            picked = torch.randint(ranks.n_total, (init_size,), generator=generator).numpy()
        else:
            picked = np.arange(ranks.n_total)
        started = time.perf_counter()
        sample = gather_rows(reader, ranks, np.sort(picked))
        centers = kmeans_plus_plus(sample, cfg.n_clusters, generator)
        del sample
        self.init_s = time.perf_counter() - started
        started = time.perf_counter()
        if cfg.algorithm == "minibatch":
            self.centers = self._minibatch(reader, ranks, centers, generator)
        else:
            self.centers = self._lloyd(reader, ranks, centers)
        self.iterations_s = time.perf_counter() - started
        stream.release()
        if not bool(torch.isfinite(self.centers).all()):
            raise SSLBenchError("k-means: the centres overflowed to NaN or inf (features of extreme magnitude?)")

    def _minibatch(
        self, reader: DeviceRows, ranks: RowShards, centers: Tensor, generator: torch_types.Generator
    ) -> Tensor:
        torch = torch_module()
        cfg = self.config
        k, device = cfg.n_clusters, self.device
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        since_reassign = 0
        # Counts never fall back to zero once all are positive (re-seeded centres inherit the smallest
        # count), so the per-batch check, a device sync on a GPU, stops once it has failed.
        may_have_empty = True
        # Rows resident on the GPU on one rank: batches are drawn by index on the device, and nothing
        # in the loop waits for the GPU (a host copy of a pageable index array would, every batch).
        on_device = reader.resident is not None and not ranks.active
        # Counts by index_add of ones: torch.bincount on CUDA reads the largest label back to the host.
        ones = torch.ones(cfg.batch_size, dtype=torch.float64, device=device)
        prune = self.options.prune if self.options.prune is not None else device == "cpu"
        bounds = Bounds(ranks.n_local, centers) if prune and not on_device and k > 1 else None
        self.pruned_rows, self.pruned_per_epoch = 0, []
        screening = self._screening(reader.dims)
        sums = torch.zeros_like(centers)
        for _ in range(cfg.epochs):
            order = torch.randperm(ranks.n_total, generator=generator)
            order_on_device = order.to(device) if on_device else order
            for rows in iter_chunks(ranks.n_total, cfg.batch_size):
                sums.zero_()
                batch_counts = torch.zeros(k, dtype=torch.float64, device=device)
                x: Tensor | None
                if on_device:
                    assert reader.resident is not None
                    batch: Tensor | np.ndarray = order_on_device[rows].sort().values
                    x = reader.resident[batch]
                else:
                    batch = np.sort(order[rows].numpy())
                    _, local = ranks.local(batch)
                    x = reader.gather(local, reuse=True) if len(local) else None
                if x is not None:
                    if bounds is not None:
                        labels = bounds.labels(torch.from_numpy(local), x, centers, screening)
                    else:
                        labels = nearest_centres(centers, screening)(x)
                    sums.index_add_(0, labels, x)
                    batch_counts.index_add_(0, labels, ones[: len(labels)])
                ranks.sum_(sums)
                ranks.sum_(batch_counts)
                # As scikit-learn: decided before the update, from the counts so far.
                since_reassign += cfg.batch_size
                if may_have_empty:
                    may_have_empty = bool((counts == 0).any())
                reassign = may_have_empty or since_reassign >= 10 * k
                total = counts + batch_counts
                movement = update_centres(centers, total, sums, batch_counts, bounds is not None)
                if bounds is not None:
                    assert movement is not None
                    bounds.moved(movement)
                counts = total
                if reassign:
                    since_reassign = 0
                    jumps = self._reassign(reader, ranks, centers, counts, batch, x, generator)
                    if bounds is not None and jumps is not None:
                        bounds.reseed(jumps)
            if bounds is not None:
                self.pruned_per_epoch.append(bounds.skipped - self.pruned_rows)
                self.pruned_rows = bounds.skipped
            if cfg.on_epoch:
                cfg.on_epoch()
        return centers

    def _screening(self, dims: int) -> Screening:
        """Whether nearest centres are screened by bfloat16 products (:class:`Screening`): as the option
        says, else adaptively on a CPU that multiplies bfloat16 natively, for products large enough to be
        worth a second pass."""
        if self.options.screen is not None:
            return Screening(self.options.screen, adaptive=False)
        enabled = self.device == "cpu" and cpu_has_bf16() and self.config.n_clusters * dims >= SCREEN_MIN_WORK
        return Screening(enabled)

    def _reassign(
        self,
        reader: DeviceRows,
        ranks: RowShards,
        centers: Tensor,
        counts: Tensor,
        batch: Tensor | np.ndarray,
        batch_rows: Tensor | None,
        generator: torch_types.Generator,
    ) -> Tensor | None:
        """scikit-learn's low-count re-seeding: move starved centres onto random batch samples; returns
        how far each centre jumped (None when re-seeding is off).

        Centres below ``ratio × max count`` are re-seeded, at most half the batch size of them (the
        lowest counts first); the i-th one, in centre order, takes batch sample ``chosen[i]``, and each
        inherits the smallest count left. On one rank this runs without a device sync: the choice is
        computed for every centre and applied by mask.
        """
        torch = torch_module()
        ratio = self.options.reassignment_ratio
        if ratio <= 0:
            return None
        k, n_batch = len(counts), len(batch)
        # Drawn whether or not any centre is re-seeded, so the random stream never depends on the data.
        chosen = torch.randperm(n_batch, generator=generator)
        rank = torch.empty(k, dtype=torch.int64, device=counts.device)
        rank[torch.argsort(counts, stable=True)] = torch.arange(k, device=counts.device)
        to_reassign = (counts < ratio * counts.max()) & (rank < n_batch // 2)
        if ranks.active:
            n = int(to_reassign.sum())
            if n == 0:
                return torch.zeros(k, device=counts.device)
            picked = np.asarray(batch)[chosen[:n].numpy()]
            order = np.argsort(picked, kind="stable")
            rows = gather_rows(reader, ranks, picked[order])
            new_rows = torch.empty_like(rows)
            new_rows[torch.from_numpy(order).to(rows.device)] = rows
            jumps = torch.zeros(k, device=counts.device)
            jumps[to_reassign] = torch.linalg.vector_norm(new_rows - centers[to_reassign], dim=1)
            centers[to_reassign] = new_rows
        else:
            assert batch_rows is not None
            # From pinned memory the copy to the GPU does not wait for the device.
            source = chosen.pin_memory() if batch_rows.is_cuda else chosen
            chosen = source.to(batch_rows.device, non_blocking=True)
            slot = (torch.cumsum(to_reassign, dim=0) - 1).clamp_(0, n_batch - 1)
            candidates = batch_rows[chosen[slot]]
            moved = torch.where(to_reassign[:, None], candidates, centers)
            jumps = torch.linalg.vector_norm(moved - centers, dim=1)
            centers.copy_(moved)
        smallest = torch.where(to_reassign, torch.inf, counts).min()
        counts.copy_(torch.where(to_reassign & torch.isfinite(smallest), smallest, counts))
        return jumps

    def _lloyd(self, reader: DeviceRows, ranks: RowShards, centers: Tensor) -> Tensor:
        torch = torch_module()
        cfg, opts, device = self.config, self.options, self.device
        k, dims = cfg.n_clusters, reader.dims
        # scikit-learn's tolerance: relative to the mean per-feature variance of the data.
        total = torch.zeros(dims, dtype=torch.float64, device=device)
        total_sq = torch.zeros(dims, dtype=torch.float64, device=device)
        for rows in iter_chunks(len(reader), opts.chunk_rows):
            x = reader.rows(rows).double()
            total += x.sum(dim=0)
            total_sq += (x * x).sum(dim=0)
        ranks.sum_(total)
        ranks.sum_(total_sq)
        mean = total / ranks.n_total
        tol = float((total_sq / ranks.n_total - mean * mean).mean()) * cfg.tol
        for _ in range(cfg.max_iter):
            sums = torch.zeros((k, dims), dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.float64, device=device)
            center_sq = (centers * centers).sum(dim=1)
            far_score = torch.full((0,), 0.0, device=device)
            far_rows = torch.empty((0, dims), device=device)
            far_labels = torch.empty((0,), dtype=torch.int64, device=device)
            for rows in iter_chunks(len(reader), opts.chunk_rows):
                x = reader.rows(rows)
                labels, best = closest_centres(x, centers, center_sq)
                sums.index_add_(0, labels, x.double())
                counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64, device=device))
                distance = best + (x * x).sum(dim=1)
                merged = torch.cat([far_score, distance])
                top = torch.topk(merged, min(k, len(merged))).indices
                far_score = merged[top]
                far_rows = torch.cat([far_rows, x])[top]
                far_labels = torch.cat([far_labels, labels])[top]
            ranks.sum_(sums)
            ranks.sum_(counts)
            empty = torch.nonzero(counts == 0).flatten()
            if len(empty):
                far = self._farthest(ranks, far_score, far_rows, far_labels, len(empty))
                for slot, (row, label) in zip(empty.tolist(), far, strict=True):
                    sums[label] -= row.double()
                    counts[label] -= 1
                    sums[slot] = row.double()
                    counts[slot] = 1
            new = (sums / counts.clamp_min(1)[:, None]).float()
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if cfg.on_epoch:
                cfg.on_epoch()
            if shift <= tol:
                break
        return centers

    def _farthest(
        self, ranks: RowShards, score: Tensor, rows: Tensor, labels: Tensor, n: int
    ) -> list[tuple[Tensor, int]]:
        """The ``n`` rows farthest from their centres over all ranks, farthest first."""
        torch = torch_module()
        if ranks.active:
            score, rows, labels = (torch.cat(ranks.ranks.all_gather(t)) for t in (score, rows, labels))
        top = torch.topk(score, n).indices
        return list(zip(rows[top].to(self.device), labels[top].tolist(), strict=True))

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.centers is None:
            raise RuntimeError("TorchKMeans.predict called before fit")
        with torch_threads(2 * self.options.chunk_rows * self.centers.numel()):
            return self._predict(features)

    def _predict(self, features: np.ndarray) -> np.ndarray:
        torch = torch_module()
        assert self.centers is not None
        reader = RowReader(features)
        nearest = nearest_centres(self.centers, self._screening(reader.dims))
        out = np.empty(len(reader), dtype=np.int64)
        for rows in iter_chunks(len(reader), self.options.chunk_rows):
            x = torch.from_numpy(reader.rows(rows)).to(self.device)
            out[rows] = nearest(x).cpu().numpy()
        reader.release()
        return out
