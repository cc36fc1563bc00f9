"""Label-free scores: how good the clusters are without class labels.

Silhouette, Davies–Bouldin and Calinski–Harabasz judge the eval split's clusters in the space the
k-means was fitted in (the PCA projection, :attr:`ScoringContext.eval_space`); RankMe (Garrido et al.
2023, "RankMe: Assessing the downstream performance of pretrained self-supervised representations by
their rank", arXiv:2210.02885) is the effective rank of the eval split's raw features.

Each follows scikit-learn's definition (``sklearn.metrics.silhouette_score``, ``davies_bouldin_score``,
``calinski_harabasz_score``: clusters without rows do not count) but reads its rows in chunks, so a
split of 1.28M × 2048 memory-mapped rows is scored in bounded memory:

* Davies–Bouldin and Calinski–Harabasz are exact over all rows, in two streamed passes (per-cluster
  sums, then distances to the centroids);
* silhouette is exact on a sample of at most ``protocol.silhouette_rows`` rows, the first rows of
  ``numpy.random.RandomState(run seed).permutation(n)`` (scikit-learn's own ``sample_size`` draw);
* RankMe accumulates the d × d Gram matrix in float64 over row chunks; its eigenvalues are the squared
  singular values.

Where scikit-learn refuses (fewer than two non-empty clusters, or as many clusters as rows) the score
is NaN. RankMe is computed once per model × split, whatever the protocol points and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from sslbench import hookimpl
from sslbench.arrays import RowReader, require_in_memory
from sslbench.interfaces import DEFAULT_CHUNK_ROWS, MetricEntry, ScoringContext, iter_chunks

#: RankMe's epsilon (Garrido et al. 2023, Eq. 1: p_k = σ_k / ‖σ‖₁ + ε).
RANKME_EPSILON = 1e-7
#: Bytes of one block of pairwise distances the silhouette holds at a time.
_DISTANCE_BLOCK_BYTES = 1 << 26


def _chunks(array: np.ndarray, rows: np.ndarray | None) -> Iterator[tuple[slice, np.ndarray]]:
    """``array``'s rows (all, or those at the ascending indices ``rows``) in chunks, as float64,
    with the positions each chunk holds among the scored rows."""
    reader = RowReader(array)
    try:
        total = len(reader) if rows is None else len(rows)
        for where in iter_chunks(total, DEFAULT_CHUNK_ROWS):
            chunk = reader.rows(where, as_float32=False) if rows is None else reader.gather(rows[where])
            yield where, chunk.astype(np.float64)
    finally:
        reader.release()


def _cluster_sums(array: np.ndarray, rows: np.ndarray | None, labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Per-cluster sums of the scored rows (``labels`` dense in ``[0, n_labels)``), float64."""
    sums = np.zeros((n_labels, array.shape[1]))
    for where, chunk in _chunks(array, rows):
        sums += _one_hot(labels[where], n_labels) @ chunk
    return sums


def _one_hot(labels: np.ndarray, n_labels: int) -> Any:
    """The sparse ``n_labels × len(labels)`` matrix whose product with rows sums them per cluster."""
    from scipy import sparse

    return sparse.csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), shape=(n_labels, len(labels)))


def _dense_labels(pred: np.ndarray) -> tuple[np.ndarray, int]:
    """Cluster ids renumbered over the non-empty clusters (scikit-learn's ``LabelEncoder``)."""
    present, dense = np.unique(pred, return_inverse=True)
    return dense.astype(np.int64), len(present)


def _scorable(n_labels: int, n_samples: int) -> bool:
    """scikit-learn's ``check_number_of_labels``: 2 ≤ clusters ≤ samples − 1."""
    return 2 <= n_labels <= n_samples - 1


def calinski_harabasz(space: np.ndarray, pred: np.ndarray, rows: np.ndarray | None = None) -> float:
    """``sklearn.metrics.calinski_harabasz_score`` of the scored rows of ``space``, streamed."""
    labels, n_labels = _dense_labels(pred)
    n = len(labels)
    if not _scorable(n_labels, n):
        return math.nan
    counts = np.bincount(labels, minlength=n_labels).astype(np.float64)
    sums = _cluster_sums(space, rows, labels, n_labels)
    centroids = sums / counts[:, None]
    mean = sums.sum(axis=0) / n
    extra = float(np.sum(counts * np.sum((centroids - mean) ** 2, axis=1)))
    intra = 0.0
    for where, chunk in _chunks(space, rows):
        intra += float(np.sum((chunk - centroids[labels[where]]) ** 2))
    return 1.0 if intra == 0.0 else extra * (n - n_labels) / (intra * (n_labels - 1.0))


def davies_bouldin(space: np.ndarray, pred: np.ndarray, rows: np.ndarray | None = None) -> float:
    """``sklearn.metrics.davies_bouldin_score`` of the scored rows of ``space``, streamed."""
    labels, n_labels = _dense_labels(pred)
    if not _scorable(n_labels, len(labels)):
        return math.nan
    counts = np.bincount(labels, minlength=n_labels).astype(np.float64)
    centroids = _cluster_sums(space, rows, labels, n_labels) / counts[:, None]
    spread = np.zeros(n_labels)
    for where, chunk in _chunks(space, rows):
        spread += np.bincount(
            labels[where], weights=np.linalg.norm(chunk - centroids[labels[where]], axis=1), minlength=n_labels
        )
    spread /= counts
    squares = np.einsum("ij,ij->i", centroids, centroids)
    block = max(1, _DISTANCE_BLOCK_BYTES // (8 * n_labels))
    worst = np.empty(n_labels)
    all_close = bool(np.all(np.isclose(spread, 0.0)))
    centroids_close = True
    for where in iter_chunks(n_labels, block):
        distances = np.sqrt(
            np.maximum(squares[where, None] - 2 * centroids[where] @ centroids.T + squares[None, :], 0.0)
        )
        distances[np.arange(where.stop - where.start), np.arange(where.start, where.stop)] = 0.0
        centroids_close = centroids_close and bool(np.all(np.isclose(distances, 0.0)))
        distances[distances == 0] = np.inf
        worst[where] = np.max((spread[where, None] + spread[None, :]) / distances, axis=1)
    if all_close or centroids_close:
        return 0.0
    return float(np.mean(worst))


def silhouette_sample(n_rows: int, sample_rows: int, seed: int) -> np.ndarray:
    """Positions (ascending) of the rows the silhouette reads: the first ``sample_rows`` of
    ``RandomState(seed).permutation(n_rows)``, as ``silhouette_score(sample_size=…, random_state=seed)``
    draws them; every row when there are no more than ``sample_rows``."""
    if n_rows <= sample_rows:
        return np.arange(n_rows)
    return np.sort(np.random.RandomState(seed).permutation(n_rows)[:sample_rows])


def silhouette(
    space: np.ndarray, pred: np.ndarray, sample_rows: int, seed: int, rows: np.ndarray | None = None
) -> float:
    """``sklearn.metrics.silhouette_score`` (Euclidean) of the scored rows of ``space`` on the sample
    :func:`silhouette_sample` draws, computed in blocks of pairwise distances."""
    positions = silhouette_sample(len(pred), sample_rows, seed)
    labels, n_labels = _dense_labels(pred[positions])
    m = len(positions)
    if not _scorable(n_labels, m):
        return math.nan
    require_in_memory(m * space.shape[1] * 8, f"the silhouette's sample of {m} rows")
    index = positions if rows is None else rows[positions]
    reader = RowReader(space)
    try:
        sample = np.concatenate(
            [reader.gather(index[where]).astype(np.float64) for where in iter_chunks(m, DEFAULT_CHUNK_ROWS)]
        )
    finally:
        reader.release()
    counts = np.bincount(labels, minlength=n_labels)
    one_hot = _one_hot(labels, n_labels)
    squares = np.einsum("ij,ij->i", sample, sample)
    block = max(1, _DISTANCE_BLOCK_BYTES // (8 * m))
    values = np.empty(m)
    for where in iter_chunks(m, block):
        distances = np.sqrt(np.maximum(squares[where, None] - 2 * sample[where] @ sample.T + squares[None, :], 0.0))
        distances[np.arange(where.stop - where.start), np.arange(where.start, where.stop)] = 0.0
        per_cluster = np.asarray(one_hot @ distances.T).T
        own = labels[where]
        inside = per_cluster[np.arange(len(own)), own]
        per_cluster /= counts
        per_cluster[np.arange(len(own)), own] = np.inf
        nearest = per_cluster.min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            within = inside / (counts[own] - 1)
            value = np.nan_to_num((nearest - within) / np.maximum(within, nearest))
        value[counts[own] == 1] = 0.0
        values[where] = value
    return float(np.mean(values))


def rankme(features: np.ndarray, rows: np.ndarray | None = None) -> float:
    """RankMe of the scored rows of ``features`` (exp of the entropy of the normalised singular values,
    each plus :data:`RANKME_EPSILON`), from the float64 Gram matrix accumulated in row chunks; NaN for
    an all-zero matrix, whose normalised singular values do not exist."""
    dims = features.shape[1]
    gram = np.zeros((dims, dims))
    n = 0
    for _, chunk in _chunks(features, rows):
        gram += chunk.T @ chunk
        n += len(chunk)
    eigenvalues = np.clip(np.linalg.eigvalsh(gram)[::-1][: min(n, dims)], 0.0, None)
    singular = np.sqrt(eigenvalues)
    if singular.sum() == 0:
        return math.nan
    p = singular / singular.sum() + RANKME_EPSILON
    return float(np.exp(-np.sum(p * np.log(p))))


def _in_space(score: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]) -> Callable[[ScoringContext], float]:
    def metric(ctx: ScoringContext) -> float:
        if ctx.eval_space is None:
            return math.nan
        return score(ctx.eval_space, ctx.eval_pred, ctx.eval_rows)

    return metric


def _silhouette(ctx: ScoringContext) -> float:
    if ctx.eval_space is None:
        return math.nan
    return silhouette(ctx.eval_space, ctx.eval_pred, ctx.silhouette_rows, ctx.seed, ctx.eval_rows)


def _rankme(ctx: ScoringContext) -> float:
    if ctx.eval_features is None:
        return math.nan
    if "rankme" not in ctx.shared:
        ctx.shared["rankme"] = rankme(ctx.eval_features, ctx.eval_rows)
    return float(ctx.shared["rankme"])


def _rankme_fit(ctx: ScoringContext) -> float:
    if ctx.fit_features is None:
        return math.nan
    if "rankme_fit" not in ctx.shared:
        ctx.shared["rankme_fit"] = rankme(ctx.fit_features)
    return float(ctx.shared["rankme_fit"])


@hookimpl
def sslbench_register_metrics(register: Callable[[MetricEntry], None]) -> None:
    register(
        MetricEntry(
            "silhouette",
            _silhouette,
            "Sil",
            "silhouette (Euclidean) in the clustered space, on at most protocol.silhouette_rows eval rows "
            "drawn with the run's seed",
            unit="raw",
            needs_labels=False,
            decimals=3,
        )
    )
    register(
        MetricEntry(
            "davies_bouldin",
            _in_space(davies_bouldin),
            "DB",
            "Davies–Bouldin index in the clustered space, all eval rows",
            unit="raw",
            better="lower",
            needs_labels=False,
            decimals=3,
        )
    )
    register(
        MetricEntry(
            "calinski_harabasz",
            _in_space(calinski_harabasz),
            "CH",
            "Calinski–Harabasz index in the clustered space, all eval rows",
            unit="raw",
            needs_labels=False,
            decimals=1,
        )
    )
    register(
        MetricEntry(
            "rankme",
            _rankme,
            "RankMe",
            "effective rank of the eval split's raw features (Garrido et al. 2023, arXiv:2210.02885)",
            unit="raw",
            needs_labels=False,
            decimals=1,
        )
    )
    register(
        MetricEntry(
            "rankme_fit",
            _rankme_fit,
            "RankMe fit",
            "effective rank of the raw features of the split the clusters were fitted on (RankMe, as rankme)",
            unit="raw",
            needs_labels=False,
            decimals=1,
        )
    )
