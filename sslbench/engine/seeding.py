"""k-means++ initialisation, as scikit-learn's (greedy, ``2 + ln k`` candidates per step)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from sslbench.engine.device import torch_module
from sslbench.engine.gemm import symmetric_gram
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    import torch as torch_types
    from torch import Tensor


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
    torch = torch_module()
    n = len(sample)
    trials = 2 + int(math.log(n_clusters))
    sq = (sample * sample).sum(dim=1)
    gram: Tensor | None = None
    if n * n * sample.element_size() <= GRAM_BYTES and n <= GRAM_FLOP_RATIO * n_clusters * trials:
        with torch_threads(2 * n * n * sample.shape[1]):
            gram = symmetric_gram(sample)

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
