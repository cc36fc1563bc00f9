"""The linear probe: DINOv2's logistic-regression protocol (:mod:`sslbench.engine.logistic`) on the raw
features, on the spec's device.

Recorded as ``linear_top1`` and ``linear_top5``, with the chosen C (and the held-out top-1 at it) among
the probe's details; non-convergence and linearly separated train rows are the probe's notes. The card's
``linear_top1`` is its published value on 1000-class data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field

from sslbench import hookimpl
from sslbench.engine.logistic import LogisticOptions, dinov2_c_values, linear_probe
from sslbench.interfaces import ProbeData, ProbeEntry, ProbeOutcome
from sslbench.results import MetricInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from sslbench.cards import ModelCard

METRICS = {
    "linear_top1": MetricInfo(
        label="Linear top-1", description="logistic-regression probe top-1 (DINOv2 protocol, C chosen on held-out)"
    ),
    "linear_top5": MetricInfo(label="Linear top-5", description="logistic-regression probe top-5"),
}


class LinearOptions(LogisticOptions):
    """The solver's options (DINOv2's protocol by default), with the C values as a spec writes them: a
    list of positive finite numbers."""

    c_values: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = Field(
        default_factory=dinov2_c_values,
        min_length=1,
        strict=False,
        description="inverse regularisation strengths swept (default: DINOv2's 45 values 10^t, t in [-6, 5])",
    )


def _options(options: BaseModel) -> LogisticOptions:
    assert isinstance(options, LogisticOptions)
    return options


def metrics(options: BaseModel) -> dict[str, MetricInfo]:
    return dict(METRICS)


def run(data: ProbeData, options: BaseModel) -> ProbeOutcome:
    result = linear_probe(
        data.train_features,
        data.train_labels,
        data.eval_features,
        data.eval_labels,
        _options(options),
        device=data.device,
    )
    chosen = next(point for point in result.sweep if point.C == result.C)
    return ProbeOutcome(
        {"linear_top1": result.top1, "linear_top5": result.top5},
        {
            "C": result.C,
            "held_out_top1": chosen.held_out_top1,
            "refit_iterations": result.fit.iterations,
            "refit_converged": result.fit.converged,
        },
        result.warnings,
    )


def published(card: ModelCard, n_classes: int, options: BaseModel) -> dict[str, tuple[float, str]]:
    if card.linear_top1 is None or n_classes != 1000:
        return {}
    return {"linear_top1": (card.linear_top1.value / 100, card.linear_top1.source)}


@hookimpl
def sslbench_register_probes(register: Callable[[ProbeEntry], None]) -> None:
    register(
        ProbeEntry(
            "linear",
            run,
            metrics,
            "logistic-regression probe, DINOv2's protocol (45 C values, C chosen on a held-out tenth, top-1/top-5)",
            LinearOptions,
            published=published,
        )
    )
