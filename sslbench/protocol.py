"""The paper's scoring: cluster-to-class assignments built on the train split, applied to eval.

Following the paper and its code (``Randl/kmeans_selfsuper`` cluster.py):

* the cost matrix counts train samples per (cluster, class) — :func:`contingency`;
* a Hungarian assignment (scipy ``linear_sum_assignment``, maximising) gives every class one
  cluster; with more clusters than classes every unassigned cluster takes its majority class —
  :func:`hungarian_mapping`;
* that cluster → class mapping, applied to the eval predictions, gives ACC — :func:`mapped_accuracy`.
"""

from __future__ import annotations

import numpy as np


def contingency(pred: np.ndarray, labels: np.ndarray, n_clusters: int, n_classes: int) -> np.ndarray:
    """``C[c, y]`` = number of samples with cluster ``c`` and class ``y`` (int64)."""
    flat = pred.astype(np.int64) * n_classes + labels.astype(np.int64)
    counts = np.bincount(flat, minlength=n_clusters * n_classes)
    return counts.reshape(n_clusters, n_classes)


def hungarian_mapping(cost: np.ndarray) -> np.ndarray:
    """Class of every cluster: a maximum-weight one-to-one matching, then majority for the rest.

    With fewer clusters than classes, every cluster gets a distinct class and some classes none.
    A cluster left unmatched takes the class it holds most of (the first such class on ties, and
    class 0 for a cluster that is empty in ``cost``), as the paper's code does.
    """
    from scipy.optimize import linear_sum_assignment  # imported here: `sslbench --help` need not load scipy

    rows, cols = linear_sum_assignment(cost, maximize=True)
    mapping = cost.argmax(axis=1)
    mapping[rows] = cols
    return mapping.astype(np.int64)


def majority_mapping(cost: np.ndarray) -> np.ndarray:
    """Class of every cluster: the class it holds most of."""
    return cost.argmax(axis=1).astype(np.int64)


def mapped_accuracy(mapping: np.ndarray, pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose cluster maps to their class."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(mapping[pred] == labels))
