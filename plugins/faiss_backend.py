"""The ``faiss`` backend (optional extra ``sslbench[faiss]``): faiss PCA and faiss k-means.

faiss's k-means subsamples to ``max_points_per_centroid × k`` points by default; here every train
point is used, as the protocol fits on the whole train split. Fitting needs the train matrix in RAM as
float32 (faiss takes no streams): a matrix larger than half the available memory is refused in one
line before any work. Projection and prediction run in row chunks. faiss's k-means is Lloyd's
(``protocol.algorithm: lloyd``): ``max_iter`` iterations (faiss has no tolerance), ``n_init`` restarts
(faiss's ``nredo``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sslbench import hookimpl
from sslbench.arrays import RowReader, require_in_memory
from sslbench.errors import SSLBenchError
from sslbench.interfaces import (
    BackendEntry,
    Clusterer,
    ClustererConfig,
    Reducer,
    ReducerConfig,
    iter_chunks,
)

NAME = "faiss"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise SSLBenchError("backend 'faiss' needs faiss: pip install 'sslbench[faiss]'") from None
    return faiss


def _dense(features: np.ndarray, what: str) -> np.ndarray:
    """The whole matrix as float32 in RAM, refused up front when it cannot fit."""
    require_in_memory(features.shape[0] * features.shape[1] * 4, f"backend 'faiss' ({what})")
    reader = RowReader(features)
    out = np.empty((len(reader), reader.dims), dtype=np.float32)
    for rows in iter_chunks(len(reader)):
        out[rows] = reader.rows(rows)
    reader.release()
    return out


class FaissPCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self._pca: Any = None
        self._variance: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> None:
        faiss = _faiss()
        x = _dense(features, "PCA fit")
        d = x.shape[1]
        pca = faiss.PCAMatrix(d, min(d, len(x)))
        pca.train(x)
        self._pca = pca
        # faiss's eigenvalues are those of the scatter matrix: divide by n - 1 for variances
        self._variance = faiss.vector_to_array(pca.eigenvalues)[: pca.d_out] / (len(x) - 1)

    @property
    def n_components(self) -> int:
        if self._pca is None:
            raise RuntimeError("FaissPCA used before fit")
        return int(self._pca.d_out)

    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        n = n_components
        projected = self._pca.apply(np.ascontiguousarray(rows, dtype=np.float32))[:, :n]
        if whiten:
            assert self._variance is not None
            projected = projected / np.sqrt(self._variance[:n]).astype(np.float32)
        return np.ascontiguousarray(projected, dtype=np.float32)


class FaissKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        self._kmeans: Any = None

    def fit(self, features: np.ndarray) -> None:
        faiss = _faiss()
        x = _dense(features, "k-means fit")
        cfg = self.config
        kmeans = faiss.Kmeans(
            x.shape[1],
            cfg.n_clusters,
            niter=cfg.max_iter,
            nredo=cfg.n_init,
            seed=cfg.seed,
            max_points_per_centroid=len(x) // cfg.n_clusters + 1,  # never subsample
            gpu=cfg.device.startswith("cuda"),
        )
        kmeans.train(x)
        self._kmeans = kmeans

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self._kmeans is None:
            raise RuntimeError("FaissKMeans.predict called before fit")
        reader = RowReader(features)
        out = np.empty(len(reader), dtype=np.int64)
        for rows in iter_chunks(len(reader)):
            _, labels = self._kmeans.index.search(reader.rows(rows), 1)
            out[rows] = labels[:, 0]
        reader.release()
        return out


@hookimpl
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    register(
        BackendEntry(
            NAME,
            pca=FaissPCA,
            kmeans=FaissKMeans,
            description="faiss PCAMatrix + faiss k-means on every point (optional extra: faiss)",
            algorithms=("lloyd",),
            restarts=("lloyd",),
        )
    )
