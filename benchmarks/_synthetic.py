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


def class_blobs_torch(
    n: int, n_classes: int, dims: int, device: str, seed: int = 0, rank: int = 256, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The same distribution as :func:`class_blobs`, drawn with torch on ``device`` (seconds on a GPU
    where numpy needs minutes for 1.28M rows), returned as host arrays. Deterministic per device."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(rank, dims, generator=generator, device=device) / rank**0.5
    scale = torch.logspace(np.log10(3.0), np.log10(0.3), rank, device=device)
    centres = torch.randn(n_classes, rank, generator=generator, device=device) * scale
    labels = torch.randint(0, n_classes, (n,), generator=generator, device=device)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        latent = centres[labels[start:stop]] + 0.5 * torch.randn(stop - start, rank, generator=generator, device=device)
        block = latent @ basis + noise * 0.1 * torch.randn(stop - start, dims, generator=generator, device=device)
        out[start:stop] = block.clamp_min_(0.0).cpu().numpy()
    return out, labels.cpu().numpy().astype(np.int64)


def gaussian_classes(
    n: int, n_classes: int, dims: int, separation: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 rows: a Gaussian class mean (norm about ``separation``) plus unit Gaussian noise, so
    that classes overlap as a linear probe's do (3.5 at 768 dims, 100 classes: about 3/4 top-1).
    Generated in blocks, so memory stays at one block."""
    rng = np.random.default_rng(seed)
    means = (rng.normal(size=(n_classes, dims)) * (separation / np.sqrt(dims))).astype(np.float32)
    labels = rng.integers(0, n_classes, n)
    out = np.empty((n, dims), dtype=np.float32)
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        block_rng = np.random.default_rng([seed, start])
        out[start:stop] = block_rng.standard_normal((stop - start, dims), dtype=np.float32)
        out[start:stop] += means[labels[start:stop]]
    return out, labels.astype(np.int64)
