"""The ``reference`` backend: the paper's code, step for step, with every random choice seeded.

* PCA: scikit-learn ``IncrementalPCA`` with all components, ``partial_fit`` over consecutive batches
  of ``max(4096, 2·d)`` rows; ``pca_dims`` keeps the leading components, as the paper's
  ``--n-components`` does.
* k-means: scikit-learn ``MiniBatchKMeans(max_no_improvement=None)``; each epoch shuffles the train
  features and calls ``partial_fit`` on consecutive batches. One ``RandomState(seed)`` drives the
  shuffles and k-means (its k-means++ initialisation and centre reassignment), as the paper's code
  shares NumPy's global random state between them.

Both read their input in row chunks, so memory-mapped features need not fit in RAM; the k-means
fit reads one shuffled batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import IncrementalPCA

from sslbench import hookimpl
from sslbench.interfaces import (
    Clusterer,
    ClustererConfig,
    ClustererEntry,
    Reducer,
    ReducerConfig,
    ReducerEntry,
    iter_chunks,
)

NAME = "reference"


def pca_batch_size(n_features: int) -> int:
    """The paper's IncrementalPCA batch size: max(4096, 2·d)."""
    return max(4096, 2 * n_features)


class ReferencePCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self.config = config
        self._pca: IncrementalPCA | None = None

    def fit(self, features: np.ndarray) -> None:
        batch = pca_batch_size(features.shape[1])
        pca = IncrementalPCA(n_components=None, batch_size=batch)
        for rows in iter_chunks(len(features), batch):
            pca.partial_fit(features[rows])
            if self.config.on_rows:
                self.config.on_rows(rows.stop - rows.start)
        self._pca = pca

    @property
    def n_components(self) -> int:
        return int(self._fitted().n_components_)

    def _fitted(self) -> IncrementalPCA:
        if self._pca is None:
            raise RuntimeError("ReferencePCA.transform called before fit")
        return self._pca

    def transform(self, features: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        pca = self._fitted()
        n = n_components
        components = pca.components_[:n].T
        offset = pca.mean_ @ components
        scale = np.sqrt(pca.explained_variance_[:n]) if whiten else None
        out = np.empty((len(features), n), dtype=np.float32)
        for rows in iter_chunks(len(features), pca_batch_size(features.shape[1])):
            projected = np.asarray(features[rows]) @ components - offset
            if scale is not None:
                projected /= scale
            out[rows] = projected
        return out


class ReferenceKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        self._kmeans: MiniBatchKMeans | None = None

    def fit(self, features: np.ndarray) -> None:
        cfg = self.config
        rng = np.random.RandomState(cfg.seed)
        kmeans = MiniBatchKMeans(
            n_clusters=cfg.n_clusters,
            batch_size=cfg.batch_size,
            max_no_improvement=None,
            random_state=rng,
        )
        order = np.arange(len(features))
        for _ in range(cfg.epochs):
            rng.shuffle(order)
            for rows in iter_chunks(len(order), cfg.batch_size):
                kmeans.partial_fit(features[order[rows]])
            if cfg.on_epoch:
                cfg.on_epoch()
        self._kmeans = kmeans

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self._kmeans is None:
            raise RuntimeError("ReferenceKMeans.predict called before fit")
        out = np.empty(len(features), dtype=np.int64)
        for rows in iter_chunks(len(features)):
            out[rows] = self._kmeans.predict(features[rows])
        return out


@hookimpl
def sslbench_register_reducers(register: Callable[[ReducerEntry], None]) -> None:
    register(ReducerEntry(NAME, ReferencePCA, "scikit-learn IncrementalPCA, as the paper's code"))


@hookimpl
def sslbench_register_clusterers(register: Callable[[ClustererEntry], None]) -> None:
    register(ClustererEntry(NAME, ReferenceKMeans, "scikit-learn MiniBatchKMeans, shuffled partial_fit epochs"))
