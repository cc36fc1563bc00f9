"""The nearest centre of every row by GEMM: ``‖c‖² − 2x·c`` in row chunks (``‖x‖²`` does not change an
argmin), so memory stays bounded. On the CPU every row gets its exact nearest centre (:class:`Nearest`:
bfloat16 or float32 products with proven error bounds, float64 for near-ties); on a GPU the float32
GEMM's argmin is taken as it is."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from sslbench.engine.device import torch_module
from sslbench.engine.gemm import BF16_UNIT, FP32_UNIT, TINY
from sslbench.errors import SSLBenchError

if TYPE_CHECKING:
    from torch import Tensor


def centre_scores(x: Tensor, centers: Tensor, center_sq: Tensor) -> Tensor:
    """``‖c‖² − 2x·c`` for every row and centre: the squared distance less ``‖x‖²``, by one GEMM."""
    return torch_module().addmm(center_sq, x, centers.T, beta=1.0, alpha=-2.0)


def closest_centres(x: Tensor, centers: Tensor, center_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest centre of every row, and ``‖c‖² − 2x·c`` at it."""
    best, labels = centre_scores(x, centers, center_sq).min(dim=1)
    return labels, best


class Screening:
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


class Nearest:
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

    def __init__(self, centers: Tensor, screening: Screening) -> None:
        torch = torch_module()
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
        relative = torch_module().addr(self.square_term, norms, self.center_norms, alpha=alpha)
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
        torch = torch_module()
        if not self.screening.active():
            return centre_scores(x, self.centers, self.center_sq), False
        if self.low is None:
            self.low = self.centers.bfloat16()
        # float32 + bfloat16 promotes to float32: ‖c‖² − 2·product in one pass, rounded once.
        return torch.add(self.center_sq, torch.mm(x.bfloat16(), self.low.T), alpha=-2.0), True

    def _unsettled(
        self, scores: Tensor, best: Tensor, err: Tensor, norms: Tensor, screened: bool
    ) -> tuple[Tensor, Tensor]:
        """The rows whose nearest centre the bounds cannot settle, and their contenders. First the bound
        per row ``err`` (two passes over the scores), then, for the rows it leaves, bounds per centre."""
        torch = torch_module()
        rows = torch.nonzero((scores <= (best + 2 * err)[:, None]).sum(dim=1) > 1).flatten()
        if not len(rows):
            return rows, torch.zeros((0, scores.shape[1]), dtype=torch.bool, device=scores.device)
        contenders = contending_centres(scores[rows], self.bounds(norms[rows], screened))
        still = contenders.sum(dim=1) > 1
        return rows[still], contenders[still]

    def labels(self, x: Tensor, scores: Tensor, norms: Tensor, screened: bool) -> tuple[Tensor, Tensor]:
        """The exact nearest centres, from approximate ``scores``, and a bound per row valid for every
        score of the row (rows recomputed in float32 get their scores updated in place)."""
        best, labels = scores.min(dim=1)
        if not bool(torch_module().isfinite(best).all()):
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
            recomputed = centre_scores(x[rows], self.centers, self.center_sq)
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
        torch = torch_module()
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
        return self.labels(x, scores, torch_module().linalg.vector_norm(x, dim=1), screened)[0]


def contending_centres(scores: Tensor, err: Tensor) -> Tensor:
    """Per row, the centres that may be the nearest: whose score less its bound is at most the least
    score plus its bound (the exact least score is at most that)."""
    upper = (scores + err).min(dim=1).values
    return (scores - err) <= upper[:, None]


def nearest_centres(centers: Tensor, screening: Screening) -> Callable[[Tensor], Tensor]:
    """Rows → their nearest centres: exact (:class:`Nearest`) on the CPU; on a GPU, where nothing
    varies the batch shapes, the float32 GEMM's (without a host round trip per batch). Built once per
    set of centres."""
    if centers.is_cuda:
        center_sq = (centers * centers).sum(dim=1)
        return lambda x: closest_centres(x, centers, center_sq)[0]
    return Nearest(centers, screening).closest
