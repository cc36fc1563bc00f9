"""Deterministic ImageNet-like features shared by the benchmarks: class blobs in a low-rank subspace."""

from __future__ import annotations

import numpy as np


def class_blobs(
    n: int, n_classes: int, dims: int, seed: int = 0, rank: int = 256, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 rows: a class centre in a ``rank``-dim subspace plus isotropic noise, ReLU'd.

    Like pooled CNN features, the class signal lives in a low-dimensional subspace, the spectrum
    decays, and values are non-negative. Generated in blocks, so memory stays at one block.
    """
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, dims)).astype(np.float32) / np.sqrt(rank)
    centres = (rng.normal(size=(n_classes, rank)) * np.geomspace(3.0, 0.3, rank)).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        block_rng = np.random.default_rng([seed, start])
        latent = centres[labels[start:stop]] + block_rng.normal(scale=0.5, size=(stop - start, rank))
        block = latent.astype(np.float32) @ basis
        block += block_rng.normal(scale=noise * 0.1, size=block.shape).astype(np.float32)
        np.maximum(block, 0.0, out=block)
        out[start:stop] = block
    return out, labels.astype(np.int64)
