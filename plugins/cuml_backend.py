"""The ``cuml`` backend: RAPIDS cuML PCA and KMeans on a GPU (extras ``gpu-cu12`` / ``gpu-cu13``, per CUDA major).

Features move to the GPU in row chunks (cupy arrays): PCA is cuML's ``IncrementalPCA``
(``partial_fit`` per chunk, all components, truncated per ``pca_dims`` like the reference backend);
k-means is cuML's ``KMeans`` (Lloyd, ``protocol.algorithm: lloyd``; k-means|| initialisation, ``max_iter``,
``tol``, ``n_init`` restarts, seeded: TURTLE's call) on the
projected train features, which cuML needs whole in GPU memory: a matrix larger than half the free
GPU memory is refused in one line before any work. Projection and prediction run in row chunks. cuML and cupy
are imported only when the backend is used; without them, or without a GPU, the error says so.
Multi-node GPU k-means goes through cuML's Dask API (``cuml.dask.cluster.KMeans``), not this plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sslbench import hookimpl
from sslbench.arrays import RowReader
from sslbench.errors import SSLBenchError
from sslbench.interfaces import (
    BackendEntry,
    Clusterer,
    ClustererConfig,
    Reducer,
    ReducerConfig,
    iter_chunks,
)

NAME = "cuml"
CHUNK_ROWS = 65536


def gpu_extra(cuda_version: str | None) -> str:
    """The extra whose cupy and cuML wheels match a CUDA version (torch's ``torch.version.cuda``;
    ``gpu-cu12`` when unknown or older)."""
    major = (cuda_version or "").split(".")[0]
    return "gpu-cu13" if major == "13" else "gpu-cu12"


def _torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _gpu_modules() -> tuple[Any, Any]:
    try:
        import cuml
        import cupy
    except ImportError:
        raise SSLBenchError(
            "backend 'cuml' needs RAPIDS cuML and cupy on a CUDA machine: "
            f"pip install 'sslbench[{gpu_extra(_torch_cuda())}]'"
        ) from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise SSLBenchError("backend 'cuml' found no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise SSLBenchError(f"backend 'cuml' found no usable CUDA GPU: {exc}") from None
    return cupy, cuml


def _to_device(cupy: Any, reader: RowReader, rows: slice) -> Any:
    return cupy.asarray(reader.rows(rows))


class CumlPCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self._pca: Any = None

    def fit(self, features: np.ndarray) -> None:
        cupy, cuml = _gpu_modules()
        reader = RowReader(features)
        batch = max(4096, 2 * reader.dims)
        pca = cuml.IncrementalPCA(n_components=None, batch_size=batch, output_type="cupy")
        for rows in iter_chunks(len(reader), max(batch, CHUNK_ROWS)):
            pca.partial_fit(_to_device(cupy, reader, rows))
        reader.release()
        self._pca = pca

    @property
    def n_components(self) -> int:
        if self._pca is None:
            raise RuntimeError("CumlPCA used before fit")
        return int(self._pca.n_components_)

    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        cupy, _ = _gpu_modules()
        n = n_components
        components = cupy.asarray(self._pca.components_)[:n].T
        projected = cupy.asarray(rows) @ components - cupy.asarray(self._pca.mean_) @ components
        if whiten:
            projected /= cupy.sqrt(cupy.asarray(self._pca.explained_variance_)[:n])
        return cupy.asnumpy(projected.astype(cupy.float32))


class CumlKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        self._kmeans: Any = None

    def fit(self, features: np.ndarray) -> None:
        cupy, cuml = _gpu_modules()
        cfg = self.config
        free, _ = cupy.cuda.runtime.memGetInfo()
        needed = features.shape[0] * features.shape[1] * 4
        if needed > 0.5 * free:
            raise SSLBenchError(
                f"backend 'cuml' needs the whole train matrix on the GPU ({needed / 1e9:.1f} GB) but only "
                f"{free / 1e9:.1f} GB are free; use fewer pca_dims or backend 'torch', which streams"
            )
        reader = RowReader(features)
        x = cupy.empty((len(reader), reader.dims), dtype=cupy.float32)
        for rows in iter_chunks(len(reader), CHUNK_ROWS):
            x[rows] = _to_device(cupy, reader, rows)
        reader.release()
        kmeans = cuml.KMeans(
            n_clusters=cfg.n_clusters,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            random_state=cfg.seed,
            n_init=cfg.n_init,
            output_type="cupy",
        )
        kmeans.fit(x)
        self._kmeans = kmeans

    def predict(self, features: np.ndarray) -> np.ndarray:
        cupy, _ = _gpu_modules()
        if self._kmeans is None:
            raise RuntimeError("CumlKMeans.predict called before fit")
        reader = RowReader(features)
        out = np.empty(len(reader), dtype=np.int64)
        for rows in iter_chunks(len(reader), CHUNK_ROWS):
            out[rows] = cupy.asnumpy(self._kmeans.predict(_to_device(cupy, reader, rows)))
        reader.release()
        return out


@hookimpl
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    register(
        BackendEntry(
            NAME,
            pca=CumlPCA,
            kmeans=CumlKMeans,
            description="RAPIDS cuML IncrementalPCA + KMeans on a GPU (optional extra: gpu)",
            algorithms=("lloyd",),
            restarts=("lloyd",),
        )
    )
