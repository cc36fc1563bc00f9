"""The weighted kNN probe (DINO's protocol, :mod:`sslbench.knn`): top-1 for each k of its options.

Recorded as ``knn_top1_k<k>``; the card's ``knn_top1`` (DINO's 20-NN on ImageNet-1k) is its published
value for k = 20 on 1000-class data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sslbench import hookimpl
from sslbench.interfaces import ProbeData, ProbeEntry, ProbeOutcome
from sslbench.knn import DEFAULT_TEMPERATURE, check_knn, knn_top1
from sslbench.results import MetricInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from sslbench.cards import ModelCard

#: The most neighbours a spec may ask for.
MAX_K = 4096
#: The k of the cards' published kNN top-1 (DINO's protocol), on ImageNet-1k.
PUBLISHED_K = 20


class KnnOptions(BaseModel):
    """The neighbour counts and the temperature of the votes ``exp(sim / T)``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    k: list[Annotated[int, Field(ge=1, le=MAX_K)]] = Field(
        default=[PUBLISHED_K], min_length=1, description="neighbour counts, each recorded as knn_top1_k<k>"
    )
    temperature: float = Field(
        DEFAULT_TEMPERATURE, gt=0, le=1e6, allow_inf_nan=False, description="T of the neighbour weights exp(sim / T)"
    )

    @field_validator("k", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("k")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"has repeated values: {value}")
        return sorted(value)


def knn_metric(k: int) -> str:
    """Name of the kNN top-1 for ``k`` neighbours: ``knn_top1_k20``."""
    return f"knn_top1_k{k}"


def _options(options: BaseModel) -> KnnOptions:
    assert isinstance(options, KnnOptions)
    return options


def metrics(options: BaseModel) -> dict[str, MetricInfo]:
    return {
        knn_metric(k): MetricInfo(
            label=f"kNN-{k}", description=f"weighted {k}-NN top-1 on the raw features (cosine, exp(sim/T))"
        )
        for k in _options(options).k
    }


def run(data: ProbeData, options: BaseModel) -> ProbeOutcome:
    opts = _options(options)
    result = knn_top1(
        data.train_features,
        data.train_labels,
        data.eval_features,
        data.eval_labels,
        opts.k,
        n_classes=data.n_classes,
        temperature=opts.temperature,
        device=data.device,
    )
    return ProbeOutcome({knn_metric(k): result.top1[k] for k in opts.k})


def check(options: BaseModel, n_train: int, split: str) -> None:
    check_knn(_options(options).k, n_train, split)


def published(card: ModelCard, n_classes: int, options: BaseModel) -> dict[str, tuple[float, str]]:
    if card.knn_top1 is None or n_classes != 1000 or PUBLISHED_K not in _options(options).k:
        return {}
    return {knn_metric(PUBLISHED_K): (card.knn_top1.value / 100, card.knn_top1.source)}


@hookimpl
def sslbench_register_probes(register: Callable[[ProbeEntry], None]) -> None:
    register(
        ProbeEntry(
            "knn",
            run,
            metrics,
            "weighted kNN top-1 on the raw features (DINO: cosine, exp(sim/T) votes, T = 0.07)",
            KnnOptions,
            check,
            published,
        )
    )
