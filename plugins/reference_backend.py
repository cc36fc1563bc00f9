"""The ``reference`` backend: the paper's code, step for step, with every random choice seeded.

* PCA: scikit-learn ``IncrementalPCA`` with all components, ``partial_fit`` over consecutive batches
  of ``max(4096, 2·d)`` rows; ``pca_dims`` keeps the leading components, as the paper's
  ``--n-components`` does.
* k-means: scikit-learn ``MiniBatchKMeans(max_no_improvement=None)``; each epoch shuffles the train
  features and calls ``partial_fit`` on consecutive batches. One ``RandomState(seed)`` drives the
  shuffles and k-means (its k-means++ initialisation and centre reassignment), as the paper's code
  shares NumPy's global random state between them. With ``protocol.algorithm`` ``minibatch_fit`` or
  ``lloyd`` it is scikit-learn's ``MiniBatchKMeans(...).fit`` or ``KMeans(...).fit`` on the whole train
  matrix (in memory), ``n_init`` restarts, ``random_state=seed``: the calls of MTEB, TEMI and TURTLE.

Both read their input in row chunks (memory-mapped files through :class:`~sslbench.arrays.RowReader`),
so features need not fit in RAM; the k-means fit reads one shuffled batch at a time, in the order the
paper's code feeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sslbench import hookimpl
from sslbench.arrays import RowReader, projection_scale, require_in_memory
from sslbench.interfaces import (
    BackendEntry,
    Clusterer,
    ClustererConfig,
    Reducer,
    ReducerConfig,
    iter_chunks,
)

NAME = "reference"


def pca_batch_size(n_features: int) -> int:
    """The paper's IncrementalPCA batch size: max(4096, 2·d)."""
    return max(4096, 2 * n_features)


class ReferencePCA(Reducer):
    def __init__(self, config: ReducerConfig) -> None:
        self.config = config
        self._pca: Any = None  # sklearn's IncrementalPCA once fitted
        #: The fit saw the features times 2**_exponent (0 for features of ordinary magnitude).
        self._exponent = 0

    def fit(self, features: np.ndarray) -> None:
        reader = RowReader(features)
        batch = pca_batch_size(reader.dims)
        from sklearn.decomposition import IncrementalPCA  # here: listing plugins must not load scikit-learn

        pca = IncrementalPCA(n_components=None, batch_size=batch)
        for rows in iter_chunks(len(reader), batch):
            x = reader.rows(rows, as_float32=False)
            if rows.start == 0:
                # IncrementalPCA keeps float32 input in float32, whose squared singular values overflow
                # for features of magnitude 1e20 and underflow for 1e-30: such features are fitted
                # scaled by a power of two (exact; the components do not change), chosen on the first batch.
                self._exponent = projection_scale(float(np.abs(x).max()))
            # Constant features (a collapsed model's) have no variance: scikit-learn's explained
            # variance *ratio*, which nothing here uses, is then 0/0. Overflow still warns.
            with np.errstate(divide="ignore", invalid="ignore"):
                pca.partial_fit(np.ldexp(x, self._exponent) if self._exponent else x)
            if self.config.on_rows:
                self.config.on_rows(rows.stop - rows.start)
        reader.release()
        self._pca = pca

    @property
    def n_components(self) -> int:
        return int(self._fitted().n_components_)

    def _fitted(self) -> Any:
        if self._pca is None:
            raise RuntimeError("ReferencePCA.transform called before fit")
        return self._pca

    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        pca = self._fitted()
        n = n_components
        components = pca.components_[:n].T
        if self._exponent:
            rows = np.ldexp(rows, self._exponent)
        projected = rows @ components - pca.mean_ @ components
        if whiten:
            projected /= np.sqrt(pca.explained_variance_[:n])
        elif self._exponent:
            projected = np.ldexp(projected, -self._exponent)
        return projected.astype(np.float32)


class ReferenceKMeans(Clusterer):
    def __init__(self, config: ClustererConfig) -> None:
        self.config = config
        self._kmeans: Any = None  # sklearn's MiniBatchKMeans once fitted

    def fit(self, features: np.ndarray) -> None:
        if self.config.algorithm == "minibatch":
            self._fit_epochs(features)
        else:
            self._fit_whole(features)

    def _fit_whole(self, features: np.ndarray) -> None:
        """scikit-learn's own ``fit`` on the whole matrix, configured as the presets' peers configure it:
        ``MiniBatchKMeans(batch_size, n_init, max_iter)`` (MTEB) or ``KMeans(n_init, max_iter, tol)``
        (TEMI, TURTLE without cuML), seeded with the run's seed."""
        cfg = self.config
        require_in_memory(features.shape[0] * features.shape[1] * 4, f"backend 'reference' ({cfg.algorithm} fit)")
        reader = RowReader(features)
        x = reader.rows(slice(0, len(reader)))
        reader.release()
        from sklearn.cluster import KMeans, MiniBatchKMeans

        common = {
            "n_clusters": cfg.n_clusters,
            "n_init": cfg.n_init,
            "max_iter": cfg.max_iter,
            "random_state": cfg.seed,
        }
        if cfg.algorithm == "lloyd":
            self._kmeans = KMeans(tol=cfg.tol, **common).fit(x)
        else:
            self._kmeans = MiniBatchKMeans(batch_size=cfg.batch_size, **common).fit(x)

    def _fit_epochs(self, features: np.ndarray) -> None:
        cfg = self.config
        rng = np.random.RandomState(cfg.seed)
        from sklearn.cluster import MiniBatchKMeans

        kmeans = MiniBatchKMeans(
            n_clusters=cfg.n_clusters,
            batch_size=cfg.batch_size,
            max_no_improvement=None,
            random_state=rng,
        )
        reader = RowReader(features)
        order = np.arange(len(reader))
        for _ in range(cfg.epochs):
            rng.shuffle(order)
            for rows in iter_chunks(len(order), cfg.batch_size):
                batch = order[rows]
                # Gathered in file order (bounded memory), fed in the shuffled order the paper's code uses.
                ascending = np.argsort(batch, kind="stable")
                x = np.empty((len(batch), reader.dims), dtype=np.float32)
                x[ascending] = reader.gather(batch[ascending])
                kmeans.partial_fit(x)
            if cfg.on_epoch:
                cfg.on_epoch()
        reader.release()
        self._kmeans = kmeans

    def predict(self, features: np.ndarray) -> np.ndarray:
        if self._kmeans is None:
            raise RuntimeError("ReferenceKMeans.predict called before fit")
        reader = RowReader(features)
        out = np.empty(len(reader), dtype=np.int64)
        for rows in iter_chunks(len(reader)):
            out[rows] = self._kmeans.predict(reader.rows(rows))
        reader.release()
        return out


@hookimpl
def sslbench_register_backends(register: Callable[[BackendEntry], None]) -> None:
    register(
        BackendEntry(
            NAME,
            pca=ReferencePCA,
            kmeans=ReferenceKMeans,
            description="the paper's code: scikit-learn IncrementalPCA + MiniBatchKMeans, shuffled partial_fit epochs; "
            "or scikit-learn's MiniBatchKMeans.fit / KMeans (Lloyd) with restarts, as other suites call them",
            algorithms=("minibatch", "minibatch_fit", "lloyd"),
            restarts=("minibatch_fit", "lloyd"),  # the paper's loop (minibatch) fits once
        )
    )
