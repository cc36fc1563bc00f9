"""Scoring across datasets and over groups of classes: the paper's ObjectNet protocols.

* **Class groups** (Table 2): clusters fitted on a dataset that declares groups of its classes
  (ObjectNet: the classes ImageNet has and those it lacks) are also scored per group — every metric
  with the same train assignment, over the eval samples of the group's classes only
  (``acc_in_imagenet``; see :mod:`sslbench.pipeline`).
* **Transfer** (Table C.2): clusters fitted on a *source* dataset (ImageNet train) predict a *target*
  dataset (ObjectNet), scored on the target classes that map onto source classes. A target class
  may map onto several source classes (ObjectNet's are unions of ImageNet classes):

  - ``acc_tr``: each cluster takes its source class from the **source train** assignment; a target
    sample is right when that class is one of its class's source classes;
  - ``acc_val``: a Hungarian assignment of clusters to target classes built on the target itself;
  - ``ari``, ``ami``, ``nmi``: the clusters against the target labels;
  - ``single_cluster``: ``acc_val`` of putting everything in one cluster (the largest class's
    share), the chance level the paper quotes beside these numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sslbench.errors import SSLBenchError
from sslbench.protocol import contingency, hungarian_mapping, mapped_accuracy
from sslbench.results import MetricInfo

#: Metrics of a transfer run, in the column order of the paper's Table C.2.
TRANSFER_METRICS = ("acc_tr", "acc_val", "ari", "ami", "nmi", "single_cluster")

#: How the reports show them (``ari``, ``ami`` and ``nmi`` keep the registered metrics' descriptors
#: where those are registered).
TRANSFER_METRIC_INFO = {
    "acc_tr": MetricInfo(
        label="ACC-tr",
        description="each cluster's source-train class; right when it is a source class of the target class",
    ),
    "acc_val": MetricInfo(
        label="ACC-val", description="Hungarian assignment of clusters to target classes built on the target"
    ),
    "ari": MetricInfo(label="ARI", description="adjusted Rand index against the target labels"),
    "ami": MetricInfo(label="AMI", description="adjusted mutual information against the target labels"),
    "nmi": MetricInfo(label="NMI", description="normalised mutual information against the target labels"),
    "single_cluster": MetricInfo(
        label="1 cluster", description="acc_val of one cluster holding everything: the chance level"
    ),
}


def checked_class_groups(groups: object, n_classes: int, where: str) -> dict[str, np.ndarray]:
    """``{group: sorted class indices}`` from a dataset's ``metadata["class_groups"]``."""
    if not isinstance(groups, Mapping):
        raise SSLBenchError(f"{where}: class_groups must map a group name to a list of class indices")
    checked = {}
    for name, classes in groups.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise SSLBenchError(f"{where}: class group name {name!r} must be an identifier (letters, digits, _)")
        indices = np.asarray(classes, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= n_classes):
            raise SSLBenchError(f"{where}: class group '{name}' names a class outside [0, {n_classes})")
        checked[name] = np.unique(indices)
    return checked


@dataclass(frozen=True)
class ClassMap:
    """Target class → the source classes it corresponds to (empty: not in the source)."""

    targets: tuple[tuple[int, ...], ...]
    n_source: int

    @classmethod
    def checked(cls, raw: object, n_target: int, n_source: int, where: str) -> ClassMap:
        if not isinstance(raw, Sequence) or len(raw) != n_target:
            size = len(raw) if isinstance(raw, Sequence) else "no list"
            raise SSLBenchError(
                f"{where}: the class map must list source classes for each of {n_target} classes, got {size}"
            )
        targets = []
        for index, sources in enumerate(raw):
            values = tuple(int(s) for s in sources)
            if any(s < 0 or s >= n_source for s in values):
                raise SSLBenchError(f"{where}: class {index} maps to a class outside the source's [0, {n_source})")
            targets.append(values)
        if not any(targets):
            raise SSLBenchError(f"{where}: no class maps onto a source class; nothing could be scored")
        return cls(tuple(targets), n_source)

    @functools.cached_property
    def shared(self) -> np.ndarray:
        """Target classes that map onto at least one source class."""
        return np.array([i for i, sources in enumerate(self.targets) if sources], dtype=np.int64)

    @functools.cached_property
    def membership(self) -> np.ndarray:
        """``M[t, s]``: source class ``s`` is one of target class ``t``'s."""
        out = np.zeros((len(self.targets), self.n_source), dtype=bool)
        for t, sources in enumerate(self.targets):
            out[t, list(sources)] = True
        return out

    def composed_assignment(self, source_assignment: np.ndarray) -> np.ndarray:
        """Cluster → target class (numbered over :attr:`shared`) through each cluster's source class:
        the first shared target class that contains it, -1 when none does. For maps where a source
        class belongs to one target class at most (ObjectNet's), ACC under this assignment is
        ``acc_tr``; ``acc_tr`` itself is exact for any map."""
        shared = self.membership[self.shared]  # (m shared targets, n_source)
        has_target = shared.any(axis=0)
        first_target = np.where(has_target, shared.argmax(axis=0), -1)
        return first_target[source_assignment].astype(np.int64)


def transfer_scores(
    train_assignment: np.ndarray,
    target_pred: np.ndarray,
    target_labels: np.ndarray,
    class_map: ClassMap,
    n_clusters: int,
) -> tuple[dict[str, float], int]:
    """The Table C.2 metrics of one fitted clustering, and the number of target samples scored.

    ``train_assignment`` maps each cluster to a source class (the source train split's assignment).
    """
    scored = np.isin(target_labels, class_map.shared)
    pred, labels = target_pred[scored], target_labels[scored]
    if len(labels) == 0:
        raise SSLBenchError("no target sample belongs to a class that maps onto the source classes")
    from sklearn import metrics as skm  # imported here: start-up commands need not load scikit-learn

    acc_tr = float(np.mean(class_map.membership[labels, train_assignment[pred]]))
    # Target classes renumbered 0..m-1 over the shared ones, so the assignment ignores the others.
    dense = np.searchsorted(class_map.shared, labels)
    target_cost = contingency(pred, dense, n_clusters, len(class_map.shared))
    acc_val = mapped_accuracy(hungarian_mapping(target_cost), pred, dense)
    metrics = {
        "acc_tr": acc_tr,
        "acc_val": acc_val,
        "ari": float(skm.adjusted_rand_score(dense, pred)),
        "ami": float(skm.adjusted_mutual_info_score(dense, pred, average_method="arithmetic")),
        "nmi": float(skm.normalized_mutual_info_score(dense, pred, average_method="arithmetic")),
        "single_cluster": float(np.bincount(dense).max() / len(dense)),
    }
    return metrics, len(labels)
