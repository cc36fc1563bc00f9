"""Per-cluster inspection of saved predictions: the purest and the least pure clusters.

Reads the ``predictions/*.npz`` files that ``sslbench run --save-predictions`` writes. Purity is the
share of a cluster's samples that belong to its majority class; clusters smaller than ``min_size``
are left out of both lists, as the paper's code did (it ignored clusters under 10 samples).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslbench.errors import SSLBenchError


@dataclass(frozen=True)
class ClusterStat:
    cluster: int
    size: int
    majority_class: int
    purity: float


def cluster_stats(pred: np.ndarray, labels: np.ndarray) -> list[ClusterStat]:
    """Size, majority class and purity of every non-empty cluster."""
    n_clusters, n_classes = int(pred.max()) + 1, int(labels.max()) + 1
    counts = np.bincount(pred * n_classes + labels, minlength=n_clusters * n_classes).reshape(n_clusters, n_classes)
    sizes = counts.sum(axis=1)
    stats = []
    for cluster in np.flatnonzero(sizes):
        majority = int(counts[cluster].argmax())
        stats.append(
            ClusterStat(int(cluster), int(sizes[cluster]), majority, counts[cluster, majority] / sizes[cluster])
        )
    return stats


def purest_and_least_pure(
    stats: list[ClusterStat], top: int, min_size: int
) -> tuple[list[ClusterStat], list[ClusterStat]]:
    eligible = [s for s in stats if s.size >= min_size]
    ranked = sorted(eligible, key=lambda s: (-s.purity, -s.size, s.cluster))
    return ranked[:top], sorted(eligible, key=lambda s: (s.purity, -s.size, s.cluster))[:top]


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def find_predictions(run_dir: Path, model: str, dataset: str | None, seed: int, clusters: int | None) -> Path:
    """The predictions file of one run; ambiguity (several datasets or protocol points) is an error."""
    folder = run_dir / "predictions"
    if not folder.is_dir():
        raise SSLBenchError(f"{run_dir} has no predictions/ folder: run with --save-predictions")
    prefix = f"{_stem(model)}__{_stem(dataset)}__" if dataset else f"{_stem(model)}__"
    found = [
        path
        for path in sorted(folder.glob(f"{prefix}*__seed{seed}.npz"))
        if clusters is None or f"__k{clusters}_" in path.name
    ]
    if not found:
        raise SSLBenchError(f"no predictions for model '{model}' seed {seed} in {folder}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SSLBenchError(f"several runs match ({names}); choose with --dataset and --clusters")
    return found[0]
