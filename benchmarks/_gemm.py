"""The GEMM rate of this machine in the k-means shape, which the benchmarks' bounds are computed from."""

from __future__ import annotations

import time


def gemm_rate(rows: int, dims: int, k: int, dtype: str = "float32", repeats: int = 10) -> float:
    """flop/s of ``rows × dims`` by ``dims × k`` products in ``dtype``, best of 5 timings of ``repeats``."""
    import torch

    x = torch.randn(rows, dims).to(getattr(torch, dtype))
    c = torch.randn(k, dims).to(getattr(torch, dtype))
    torch.mm(x, c.T)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(x, c.T)
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * rows * dims * k / best
