"""The ``torch`` backend: exact PCA and scikit-learn-faithful k-means at GEMM speed, CPU or GPU.

* **PCA** from a streamed mean and covariance: rows are read in chunks, shifted by the first chunk's
  mean, each chunk's Gram matrix is a float32 product (upper column blocks on the CPU, 0.625 of a
  GEMM's flops; ``pca_precision: float64`` for float64 products, twice the CPU time) and the chunks
  are summed in float64. Against scikit-learn's float64 PCA the float32 products' explained variances
  were measured within 2.2e-6 relative on components above 1e-6 of the largest (the paper's
  IncrementalPCA: 5.1e-8; ``benchmarks/clustering_engine.py``). The covariance is eigendecomposed
  in float64. Components
  are ordered by decreasing variance and sign-fixed so that each one's largest-magnitude entry is
  positive. This is the exact PCA (the same subspace and variances as scikit-learn's ``PCA``), not
  an incremental approximation.
* **Mini-batch k-means** with scikit-learn's ``MiniBatchKMeans`` semantics: greedy k-means++ on an
  ``init_size`` sample, per-centre counts as learning rates, the paper's batch size, ``epochs``
  shuffled passes, and low-count centres re-seeded from the batch every ``10·k`` samples (always
  while a centre is empty). Counts are kept in float64 (scikit-learn's float32 counts stop
  incrementing past 2^24 samples, which a 60-epoch ImageNet fit exceeds).
* **Lloyd** (``algorithm: lloyd``): full-batch k-means, k-means++ initialisation, ``max_iter`` and
  ``tol`` as scikit-learn's ``KMeans``; empty clusters take the points farthest from their centres.

Distances are ``‖c‖² − 2x·c`` by GEMM in row chunks (``‖x‖²`` does not change an argmin), so memory
stays bounded; inputs may be memory-mapped files read through :class:`~sslbench.arrays.RowReader`. On
the CPU every row gets its exact nearest centre (:class:`_Nearest`: bfloat16 or float32 products with
proven error bounds, float64 for near-ties), and mini-batch fits skip rows whose centre provably stays
the nearest (:class:`_Bounds`); on a GPU the float32 GEMM's argmin is taken as it is.
All randomness comes from one ``torch.Generator`` seeded with the run's seed (on the CPU, whatever the
device), so a fit is deterministic on the CPU.

When ``torch.distributed`` is initialised (``torchrun``), the clusterer runs across ranks: each rank
passes its contiguous shard of the rows (rank order = row order), every rank draws the same
permutations, works on the part of each global batch it holds, and centre sums and counts are
all-reduced, so the result matches a single-process fit up to floating-point summation order.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import hookimpl
from sslbench.arrays import RowReader, projection_scale
from sslbench.errors import SSLBenchError
from sslbench.interfaces import (
    BackendEntry,
    Clusterer,
    ClustererConfig,
    Reducer,
    ReducerConfig,
    iter_chunks,
)
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    import torch as torch_types
    from torch import Tensor

NAME = "torch"
CHUNK_ROWS = 8192
#: k·d below which bfloat16 screening is not worth its second pass over the scores.
SCREEN_MIN_WORK = 1 << 14


def _torch() -> ModuleType:
    """torch, imported only when the backend is used."""
    import torch

    return torch


def _resolve(device: str) -> str:
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SSLBenchError(f"backend 'torch' was asked for device '{device}' but torch sees no CUDA GPU")
    return device


class _Ranks:
    """This process's place among the ranks of ``torch.distributed`` (one rank when not initialised)."""

    def __init__(self, n_local: int, device: str) -> None:
        torch = _torch()
        dist = torch.distributed
        self.n_local = n_local
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.device = device
        if not self.active:
            self.n_total, self.start = n_local, 0
            return
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64))
        counts = [int(s.item()) for s in sizes]
        self.n_total = sum(counts)
        self.start = sum(counts[: dist.get_rank()])

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` in place (a no-op on one rank)."""
        if self.active:
            torch = _torch()
            on_cpu = tensor.cpu() if torch.distributed.get_backend() == "gloo" else tensor
            torch.distributed.all_reduce(on_cpu)
            if on_cpu is not tensor:
                tensor.copy_(on_cpu)
        return tensor

    def local(self, global_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``global_index``, local row numbers) of the rows this rank holds."""
        mask = (global_index >= self.start) & (global_index < self.start + self.n_local)
        return np.flatnonzero(mask), global_index[mask] - self.start


class _DeviceRows:
    """The rows to fit on, on the compute device: uploaded once when they fit in half the free GPU
    memory (a 1.28M × 2048 ImageNet set does on an 80 GB card), else streamed batch by batch."""

    def __init__(self, reader: RowReader, device: str) -> None:
        torch = _torch()
        self.reader, self.device = reader, device
        self.resident: Tensor | None = None
        # Rows in this process's memory are gathered by torch (on its threads, twice numpy's rate),
        # into one buffer reused batch after batch (a fresh 8 MB array page-faults on every batch).
        array = reader.array
        self._host: Tensor | None = None
        if (
            device == "cpu"
            and not reader.file_backed
            and array.dtype == np.float32
            and array.flags.c_contiguous
            and array.flags.writeable
        ):
            self._host = torch.from_numpy(array)
        self._buffer: Tensor | None = None
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            if len(reader) * reader.dims * 4 < 0.5 * free:
                self.resident = torch.empty((len(reader), reader.dims), dtype=torch.float32, device=device)
                for rows in iter_chunks(len(reader), 8 * CHUNK_ROWS):
                    self.resident[rows] = torch.from_numpy(reader.rows(rows)).to(device)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def dims(self) -> int:
        return self.reader.dims

    def gather(self, local: np.ndarray, reuse: bool = False) -> Tensor:
        """Rows at ascending local indices; with ``reuse``, into a buffer the next reusing gather
        overwrites."""
        torch = _torch()
        if self.resident is not None:
            return self.resident[torch.from_numpy(local).to(self.device)]
        if self._host is None:
            return torch.from_numpy(self.reader.gather(local)).to(self.device)
        index = torch.from_numpy(local)
        if not reuse:
            return torch.index_select(self._host, 0, index)
        if self._buffer is None or len(self._buffer) < len(local):
            self._buffer = torch.empty((len(local), self.dims), dtype=torch.float32)
        return torch.index_select(self._host, 0, index, out=self._buffer[: len(local)])

    def rows(self, rows: slice) -> Tensor:
        torch = _torch()
        if self.resident is not None:
            return self.resident[rows]
        return torch.from_numpy(self.reader.rows(rows)).to(self.device)


def _gather_rows(reader: _DeviceRows, ranks: _Ranks, global_index: np.ndarray) -> Tensor:
    """Rows at sorted global indices, identical on every rank (owners fill, then a sum)."""
    torch = _torch()
    positions, local = ranks.local(global_index)
    if not ranks.active:
        return reader.gather(local)
    out = torch.zeros((len(global_index), reader.dims), dtype=torch.float32, device=ranks.device)
    if len(local):
        out[torch.from_numpy(positions).to(ranks.device)] = reader.gather(local)
    return ranks.sum_(out)


def _scores(x: Tensor, centers: Tensor, center_sq: Tensor) -> Tensor:
    """``‖c‖² − 2x·c`` for every row and centre: the squared distance less ``‖x‖²``, by one GEMM."""
    return _torch().addmm(center_sq, x, centers.T, beta=1.0, alpha=-2.0)


def _closest(x: Tensor, centers: Tensor, center_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest centre of every row, and ``‖c‖² − 2x·c`` at it."""
    best, labels = _scores(x, centers, center_sq).min(dim=1)
    return labels, best


#: Unit roundoffs: bfloat16 keeps 8 significant bits, float32 24.
BF16_UNIT = 2.0**-8
FP32_UNIT = 2.0**-24
#: The smallest normal float32 (and bfloat16): below it a GEMM may flush operands, products and
#: results to zero (AVX512-BF16 does), so error bounds carry absolute terms of this size.
TINY = 2.0**-126


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where a bfloat16 GEMM runs at
    twice the float32 rate; elsewhere it is emulated and no faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class _Screening:
    """Whether nearest centres are screened by bfloat16 products, adapted to the data as a fit goes.

    Screening costs a bfloat16 product (half a float32 one on a CPU with AVX512-BF16) plus a float32
    one for every row its error bound cannot settle. On separated clusters that is a few per cent of
    the rows; where the nearest centres crowd (the early epochs of a fit, overlapping classes) it can
    be most of them, and screening then costs more than it saves. So the share of rows it leaves
    unsettled is tracked (while screening is off, by asking of every ``PROBE_EVERY``-th float32 product
    which rows the bfloat16 bound would have left) and screening runs while that share is under
    ``MAX_SHARE``. The share is that of the rows actually computed: with pruning, the rows the bounds
    could not settle, which are the ones screening would have to settle. Labels are exact either way:
    only the speed depends on the decision.
    """

    MAX_SHARE = 0.4
    PROBE_EVERY = 8

    def __init__(self, enabled: bool, adaptive: bool = True) -> None:
        self.enabled, self.adaptive = enabled, adaptive
        #: Running share of rows the bfloat16 bound leaves unsettled (exponentially weighted).
        self.share = 0.0
        self._calls = 0

    def active(self) -> bool:
        """Whether the next product is screened."""
        return self.enabled and (not self.adaptive or self.share < self.MAX_SHARE)

    def probe(self) -> bool:
        """Whether the next float32 product (screening off) measures what screening would leave."""
        self._calls += 1
        return self.enabled and self._calls % self.PROBE_EVERY == 0

    def record(self, unsettled: int, rows: int) -> None:
        if rows:
            self.share = 0.75 * self.share + 0.25 * unsettled / rows


class _Nearest:
    """The exact nearest centre of every row (ties to the lowest index) at GEMM speed, on the CPU.

    Scores ``‖c‖² − 2x·c`` come from one GEMM — in bfloat16 while ``screening`` is active (twice the
    float32 rate on a CPU with AVX512-BF16), else in float32 — with a rigorous bound on the error of
    every score. A row's nearest centre is settled when no other centre's score less its bound comes
    under the best score plus its bound. The few other rows are recomputed: in float32 when screened,
    then, among the centres still in contention, as exact float64 squared distances, computed pair by
    pair by the same NumPy reduction whatever the batch. So the labels depend neither on the
    precision of the products nor on which rows are computed together (a float32 GEMM rounds a row
    differently depending on the batch's shape, and near-ties then flip): pruned, screened, chunked
    and plain fits assign identically.

    Error bounds, with ``u = 2^-24``, ``‖x‖`` the row's norm and ``‖c‖`` the centre's: a float32 GEMM
    score is within ``(d+4)·u·(‖c‖² + 2‖x‖‖c‖)`` of the exact one (any summation order; ``‖c‖²`` taken
    as the square of the computed norm), and 4 more units cover the float32 sums and differences that
    compare scores with their bounds. In bfloat16 (unit roundoff ``v = 2^-8``) both operands are rounded
    (``2v + v²`` of ``Σ|x_i c_i| ≤ ‖x‖‖c‖``), the products are exact in float32 and summed in float32
    (``d·u``), and the result is rounded to bfloat16 (``v``): every product ``x·c`` is within
    ``e·‖x‖‖c‖`` with ``e = 3v + 2v² + 2(d+1)·u``, so a score within ``2e·‖x‖‖c‖`` plus the float32
    bound. Rows are first tested with one bound per row (the largest centre norm's: two passes over the
    scores); those it leaves, with bounds per centre, which settle about twice as many where centre
    norms vary. All carry 1 % slack for the second-order terms (the computed norms' own rounding
    among them).
    """

    def __init__(self, centers: Tensor, screening: _Screening) -> None:
        torch = _torch()
        d = centers.shape[1]
        self.centers, self.screening = centers, screening
        self.center_norms = torch.linalg.vector_norm(centers, dim=1)
        self.center_sq = self.center_norms.square()
        self.low: Tensor | None = None
        self.exact_centers: np.ndarray | None = None
        e32 = 1.01 * (d + 8) * FP32_UNIT
        e16 = 1.01 * (3 * BF16_UNIT + 2 * BF16_UNIT**2 + 2 * (d + 1) * FP32_UNIT)
        #: A score's error bound against centre ``j``: ``alpha · ‖x‖‖c_j‖ + square_term[j]``.
        self.alpha_32, self.alpha_16, self.e32 = 2 * e32, 2 * e16 + 2 * e32, e32
        self.square_term = e32 * self.center_sq
        self.c_max = float(self.center_norms.max()) if len(centers) else 0.0
        self.dims = d

    def bounds(self, norms: Tensor, screened: bool) -> Tensor:
        """The error bound of every score of rows of norms ``norms``, centre by centre."""
        alpha = self.alpha_16 if screened else self.alpha_32
        relative = _torch().addr(self.square_term, norms, self.center_norms, alpha=alpha)
        return relative.add_(self._flushed(norms)[:, None])

    def row_bounds(self, norms: Tensor, screened: bool) -> Tensor:
        """One error bound per row, valid for all of its scores (the largest centre norm's)."""
        alpha = self.alpha_16 if screened else self.alpha_32
        return alpha * self.c_max * norms + self.e32 * self.c_max**2 + self._flushed(norms)

    def _flushed(self, norms: Tensor) -> Tensor:
        """What flushing values below :data:`TINY` to zero can change a score by: an operand flushed
        changes its product by ``TINY·|other|`` (``TINY·√d·(‖x‖ + ‖c‖)`` in all), a product, sum or
        result flushed by ``TINY`` each (``d + 2`` of them), twice over for ``−2x·c``, and ``‖c‖²``'s
        ``d + 1`` squares and sums. Negligible unless the features are tiny (below about 1e-19)."""
        d = self.dims
        return TINY * ((3 * d + 5) + 2 * math.sqrt(d) * (norms + self.c_max))

    def scores(self, x: Tensor) -> tuple[Tensor, bool]:
        """Approximate scores of every row and centre, and whether they were screened (bfloat16)."""
        torch = _torch()
        if not self.screening.active():
            return _scores(x, self.centers, self.center_sq), False
        if self.low is None:
            self.low = self.centers.bfloat16()
        # float32 + bfloat16 promotes to float32: ‖c‖² − 2·product in one pass, rounded once.
        return torch.add(self.center_sq, torch.mm(x.bfloat16(), self.low.T), alpha=-2.0), True

    def _unsettled(
        self, scores: Tensor, best: Tensor, err: Tensor, norms: Tensor, screened: bool
    ) -> tuple[Tensor, Tensor]:
        """The rows whose nearest centre the bounds cannot settle, and their contenders. First the bound
        per row ``err`` (two passes over the scores), then, for the rows it leaves, bounds per centre."""
        torch = _torch()
        rows = torch.nonzero((scores <= (best + 2 * err)[:, None]).sum(dim=1) > 1).flatten()
        if not len(rows):
            return rows, torch.zeros((0, scores.shape[1]), dtype=torch.bool, device=scores.device)
        contenders = _contenders(scores[rows], self.bounds(norms[rows], screened))
        still = contenders.sum(dim=1) > 1
        return rows[still], contenders[still]

    def labels(self, x: Tensor, scores: Tensor, norms: Tensor, screened: bool) -> tuple[Tensor, Tensor]:
        """The exact nearest centres, from approximate ``scores``, and a bound per row valid for every
        score of the row (rows recomputed in float32 get their scores updated in place)."""
        best, labels = scores.min(dim=1)
        if not bool(_torch().isfinite(best).all()):
            raise SSLBenchError(
                "k-means: squared distances overflow float32 (features of magnitude about 1e19 or more); "
                "rescale the features"
            )
        err = self.row_bounds(norms, screened)
        rows, contenders = self._unsettled(scores, best, err, norms, screened)
        if screened:
            self.screening.record(len(rows), len(x))
        elif self.screening.probe():
            loose = self.row_bounds(norms, True)
            self.screening.record(len(self._unsettled(scores, best, loose, norms, True)[0]), len(x))
        if len(rows) and screened:
            recomputed = _scores(x[rows], self.centers, self.center_sq)
            scores[rows] = recomputed
            err[rows] = self.row_bounds(norms[rows], False)
            best_rows, labels[rows] = recomputed.min(dim=1)
            still, contenders = self._unsettled(recomputed, best_rows, err[rows], norms[rows], False)
            rows = rows[still]
        if len(rows):
            labels[rows] = self._exact(x[rows], contenders)
        return labels, err

    def _exact(self, x: Tensor, within: Tensor) -> Tensor:
        """For every row, the nearest of the centres marked in ``within`` by exact float64 squared
        distances (ties to the lowest index)."""
        torch = _torch()
        if self.exact_centers is None:
            self.exact_centers = self.centers.cpu().double().numpy()
        pair_row, pair_centre = (t.cpu().numpy() for t in torch.nonzero(within, as_tuple=True))
        rows64 = x.cpu().double().numpy()
        distance = np.square(rows64[pair_row] - self.exact_centers[pair_centre]).sum(axis=1)
        order = np.lexsort((pair_centre, distance, pair_row))
        first = np.ones(len(order), dtype=bool)
        first[1:] = pair_row[order][1:] != pair_row[order][:-1]
        return torch.from_numpy(pair_centre[order][first]).to(x.device)

    def closest(self, x: Tensor) -> Tensor:
        """The exact nearest centre of every row of ``x``."""
        scores, screened = self.scores(x)
        return self.labels(x, scores, _torch().linalg.vector_norm(x, dim=1), screened)[0]


def _contenders(scores: Tensor, err: Tensor) -> Tensor:
    """Per row, the centres that may be the nearest: whose score less its bound is at most the least
    score plus its bound (the exact least score is at most that)."""
    upper = (scores + err).min(dim=1).values
    return (scores - err) <= upper[:, None]


def _nearest_centres(centers: Tensor, screening: _Screening) -> Callable[[Tensor], Tensor]:
    """Rows → their nearest centres: exact (:class:`_Nearest`) on the CPU; on a GPU, where nothing
    varies the batch shapes, the float32 GEMM's (without a host round trip per batch). Built once per
    set of centres."""
    if centers.is_cuda:
        center_sq = (centers * centers).sum(dim=1)
        return lambda x: _closest(x, centers, center_sq)[0]
    return _Nearest(centers, screening).closest


#: The k-means++ sample's Gram matrix is precomputed when it takes at most this many bytes...
GRAM_BYTES = 1 << 30
#: ...and costs at most this many times the per-step products' flops: those read the whole sample for
#: a few candidate rows (memory-bound, measured ≈ 1/8 of the GEMM rate on a 2-core EPYC), where the
#: Gram matrix is one GEMM at full rate.
GRAM_FLOP_RATIO = 8


def kmeans_plus_plus(sample: Tensor, n_clusters: int, generator: torch_types.Generator) -> Tensor:
    """Greedy k-means++ (scikit-learn's): ``2 + ln k`` candidates per step, keep the best one.

    Candidates are sample rows, so their products with the sample are rows of the sample's Gram
    matrix: when it is small enough and worth it, it is computed once (one GEMM, at full rate on
    every core), and each of the k steps reads ``2 + ln k`` of its rows instead of multiplying the
    whole sample (a matrix-vector product bound by memory bandwidth). The steps themselves are small,
    sequential, and run on one thread.
    """
    torch = _torch()
    n = len(sample)
    trials = 2 + int(math.log(n_clusters))
    sq = (sample * sample).sum(dim=1)
    gram: Tensor | None = None
    if n * n * sample.element_size() <= GRAM_BYTES and n <= GRAM_FLOP_RATIO * n_clusters * trials:
        with torch_threads(2 * n * n * sample.shape[1]):
            gram = _symmetric_gram(sample)

    def to_sample(rows: Tensor) -> Tensor:
        """Squared distances of the sample rows ``rows`` to every sample row."""
        products = gram[rows] if gram is not None else sample[rows] @ sample.T
        return products.mul_(-2.0).add_(sq[None, :]).add_(sq[rows][:, None]).clamp_min_(0)

    centers = torch.empty((n_clusters, sample.shape[1]), dtype=sample.dtype, device=sample.device)
    first = torch.randint(n, (1,), generator=generator).to(sample.device)
    centers[0] = sample[first[0]]
    closest = to_sample(first)[0]
    potential = closest.sum()
    with torch_threads(0 if gram is not None else 2 * trials * n * sample.shape[1]):
        for c in range(1, n_clusters):
            uniform = torch.rand(trials, generator=generator, dtype=torch.float64).to(sample.device)
            cumulative = torch.cumsum(closest.double(), dim=0)
            candidates = torch.searchsorted(cumulative, uniform * potential.double()).clamp_(max=n - 1)
            updated = torch.minimum(to_sample(candidates), closest[None, :])
            totals = updated.sum(dim=1)
            best = int(torch.argmin(totals).item())
            centers[c] = sample[candidates[best]]
            closest = updated[best]
            potential = totals[best]
    return centers


#: Column blocks of the PCA's Gram products are at least this wide (narrower GEMMs lose their rate).
GRAM_BLOCK = 512


def _gram_width(d: int) -> int:
    """Width of the column blocks of a ``d × d`` Gram product: at most four blocks, ``GRAM_BLOCK`` wide
    at least."""
    return -(-d // max(1, min(4, d // GRAM_BLOCK)))


def _upper_gram(x: Tensor, out: Tensor) -> None:
    """The upper block triangle of ``xᵀx`` into ``out`` (the rest is left as it was): one GEMM per
    block row of columns, ``(d/b + 1)/(2d/b)`` of a full product's flops (0.625 of it for 4 blocks),
    through torch's BLAS and thread pool — scipy's ``syrk`` halves the flops but runs on its own
    pool, whose threads spin for cores a competing process holds (6.6× slower under load)."""
    d = x.shape[1]
    width = _gram_width(d)
    for start in range(0, d, width):
        stop = min(start + width, d)
        _torch().mm(x[:, start:stop].T, x[:, start:], out=out[start:stop, start:])


def _symmetric_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T``: its upper block triangle by :func:`_upper_gram` (0.625 of the flops for four
    blocks), the rest mirrored from it."""
    n = len(rows)
    gram = _torch().empty((n, n), dtype=rows.dtype, device=rows.device)
    _upper_gram(rows.T, gram)
    width = _gram_width(n)
    for start in range(0, n, width):
        stop = min(start + width, n)
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


def _round_down(values: Tensor) -> Tensor:
    """float64 → float32, never above the float64 value (a lower bound stays one)."""
    torch = _torch()
    low = values.float()
    above = low.double() > values
    return torch.where(above, torch.nextafter(low, torch.tensor(-torch.inf)), low)


def _centre_groups(centers: Tensor, n_groups: int) -> Tensor:
    """Group of every centre: a few Lloyd iterations over the centres themselves (Yinyang k-means), so
    that a group holds nearby centres and its lower bound stays tight."""
    torch = _torch()
    seeds = centers[torch.linspace(0, len(centers) - 1, n_groups).round().long()].clone()
    groups = torch.zeros(len(centers), dtype=torch.int64)
    for _ in range(5):
        groups = _closest(centers, seeds, (seeds * seeds).sum(dim=1))[0]
        sums = torch.zeros_like(seeds).index_add_(0, groups, centers)
        sizes = torch.bincount(groups, minlength=n_groups).clamp_min(1)
        seeds = sums / sizes[:, None].to(sums.dtype)
    return groups


class _Bounds:
    """Yinyang-style bounds for mini-batch k-means, per local sample, to skip provably unchanged rows.

    Centres are split into ``t`` groups of nearby centres. At a sample's last exact visit: ``upper`` =
    distance to its nearest centre and, per group, ``lower[g]`` = distance to the group's nearest centre
    other than that one. Since then its centre moved by at most ``drift[c] − drift_at`` (a sum of that
    centre's update movements) and every centre of group ``g`` by at most the group's summed largest
    movement per update (stored as ``lower[g] + group_drift[g]`` at the visit, so the current bound is
    that minus ``group_drift[g]`` now). By the
    triangle inequality the centre is still the nearest while ``upper + own drift < min over groups of
    the group bounds``; a relative margin covers the rounding of the bounds, which are proven bounds on
    exact distances (:class:`_Nearest`), so the labels are those of the full computation (tests
    compare both). One far-moving centre (a starved one just re-seeded moves far on its next update)
    weakens only its group's bound, where a single bound over all centres (Hamerly's) would lose every row.

    Re-seeding moves tens of centres at once, each by about the distance between clusters: folded into
    the drifts, such a burst would weaken most groups and stop pruning for an epoch. So a burst is
    tracked instead (while the centres re-seeded since the oldest visit are few, ``TRACK_SHARE`` of k):
    it leaves the group drifts alone, and a row visited after it first *catches up*, taking bounds on its
    distances to every centre re-seeded since its last visit (their current positions) into its group
    bounds, and into its upper bound when its own centre was one of them.
    """

    MARGIN = 1e-3
    #: At most this many groups (memory: 4 bytes per sample and group).
    MAX_GROUPS = 64
    #: Re-seeding bursts are tracked while the centres re-seeded since the oldest visit are at most this
    #: share of the centres (a catch-up costs that share of a full product); beyond, jumps are folded.
    TRACK_SHARE = 0.25
    #: When bounds settle fewer than this share of a batch, all of it is computed: the few settled rows
    #: cost less in the product than gathering the others would, and their bounds come out fresh.
    WHOLE_BATCH = 0.9

    def __init__(self, n_local: int, centers: Tensor) -> None:
        torch = _torch()
        k = len(centers)
        self.n_groups = max(1, min(self.MAX_GROUPS, k // 10))
        self.group = _centre_groups(centers, self.n_groups)
        self.label = torch.full((n_local,), -1, dtype=torch.int64)
        self.upper = torch.zeros(n_local, dtype=torch.float64)
        self.lower = torch.zeros((n_local, self.n_groups), dtype=torch.float32)
        self.drift_at = torch.zeros(n_local, dtype=torch.float64)
        self.sq = torch.zeros(n_local, dtype=torch.float32)
        self.drift = torch.zeros(k, dtype=torch.float64)
        self.group_drift = torch.zeros(self.n_groups, dtype=torch.float64)
        #: The centres of every tracked re-seeding burst, in order, and per sample how many of them it had
        #: caught up with at its last visit.
        self.bursts: list[Tensor] = []
        self.caught_up = torch.zeros(n_local, dtype=torch.int64)
        self.skipped = 0

    def labels(self, local: Tensor, x: Tensor, centers: Tensor, screening: _Screening) -> Tensor:
        """Labels of the batch rows ``x`` (local sample numbers ``local``), computing only the rows
        whose bounds do not settle them."""
        torch = _torch()
        label = self.label[local]
        seen = label >= 0
        own = label.clamp_min(0)
        upper = self.upper[local] + (self.drift[own] - self.drift_at[local])
        group_lower = self.lower[local].double() - self.group_drift
        # Squared norms are computed at a row's first visit and kept: a pass over the batch saved.
        x_sq = self.sq[local]
        unseen = torch.nonzero(~seen).flatten()
        if len(unseen) == len(local):
            x_sq = torch.linalg.vecdot(x, x)
            self.sq[local] = x_sq
        elif len(unseen):
            fresh = x[unseen]
            x_sq[unseen] = torch.linalg.vecdot(fresh, fresh)
            self.sq[local[unseen]] = x_sq[unseen]
        norms = x_sq.sqrt()
        behind = torch.nonzero(seen & (self.caught_up[local] < len(self.bursts))).flatten()
        if len(behind):
            self._catch_up(local, behind, x, x_sq, centers, own, upper, group_lower)
        lower = group_lower.min(dim=1).values
        settled = seen & (upper <= lower - self.MARGIN * (lower.abs() + norms.double()))
        todo = torch.nonzero(~settled).flatten()
        if len(todo) >= self.WHOLE_BATCH * len(local):
            todo = torch.arange(len(local))
        self.skipped += len(local) - len(todo)
        if len(todo):
            if len(todo) == len(local):  # no copy of the batch
                found, nearest, exact_lower = self._exact(x, centers, x_sq, norms, screening)
            else:
                found, nearest, exact_lower = self._exact(x[todo], centers, x_sq[todo], norms[todo], screening)
            rows = local[todo]
            label[todo] = found
            self.label[rows] = found
            self.upper[rows] = nearest
            self.lower[rows] = _round_down(exact_lower + self.group_drift)
            self.drift_at[rows] = self.drift[found]
            self.caught_up[rows] = len(self.bursts)
        return label

    def _catch_up(
        self,
        local: Tensor,
        behind: Tensor,
        x: Tensor,
        x_sq: Tensor,
        centers: Tensor,
        own: Tensor,
        upper: Tensor,
        group_lower: Tensor,
    ) -> None:
        """Batch rows ``behind`` were last visited before some tracked re-seedings: bound their distances
        to every centre re-seeded since (where those centres are now), tighten ``upper`` (when it is the
        row's own centre) and ``group_lower`` (otherwise) in place, and store both as of now."""
        torch = _torch()
        first = int(self.caught_up[local[behind]].min())
        reseeded = torch.cat(self.bursts[first:]).unique()
        chosen = centers[reseeded]
        rows, rows_sq = x[behind], x_sq[behind]
        nearest = _Nearest(chosen, _Screening(False))
        scores, _ = nearest.scores(rows)
        err = nearest.bounds(rows_sq.sqrt(), False)
        squared = scores.double() + rows_sq.double()[:, None]
        slack = err.double() + _norm_slack(rows_sq, x.shape[1])[:, None]
        far = (squared - slack).clamp_min_(0).sqrt_()
        near = (squared + slack).clamp_min_(0).sqrt_()
        is_own = reseeded[None, :] == own[behind][:, None]
        own_upper = torch.where(is_own, near, torch.inf).min(dim=1).values
        upper[behind] = torch.minimum(upper[behind], own_upper)
        reached = torch.full((len(behind), self.n_groups), torch.inf, dtype=torch.float64).scatter_reduce_(
            1, self.group[reseeded].expand(len(behind), -1), far.masked_fill_(is_own, torch.inf), "amin"
        )
        group_lower[behind] = torch.minimum(group_lower[behind], reached)
        stored = local[behind]
        self.upper[stored] = upper[behind]
        self.drift_at[stored] = self.drift[own[behind]]
        self.lower[stored] = _round_down(group_lower[behind] + self.group_drift)
        self.caught_up[stored] = len(self.bursts)

    def _exact(
        self, x: Tensor, centers: Tensor, x_sq: Tensor, norms: Tensor, screening: _Screening
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The exact nearest centre of every row (:class:`_Nearest`), an upper bound on the distance to
        it, and per group a lower bound on the distance to the group's other centres (float64)."""
        torch = _torch()
        nearest = _Nearest(centers, screening)
        scores, screened = nearest.scores(x)
        found, err = nearest.labels(x, scores, norms, screened)
        at = found[:, None]
        best = scores.gather(1, at)[:, 0] + err
        reachable = scores.sub_(err[:, None]).scatter_(1, at, torch.inf)
        group_best = torch.full((len(x), self.n_groups), torch.inf).scatter_reduce_(
            1, self.group.expand(len(x), -1), reachable, "amin"
        )
        slack = _norm_slack(x_sq, x.shape[1])
        upper = (best.double() + x_sq.double() + slack).clamp_min_(0).sqrt_()
        group_lower = (group_best.double() + (x_sq.double() - slack)[:, None]).clamp_min_(0).sqrt_()
        return found, upper, group_lower

    def moved(self, movement: Tensor) -> None:
        """One update moved every centre by at most ``movement``."""
        torch = _torch()
        movement = movement.double().cpu()
        self.drift += movement
        self.group_drift += torch.zeros(self.n_groups, dtype=torch.float64).scatter_reduce_(
            0, self.group, movement, "amax"
        )

    def reseed(self, jumps: Tensor) -> None:
        """Starved centres were re-seeded, each moving by ``jumps`` (0 for the others). The jumps enter
        the centres' own drifts; the burst is tracked (rows catch up with it at their next visit) while
        few centres are pending, else it is a movement like any other, entering its groups' drifts."""
        torch = _torch()
        jumps = jumps.double().cpu()
        moved = torch.nonzero(jumps > 0).flatten()
        if not len(moved):
            return
        seen = self.label >= 0
        oldest = int(self.caught_up[seen].min()) if bool(seen.any()) else len(self.bursts)
        pending = torch.cat([*self.bursts[oldest:], moved]).unique()
        if len(pending) > self.TRACK_SHARE * len(self.drift):
            self.moved(jumps)
            return
        self.bursts.append(moved)
        self.drift += jumps


def _update_centres(centers: Tensor, total: Tensor, sums: Tensor, batch_counts: Tensor, bound: bool) -> Tensor | None:
    """One mini-batch step, in place: ``c ← (c·n + Σx) / (n + m) = c + (Σx − m·c) / (n + m)`` (``total``:
    the counts ``n + m`` after the batch) in two passes over the centres (untouched ones add 0; ``sums``
    becomes each centre's shift). With ``bound``, returns a proven bound on how far each centre moved
    (float64): the step's norm, and the rounding of every coordinate of a moved centre to float32 (up
    to ``u·|c|`` however small the step — a centre nudged by a few units in the last place for
    thousands of updates moves that much more)."""
    torch = _torch()
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


def _norm_slack(x_sq: Tensor, dims: int) -> Tensor:
    """Bound on the error of ``‖x‖²`` summed in float32 (float64), which a squared distance taken as
    score + ‖x‖² adds to the score's own bound."""
    return 1.01 * dims * FP32_UNIT * x_sq.double() + (dims + 1) * TINY


class TorchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    algorithm: Literal["minibatch", "lloyd"] = Field("minibatch", description="minibatch (the paper) or lloyd")
    init_size: int | None = Field(None, ge=1, description="k-means++ sample size; default 3 × batch size")
    reassignment_ratio: float = Field(0.01, ge=0.0, description="minibatch: re-seed centres below this")
    max_iter: int = Field(300, ge=1, description="lloyd: iterations at most")
    tol: float = Field(1e-4, ge=0.0, description="lloyd: stop when centres move less (relative)")
    chunk_rows: int = Field(CHUNK_ROWS, ge=1, description="rows per distance computation")
    prune: bool | None = Field(
        None,
        description="minibatch: skip distance products for rows whose centre provably stays the nearest "
        "(triangle-inequality bounds; same assignments); null = on for the CPU, off on a GPU",
    )
    screen: bool | None = Field(
        None,
        description="nearest centres from bfloat16 products, float32 only for rows they cannot settle (the "
        "same exact labels either way, proven by an error bound); null = on a CPU with native bfloat16, while it "
        "settles most rows (measured as the fit goes: crowded centres leave too many for it to pay)",
    )
    pca_precision: Literal["float32", "float64"] = Field(
        "float32",
        description="arithmetic of each chunk's covariance product (chunks are centred and summed in float64): "
        "float32 (2× faster on CPU; explained variances within 1e-5 relative of scikit-learn's float64 PCA, "
        "benchmarks/clustering_engine.py) or float64",
    )


class TorchKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        options = config.options
        self.options = options if isinstance(options, TorchOptions) else TorchOptions()
        self.device = _resolve(config.device)
        self.centers: Tensor | None = None
        #: Rows whose bounds settled them without a product: in all, and per epoch (mini-batch).
        self.pruned_rows = 0
        self.pruned_per_epoch: list[int] = []

    def fit(self, features: np.ndarray) -> None:
        cfg = self.config
        with torch_threads(2 * cfg.batch_size * cfg.n_clusters * features.shape[1]):
            self._fit(features)

    def _fit(self, features: np.ndarray) -> None:
        torch = _torch()
        stream = RowReader(features)
        reader = _DeviceRows(stream, self.device)
        ranks = _Ranks(len(reader), self.device)
        cfg, opts = self.config, self.options
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
        sample = _gather_rows(reader, ranks, np.sort(picked))
        centers = kmeans_plus_plus(sample, cfg.n_clusters, generator)
        del sample
        self.init_s = time.perf_counter() - started
        started = time.perf_counter()
        if opts.algorithm == "minibatch":
            self.centers = self._minibatch(reader, ranks, centers, generator)
        else:
            self.centers = self._lloyd(reader, ranks, centers)
        self.iterations_s = time.perf_counter() - started
        stream.release()
        if not bool(torch.isfinite(self.centers).all()):
            raise SSLBenchError("k-means: the centres overflowed to NaN or inf (features of extreme magnitude?)")

    def _minibatch(
        self, reader: _DeviceRows, ranks: _Ranks, centers: Tensor, generator: torch_types.Generator
    ) -> Tensor:
        torch = _torch()
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
        bounds = _Bounds(ranks.n_local, centers) if prune and not on_device and k > 1 else None
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
                        labels = _nearest_centres(centers, screening)(x)
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
                movement = _update_centres(centers, total, sums, batch_counts, bounds is not None)
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

    def _screening(self, dims: int) -> _Screening:
        """Whether nearest centres are screened by bfloat16 products (:class:`_Screening`): as the option
        says, else adaptively on a CPU that multiplies bfloat16 natively, for products large enough to be
        worth a second pass."""
        if self.options.screen is not None:
            return _Screening(self.options.screen, adaptive=False)
        enabled = self.device == "cpu" and cpu_has_bf16() and self.config.n_clusters * dims >= SCREEN_MIN_WORK
        return _Screening(enabled)

    def _reassign(
        self,
        reader: _DeviceRows,
        ranks: _Ranks,
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
        torch = _torch()
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
            rows = _gather_rows(reader, ranks, picked[order])
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

    def _lloyd(self, reader: _DeviceRows, ranks: _Ranks, centers: Tensor) -> Tensor:
        torch = _torch()
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
        tol = float((total_sq / ranks.n_total - mean * mean).mean()) * opts.tol
        for _ in range(opts.max_iter):
            sums = torch.zeros((k, dims), dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.float64, device=device)
            center_sq = (centers * centers).sum(dim=1)
            far_score = torch.full((0,), 0.0, device=device)
            far_rows = torch.empty((0, dims), device=device)
            far_labels = torch.empty((0,), dtype=torch.int64, device=device)
            for rows in iter_chunks(len(reader), opts.chunk_rows):
                x = reader.rows(rows)
                labels, best = _closest(x, centers, center_sq)
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

    def _farthest(self, ranks: _Ranks, score: Tensor, rows: Tensor, labels: Tensor, n: int) -> list[tuple[Tensor, int]]:
        """The ``n`` rows farthest from their centres over all ranks, farthest first."""
        torch = _torch()
        if ranks.active:
            world = torch.distributed.get_world_size()
            parts = [torch.zeros_like(score.cpu()) for _ in range(world)]
            torch.distributed.all_gather(parts, score.cpu().contiguous())
            rows_parts = [torch.zeros_like(rows.cpu()) for _ in range(world)]
            torch.distributed.all_gather(rows_parts, rows.cpu().contiguous())
            label_parts = [torch.zeros_like(labels.cpu()) for _ in range(world)]
            torch.distributed.all_gather(label_parts, labels.cpu().contiguous())
            score, rows, labels = torch.cat(parts), torch.cat(rows_parts), torch.cat(label_parts)
        top = torch.topk(score, n).indices
        return list(zip(rows[top].to(self.device), labels[top].tolist(), strict=True))

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self.centers is None:
            raise RuntimeError("TorchKMeans.predict called before fit")
        with torch_threads(2 * self.options.chunk_rows * self.centers.numel()):
            return self._predict(features)

    def _predict(self, features: np.ndarray) -> np.ndarray:
        torch = _torch()
        assert self.centers is not None
        reader = RowReader(features)
        nearest = _nearest_centres(self.centers, self._screening(reader.dims))
        out = np.empty(len(reader), dtype=np.int64)
        for rows in iter_chunks(len(reader), self.options.chunk_rows):
            x = torch.from_numpy(reader.rows(rows)).to(self.device)
            out[rows] = nearest(x).cpu().numpy()
        reader.release()
        return out


class TorchPCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self.device = _resolve(config.device)
        options = config.options if isinstance(config.options, TorchOptions) else TorchOptions()
        self.dtype = np.float64 if options.pca_precision == "float64" else np.float32
        self.on_rows = config.on_rows
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None  # (n_components, d), rows by decreasing variance
        self.explained_variance: np.ndarray | None = None
        self._cached_projection: tuple[tuple[int, bool], Tensor, Tensor] | None = None

    def fit(self, features: np.ndarray) -> None:
        reader = RowReader(features)
        n, d = len(reader), reader.dims
        if n < 2:
            raise SSLBenchError("PCA needs at least 2 samples")
        first = reader.rows(slice(0, min(n, CHUNK_ROWS))).astype(np.float64)
        shift = first.mean(axis=0)
        # float32 products overflow for features of magnitude 1e20 and underflow for 1e-30: such rows
        # are multiplied by a power of two (exact) chosen on the first chunk, and the sums scaled back.
        exponent = projection_scale(float(np.abs(first - shift).max())) if self.dtype == np.float32 else 0
        del first
        total = np.zeros(d)
        if self.device == "cpu":
            with torch_threads(CHUNK_ROWS * d * d):
                scatter = self._host_scatter(reader, shift, total, exponent)
        else:
            scatter = self._device_scatter(reader, shift, total, exponent)
        reader.release()
        if exponent:
            total, scatter = np.ldexp(total, -exponent), np.ldexp(scatter, -2 * exponent)
        if not np.isfinite(scatter).all():
            raise SSLBenchError(
                "PCA: the covariance of the features overflowed (features of extreme magnitude); "
                "with pca_precision: float32, try float64"
            )
        centred = total / n
        covariance = (scatter - n * np.outer(centred, centred)) / (n - 1)
        torch = _torch()
        values, vectors = torch.linalg.eigh(torch.from_numpy(covariance))
        values, vectors = values.numpy()[::-1], vectors.numpy()[:, ::-1]
        rank = min(n, d)
        values, vectors = values[:rank], vectors[:, :rank]
        signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(rank)])
        signs[signs == 0] = 1.0
        self.components = np.ascontiguousarray((vectors * signs).T)
        self.explained_variance = np.clip(values, 0.0, None)
        self.mean = shift + centred

    def _host_scatter(self, reader: RowReader, shift: np.ndarray, total: np.ndarray, exponent: int) -> np.ndarray:
        """``Σ (x − shift)ᵀ(x − shift)`` over chunks of rows, each chunk's product in the arithmetic of
        :attr:`dtype` and the sum of the chunks in float64, adding ``Σ (x − shift)`` into ``total``."""
        torch = _torch()
        d = reader.dims
        scatter = torch.zeros((d, d), dtype=torch.float64)
        gram = torch.zeros((d, d), dtype=torch.float32 if self.dtype == np.float32 else torch.float64)
        centre = shift.astype(self.dtype)
        for rows in iter_chunks(len(reader), CHUNK_ROWS):
            x = reader.rows(rows, as_float32=False).astype(self.dtype, copy=False)
            x = np.subtract(x, centre, dtype=self.dtype)
            if exponent:
                x = np.ldexp(x, exponent, out=x)
            total += x.sum(axis=0, dtype=np.float64)
            _upper_gram(torch.from_numpy(x), out=gram)
            scatter += gram
            if self.on_rows:
                self.on_rows(rows.stop - rows.start)
        upper = scatter.triu()
        return (upper + scatter.triu(1).T).numpy()

    def _device_scatter(self, reader: RowReader, shift: np.ndarray, total: np.ndarray, exponent: int) -> np.ndarray:
        """``Σ (x − shift)ᵀ(x − shift)`` accumulated on the device (float32 rows cast there), adding
        ``Σ (x − shift)`` into ``total``; one transfer of the result instead of one per chunk. With
        ``exponent``, of ``(x − shift)·2^exponent``."""
        torch = _torch()
        dtype = torch.float64 if self.dtype == np.float64 else torch.float32
        d = reader.dims
        scatter = torch.zeros((d, d), dtype=torch.float64, device=self.device)
        sums = torch.zeros(d, dtype=torch.float64, device=self.device)
        centre = torch.from_numpy(shift).to(self.device, dtype)
        for rows in iter_chunks(len(reader), CHUNK_ROWS):
            x = torch.from_numpy(reader.rows(rows)).to(self.device).to(dtype) - centre
            if exponent:
                x = x * 2.0**exponent
            sums += x.sum(dim=0, dtype=torch.float64)
            scatter += (x.T @ x).double()
            if self.on_rows:
                self.on_rows(rows.stop - rows.start)
        total += sums.cpu().numpy()
        return scatter.cpu().numpy()

    @property
    def n_components(self) -> int:
        if self.components is None:
            raise RuntimeError("TorchPCA used before fit")
        return len(self.components)

    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        torch = _torch()
        weights, offset = self._projection(n_components, whiten)
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        with torch_threads(2 * weights.numel() * len(rows)):
            return (x @ weights - offset).cpu().numpy()

    def _projection(self, n: int, whiten: bool) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with ``x @ W − b`` the projection; built once per (n, whiten), not per chunk."""
        key = (n, whiten)
        if self._cached_projection is None or self._cached_projection[0] != key:
            torch = _torch()
            assert self.components is not None and self.mean is not None and self.explained_variance is not None
            weights = self.components[:n].T.astype(np.float32)
            offset = (self.mean @ self.components[:n].T).astype(np.float32)
            if whiten:
                scale = np.sqrt(self.explained_variance[:n]).astype(np.float32)
                weights, offset = weights / scale, offset / scale
            w = torch.from_numpy(np.ascontiguousarray(weights)).to(self.device)
            b = torch.from_numpy(offset).to(self.device)
            self._cached_projection = (key, w, b)
        return self._cached_projection[1], self._cached_projection[2]


def progress_steps(options: BaseModel, epochs: int) -> tuple[int, str]:
    """A mini-batch fit reports ``epochs`` epochs; a full-batch Lloyd fit at most ``max_iter`` iterations."""
    if isinstance(options, TorchOptions) and options.algorithm == "lloyd":
        return options.max_iter, "iterations"
    return epochs, "epochs"


@hookimpl
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    register(
        BackendEntry(
            NAME,
            pca=TorchPCA,
            kmeans=TorchKMeans,
            description="exact PCA from a streamed covariance; scikit-learn-faithful mini-batch k-means "
            "(or Lloyd) by GEMM, CPU/GPU, torch.distributed",
            options=TorchOptions,
            progress_steps=progress_steps,
        )
    )
