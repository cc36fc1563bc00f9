"""Exact PCA from a streamed mean and covariance, CPU or GPU.

Rows are read in chunks, shifted by the first chunk's mean, each chunk's Gram matrix is a float32
product (upper column blocks on the CPU, 0.625 of a GEMM's flops; ``pca_precision: float64`` for
float64 products, twice the CPU time) and the chunks are summed in float64. Against scikit-learn's
float64 PCA the float32 products' explained variances were measured within 2.2e-6 relative on
components above 1e-6 of the largest (the paper's IncrementalPCA: 5.1e-8;
``benchmarks/clustering_engine.py``). The covariance is eigendecomposed in float64. Components are
ordered by decreasing variance and sign-fixed so that each one's largest-magnitude entry is positive.
This is the exact PCA (the same subspace and variances as scikit-learn's ``PCA``), not an incremental
approximation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sslbench.arrays import RowReader, projection_scale
from sslbench.engine.device import resolve_device, torch_module
from sslbench.engine.gemm import upper_gram
from sslbench.engine.options import torch_options
from sslbench.engine.rows import CHUNK_ROWS
from sslbench.errors import SSLBenchError
from sslbench.interfaces import Reducer, ReducerConfig, iter_chunks
from sslbench.threads import torch_threads

if TYPE_CHECKING:
    from torch import Tensor


class TorchPCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self.device = resolve_device(config.device)
        options = torch_options(config.options)
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
        torch = torch_module()
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
        torch = torch_module()
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
            upper_gram(torch.from_numpy(x), out=gram)
            scatter += gram
            if self.on_rows:
                self.on_rows(rows.stop - rows.start)
        upper = scatter.triu()
        return (upper + scatter.triu(1).T).numpy()

    def _device_scatter(self, reader: RowReader, shift: np.ndarray, total: np.ndarray, exponent: int) -> np.ndarray:
        """``Σ (x − shift)ᵀ(x − shift)`` accumulated on the device (float32 rows cast there), adding
        ``Σ (x − shift)`` into ``total``; one transfer of the result instead of one per chunk. With
        ``exponent``, of ``(x − shift)·2^exponent``."""
        torch = torch_module()
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
        torch = torch_module()
        weights, offset = self._projection(n_components, whiten)
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        with torch_threads(2 * weights.numel() * len(rows)):
            return (x @ weights - offset).cpu().numpy()

    def _projection(self, n: int, whiten: bool) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with ``x @ W − b`` the projection; built once per (n, whiten), not per chunk."""
        key = (n, whiten)
        if self._cached_projection is None or self._cached_projection[0] != key:
            torch = torch_module()
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
