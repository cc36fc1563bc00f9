"""The ``faiss`` backend (optional extra ``sslbench[faiss]``): faiss PCA and faiss k-means.

faiss's k-means subsamples to ``max_points_per_centroid × k`` points by default; here every train
point is used, as the protocol fits on the whole train split. Both steps need the features in RAM as
float32 (faiss takes no memory-mapped streams); ``epochs`` is faiss's number of Lloyd iterations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sslbench import hookimpl
from sslbench.errors import SSLBenchError
from sslbench.interfaces import (
    Clusterer,
    ClustererConfig,
    ClustererEntry,
    Reducer,
    ReducerConfig,
    ReducerEntry,
)

NAME = "faiss"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise SSLBenchError("backend 'faiss' needs faiss: pip install 'sslbench[faiss]'") from None
    return faiss


def _dense(features: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(features, dtype=np.float32)


class FaissPCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self._pca: Any = None
        self._variance: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> None:
        faiss = _faiss()
        x = _dense(features)
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

    def transform(self, features: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        n = n_components
        projected = self._pca.apply(_dense(features))[:, :n]
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
        x = _dense(features)
        cfg = self.config
        kmeans = faiss.Kmeans(
            x.shape[1],
            cfg.n_clusters,
            niter=cfg.epochs,
            seed=cfg.seed,
            max_points_per_centroid=len(x) // cfg.n_clusters + 1,  # never subsample
            gpu=cfg.device.startswith("cuda"),
        )
        kmeans.train(x)
        self._kmeans = kmeans

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self._kmeans is None:
            raise RuntimeError("FaissKMeans.predict called before fit")
        _, labels = self._kmeans.index.search(_dense(features), 1)
        return labels[:, 0].astype(np.int64)


@hookimpl
def sslbench_register_reducers(register: Callable[[ReducerEntry], None]) -> None:
    register(ReducerEntry(NAME, FaissPCA, "faiss PCAMatrix (optional extra: faiss)"))


@hookimpl
def sslbench_register_clusterers(register: Callable[[ClustererEntry], None]) -> None:
    register(ClustererEntry(NAME, FaissKMeans, "faiss k-means on every point (optional extra: faiss)"))
