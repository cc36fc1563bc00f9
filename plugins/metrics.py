"""The paper's metrics: ACC (three assignments), ARI, AMI, NMI, V-measure and Fowlkes–Mallows.

ACC uses the assignment built on the **train** split; ``acc_majority`` maps each cluster to its
majority train class; ``acc_eval_assignment`` builds the Hungarian assignment on the eval split
itself. The partition metrics compare the eval predictions with the eval labels and are
scikit-learn's own functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from sslbench import hookimpl
from sslbench.interfaces import MetricEntry, ScoringContext
from sslbench.protocol import hungarian_mapping, majority_mapping, mapped_accuracy


def acc(ctx: ScoringContext) -> float:
    return mapped_accuracy(ctx.train_assignment, ctx.eval_pred, ctx.eval_labels)


def acc_majority(ctx: ScoringContext) -> float:
    return mapped_accuracy(majority_mapping(ctx.train_contingency), ctx.eval_pred, ctx.eval_labels)


def acc_eval_assignment(ctx: ScoringContext) -> float:
    return mapped_accuracy(hungarian_mapping(ctx.eval_contingency), ctx.eval_pred, ctx.eval_labels)


def _partition(name: str, **kwargs: str) -> Callable[[ScoringContext], float]:
    """scikit-learn's ``sklearn.metrics.<name>`` of the eval labels and clusters (scikit-learn is
    imported at the first score, not when plugins load)."""

    def metric(ctx: ScoringContext) -> float:
        return float(_sklearn_metric(name)(ctx.eval_labels, ctx.eval_pred, **kwargs))

    return metric


@functools.cache
def _sklearn_metric(name: str) -> Any:
    from sklearn import metrics

    return getattr(metrics, name)


@hookimpl
def sslbench_register_metrics(register: Callable[[MetricEntry], None]) -> None:
    register(MetricEntry("acc", acc, "ACC", "Hungarian assignment built on the train split"))
    register(MetricEntry("acc_majority", acc_majority, "ACC-maj", "majority train class per cluster"))
    register(MetricEntry("acc_eval_assignment", acc_eval_assignment, "ACC-eval", "Hungarian assignment built on eval"))
    register(MetricEntry("ari", _partition("adjusted_rand_score"), "ARI", "adjusted Rand index"))
    register(
        MetricEntry(
            "ami",
            _partition("adjusted_mutual_info_score", average_method="arithmetic"),
            "AMI",
            "adjusted mutual information (arithmetic)",
        )
    )
    register(
        MetricEntry(
            "nmi",
            _partition("normalized_mutual_info_score", average_method="arithmetic"),
            "NMI",
            "normalised mutual information (arithmetic)",
        )
    )
    register(MetricEntry("v_measure", _partition("v_measure_score"), "V", "V-measure"))
    register(MetricEntry("fowlkes_mallows", _partition("fowlkes_mallows_score"), "FM", "Fowlkes–Mallows index"))
