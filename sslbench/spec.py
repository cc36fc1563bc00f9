"""The run specification: a YAML file validated by pydantic, with errors that point at the line.

Validation has two stages. :func:`load_spec` checks structure and values (unknown keys, types,
ranges) and needs no plugins. :func:`resolve_spec` then checks every name against the loaded plugins
and validates each component's ``options`` with that component's own options model, so third-party
options are type-checked too.

A spec is JSON-typed YAML, read defensively (see :func:`parse_spec`): it is composed once, the node
graph is checked (tags, nesting, size with aliases expanded, no cycles) before anything is built from
it, and every problem, whatever the input, is one :class:`SSLBenchError` line naming the file and line.
"""

from __future__ import annotations

import gc
import math
import os
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sslbench.devices import DEVICE_PATTERN, missing_device, unavailable
from sslbench.errors import SSLBenchError, closest, did_you_mean
from sslbench.plugins import Plugins
from sslbench.predictions import file_stem, predictions_name

if TYPE_CHECKING:
    from sslbench.interfaces import ProbeEntry
    from sslbench.results import MetricInfo

# --------------------------------------------------------------------------------------------------
# Limits: every value a spec accepts is one that a run can use.

#: Largest spec file (bytes) or text (characters) that is read at all.
MAX_SPEC_BYTES = 1 << 20
#: Values in a spec, counting each alias as a full copy of what it refers to.
MAX_YAML_NODES = 100_000
#: Lists and mappings nested in one another, the document's top-level mapping included.
MAX_YAML_DEPTH = 64
#: A number longer than this (in characters) is refused before it is converted.
MAX_NUMBER_CHARS = 100
#: Seeds are C ints for faiss (numpy's RandomState needs < 2^32, torch's generators < 2^64).
MAX_SEED = 2**31 - 1
MAX_SEEDS = 10_000
#: Protocol points (the product of the sweep lists' lengths).
MAX_POINTS = 10_000
MAX_CLUSTERS = 2**24
MAX_PCA_DIMS = 2**20
MAX_EPOCHS = 2**20
MAX_BATCH = 2**24
MAX_RESTARTS = 1000
MAX_WORKERS = 256
MAX_LABEL = 200
MAX_RUN_NAME = 100
#: A predictions file name, plus the ``.<name>.<pid>.tmp`` it is first written as, fits in 255 bytes.
MAX_PREDICTIONS_NAME = 255 - len("..1234567.tmp")

#: The paper's k-means batch size rule, from its code: max(2048, 2^ceil(log2 k)).
MIN_KMEANS_BATCH = 2048


def default_kmeans_batch_size(n_clusters: int) -> int:
    return max(MIN_KMEANS_BATCH, 2 ** math.ceil(math.log2(n_clusters)))


def overclustered_k(k: int, factor: float) -> int:
    """Clusters for ``k`` classes at overclustering ``factor``, truncated as the paper's code does."""
    return max(1, int(factor * k + 1e-9))


# --------------------------------------------------------------------------------------------------
# Text that goes into one-line messages

_LINE_BREAKING = frozenset({"Cc", "Cs", "Zl", "Zp"})  # control, lone surrogates, line/paragraph separators


def _bad_chars(text: str) -> list[str]:
    return [ch for ch in text if unicodedata.category(ch) in _LINE_BREAKING]


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` with control characters (newlines included) and lone surrogates escaped, so that it
    prints as one line on any terminal; cut to ``limit`` characters (with ``…``) when given."""
    if _bad_chars(text):
        text = "".join(
            ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _LINE_BREAKING else ch
            for ch in text
        )
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _shown(value: Any, limit: int = 60) -> str:
    """``repr`` of an input value, one line, cut to ``limit`` characters."""
    return one_line(repr(value), limit)


def _plain_text(value: str) -> str:
    bad = _bad_chars(value)
    if bad:
        raise ValueError(f"must not contain control characters (found {_shown(bad[0])})")
    return value


#: An id, display name, split or backend name: printable on one line, 1..200 characters.
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL), AfterValidator(_plain_text)]


def _run_name(value: str) -> str:
    _plain_text(value)
    if "/" in value or "\\" in value or value in (".", ".."):
        raise ValueError("must be a plain file name (it names the folder runs/<name>): no / or \\, not . or ..")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


RunName = Annotated[str, Field(min_length=1, max_length=MAX_RUN_NAME), AfterValidator(_run_name)]
Folder = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]


def _located(message: str, *at: Any) -> PydanticCustomError:
    """A model-level error that :func:`validation_message` places at field path ``at``."""
    return PydanticCustomError("spec_conflict", "{message}", {"message": message, "at": at})


# --------------------------------------------------------------------------------------------------
# The spec model


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class ModelSpec(_StrictModel):
    """One backbone to evaluate."""

    id: Label = Field(description="Registered backbone name (see `sslbench models`).")
    name: Label | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backbone options.")
    optional: bool = Field(
        False,
        description="Skip (with a note) when the backbone's plugin is not installed or no local source has its weights "
        "(the Hugging Face and torch.hub caches, a package, a file count): never downloads. Weights that are present "
        "but fail their hash or do not load stop the run.",
    )

    @property
    def label(self) -> str:
        return self.name or self.id


class TransferSpec(_StrictModel):
    """Another dataset the fitted clusters are applied to (the paper's ImageNet → ObjectNet, Table C.2)."""

    id: Label = Field(description="Registered dataset name of the target.")
    name: Label | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Dataset options of the target.")
    split: Label = Field("test", description="Split of the target that is predicted and scored.")
    class_map: Label = Field(
        "imagenet_classes",
        description="Key of the target's metadata listing, per target class, the source classes it maps onto.",
    )

    @property
    def label(self) -> str:
        return self.name or self.id


class ProbeSpec(_StrictModel):
    """An evaluation that learns from the train split's labels (kNN, linear), run once per model × dataset."""

    id: Label = Field(description="Registered probe name (see `sslbench plugins`): knn, linear, a plugin's.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="The probe's options (knn: k, temperature; linear: c_values, …)."
    )


class DatasetSpec(_StrictModel):
    """One dataset, with the split k-means is fitted on and the split it is scored on."""

    id: Label = Field(description="Registered dataset name.")
    name: Label | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Dataset options.")
    fit_split: Label = Field("train", description="Split that PCA and k-means are fitted on.")
    eval_split: Label = Field("val", description="Split that is predicted and scored.")
    transfer: list[TransferSpec] = Field(
        default_factory=list, description="Datasets the clusters fitted here are also applied to."
    )

    @property
    def label(self) -> str:
        return self.name or self.id


PcaDims = Annotated[int, Field(ge=1, le=MAX_PCA_DIMS)]
Clusters = Annotated[int, Field(ge=1, le=MAX_CLUSTERS)]
Overcluster = Annotated[float, Field(ge=1.0, le=MAX_CLUSTERS, allow_inf_nan=False)]
Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
Batch = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
#: The silhouette's sample holds its rows and a block of their distances in memory (2^16 rows of
#: 2048 float64 dims: 1 GB).
MAX_SILHOUETTE_ROWS = 1 << 16


class ProtocolSpec(_StrictModel):
    """The clustering protocol. List-valued fields sweep: every combination is run.

    ``preset`` names published protocols (``sslbench_registry/presets``); every field the spec gives
    explicitly overrides the preset's value, the others come from the preset (:meth:`for_preset`).
    """

    preset: list[Label] = Field(
        default=["zheltonozhskii2020"],
        description="Published protocol(s) this one follows: zheltonozhskii2020 (the paper), mieb, temi, turtle "
        "(see README, Comparing with other suites); a list runs each and compares them. Fields given here "
        "override the preset's.",
    )
    pca: bool = Field(True, description="PCA before k-means (false: k-means on the raw features).")
    pca_dims: list[PcaDims | None] = Field(
        default=[None], description="PCA dimensions (each at most 2^20); null keeps all components."
    )
    whiten: bool = Field(False, description="Scale PCA components to unit variance.")
    k: list[Clusters | None] = Field(
        default=[None], description="Clusters before overclustering (each at most 2^24); null = classes."
    )
    overcluster: list[Overcluster] = Field(
        default=[1.0], description="Clusters = int(overcluster × k), at most 2^24 of them."
    )
    epochs: list[Epochs] = Field(default=[60], description="k-means epochs (each at most 2^20).")
    batch_size: Batch | None = Field(
        None, description="k-means batch size, at most 2^24; null = max(2048, 2^ceil(log2 clusters))."
    )
    algorithm: Literal["minibatch", "minibatch_fit", "lloyd"] = Field(
        "minibatch",
        description="k-means: `minibatch` (the paper: `epochs` shuffled passes of `batch_size`), `minibatch_fit` "
        "(scikit-learn's MiniBatchKMeans.fit: `max_iter` passes of random batches, early stop) or `lloyd` "
        "(full batch, `max_iter` iterations, `tol`). A backend refuses one it cannot run.",
    )
    n_init: Annotated[int, Field(ge=1, le=MAX_RESTARTS)] = Field(
        1, description="k-means restarts, the lowest inertia kept (at most 1000)."
    )
    max_iter: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = Field(
        300, description="lloyd: iterations at most; minibatch_fit: passes over the data at most."
    )
    tol: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = Field(
        1e-4, description="lloyd: stop when the centres move less (relative to the features' variance)."
    )
    fit_on: Literal["fit_split", "eval_split"] = Field(
        "fit_split", description="The dataset split PCA and k-means are fitted on (MIEB fits on the eval split)."
    )
    main_score: Label = Field("acc", description="The metric that leads the reports and compares presets.")
    seeds: list[Seed] = Field(
        default=[0, 1, 2, 3, 4],
        description="k-means seeds, each in [0, 2^31): a list, or a count n meaning 0..n-1; at most 10000 seeds.",
    )
    backend: Label = Field("torch", description="PCA + k-means implementation.")
    backend_options: dict[str, Any] = Field(
        default={},
        description="Options of the backend's clusterer (e.g. torch: prune, chunk_rows); "
        "the k-means choices are protocol fields.",
    )
    silhouette_rows: int = Field(
        10_000,
        ge=2,
        le=MAX_SILHOUETTE_ROWS,
        description="Most eval rows the silhouette reads (at most 2^16): the first of "
        "numpy RandomState(seed).permutation(n), as scikit-learn's silhouette_score(sample_size=…, random_state=seed).",
    )

    _as_lists = field_validator("preset", "pca_dims", "k", "overcluster", "epochs", mode="before")(_as_list)

    @field_validator("preset")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        from sslbench.presets import preset_names

        for name in value:
            if name not in preset_names():
                raise ValueError(f"unknown preset '{name}'{did_you_mean(name, preset_names())}")
        if len(set(value)) != len(value):
            raise ValueError(f"has repeated values: {one_line(str(value), 80)}")
        return value

    def for_preset(self, name: str) -> ProtocolSpec:
        """This protocol under preset ``name``: the preset's values for every field not given explicitly."""
        from sslbench.presets import presets

        given = self.model_fields_set - {"preset"}
        values = {key: value for key, value in presets()[name].protocol.items() if key not in given}
        try:
            return self.model_validate({**self.model_dump(), **values, "preset": [name]})
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in err["loc"]) or "protocol"
            message = err["msg"].removeprefix("Value error, ")
            raise SSLBenchError(f"protocol: preset {name} with the fields given: {where}: {message}") from None

    def resolved(self) -> list[ProtocolSpec]:
        """One fully resolved protocol per preset, in the spec's order."""
        return [self.for_preset(name) for name in self.preset]

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError("a seed count must be at least 1")
            if value > MAX_SEEDS:  # refused before any list is built
                raise ValueError(f"a seed count must be at most {MAX_SEEDS}")
            return list(range(value))
        if isinstance(value, list) and len(value) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds, got a list of {len(value)}")
        return value

    @field_validator("pca_dims", "k", "overcluster", "epochs", "seeds")
    @classmethod
    def _non_empty_unique(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) != len(value):
            raise ValueError(f"has repeated values: {one_line(str(value), 80)}")
        return value

    @model_validator(mode="after")
    def _bounded_sweep(self) -> ProtocolSpec:
        if not self.pca and (self.whiten or self.pca_dims != [None]):
            raise _located("pca: false keeps every feature: pca_dims must be [null] and whiten false", "pca")
        if self.algorithm != "minibatch" and len(self.epochs) > 1:
            raise _located(
                f"epochs count the paper's mini-batch passes; algorithm {self.algorithm} stops at max_iter or tol, "
                "so an epochs sweep would fit the same clusters again: sweep max_iter in separate specs instead",
                "epochs",
            )
        n_points = len(self.pca_dims) * len(self.k) * len(self.overcluster) * len(self.epochs)
        if n_points > MAX_POINTS:
            raise _located(
                f"the sweep has {n_points} protocol points (pca_dims × k × overcluster × epochs); at most {MAX_POINTS}",
                "pca_dims",
            )
        given = [k for k in self.k if k is not None]
        if given and overclustered_k(max(given), max(self.overcluster)) > MAX_CLUSTERS:
            raise _located(
                f"int(overcluster × k) = {overclustered_k(max(given), max(self.overcluster))} clusters "
                f"(overcluster {max(self.overcluster):g} × k {max(given)}); at most {MAX_CLUSTERS}",
                "overcluster",
            )
        return self

    def points(self, n_classes: int) -> list[ProtocolPoint]:
        """Every protocol point of the sweep, PCA dims outermost (one projection serves many). Points that
        fit the same number of clusters (k = 10 × 2.0 and k = 20 × 1.0) are one computation: the first is
        kept, naming the others' ``(k, overcluster)`` in ``same_as``."""
        points: list[ProtocolPoint] = []
        for dims in self.pca_dims:
            for k in self.k:
                base = k if k is not None else n_classes
                for factor in self.overcluster:
                    n_clusters = overclustered_k(base, factor)
                    if n_clusters > MAX_CLUSTERS:
                        raise SSLBenchError(
                            f"protocol: int(overcluster × k) = {n_clusters} clusters (overcluster {factor:g} × "
                            f"{base} classes); at most {MAX_CLUSTERS}"
                        )
                    batch = self.batch_size or default_kmeans_batch_size(n_clusters)
                    for epochs in self.epochs:
                        points.append(ProtocolPoint(dims, self.whiten, base, factor, n_clusters, epochs, batch))
        return _merged_points(points)


def _merged_points(points: list[ProtocolPoint]) -> list[ProtocolPoint]:
    """The points with one per computation: a later point fitting what an earlier one fits is named in it."""
    kept: dict[tuple[int | None, int, int], ProtocolPoint] = {}
    for point in points:
        key = (point.pca_dims, point.n_clusters, point.epochs)
        first = kept.get(key)
        if first is None:
            kept[key] = point
        elif (point.k, point.overcluster) != (first.k, first.overcluster):
            kept[key] = replace(first, same_as=(*first.same_as, (point.k, point.overcluster)))
    return list(kept.values())


@dataclass(frozen=True)
class ProtocolPoint:
    """One resolved protocol setting; each is run once per seed."""

    pca_dims: int | None
    whiten: bool
    k: int
    overcluster: float
    n_clusters: int
    epochs: int
    batch_size: int
    #: The ``(k, overcluster)`` of other points of the sweep that fit the same clusters.
    same_as: tuple[tuple[int, float], ...] = ()


class ExtractionSpec(_StrictModel):
    """How features are extracted."""

    batch_size: Batch = Field(256, description="Images per forward pass (at most 2^24).")
    workers: Annotated[int, Field(ge=0, le=MAX_WORKERS)] = Field(
        min(4, os.cpu_count() or 1),
        description="Processes that decode images (0 = in the main one; at most 256). On the CPU they share the "
        "cores this process may use with torch's compute threads: at most this many and cores − 1, as many as the "
        "measured decode and forward costs call for; the threads take the rest.",
    )
    decode: Literal["exact", "reduced"] = Field(
        "exact",
        description="How images are decoded: `exact` (in full: the reference) or `reduced` (a JPEG at the smallest "
        "DCT scale, 1/2 to 1/8, whose shorter side still covers the model's resize: faster on large photos, an "
        "approximation). `reduced` records the cosine of its features to the exact decode's on 32 samples per "
        "split, and its features are cached apart.",
    )
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on the CPU: see `cpu_precision`).")
    cpu_memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="Memory format of the batches on the CPU: `auto` (channels-last for a convolutional backbone, "
        "NCHW otherwise), `channels_last` or `contiguous` (NCHW). Float32-close either way (not bit-identical); "
        "recorded in the cache key and the manifest. CUDA always runs channels-last.",
    )
    cpu_precision: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Precision of the forward on the CPU: `float32`, or `bfloat16` autocast (only on a CPU with "
        "native bfloat16, AVX-512-BF16 or AMX; refused elsewhere): an approximation, cached apart, that records "
        "the cosine of its features to float32 ones on 32 samples per split.",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="An unreadable image: stop naming it, or skip it and list it in results."
    )
    commit_every: Batch = Field(20, description="Batches between durable commits to the cache (at most 2^24).")
    cache: bool = Field(True, description="Keep features in the cache and reuse them.")
    on_corrupt: Literal["fail", "reextract"] = Field(
        "fail",
        description="A cache entry that fails its checksums: stop naming it (and the `sslbench cache rm` to run), "
        "or extract it again.",
    )


class ReportSpec(_StrictModel):
    """What the reports of the run show."""

    metrics: list[Label] | None = Field(
        None,
        min_length=1,
        description="The metric columns of every report, in this order, by their names in results.json: "
        "a registered metric (`acc`, `nmi`, a plugin's), `<metric>_<group>` for a dataset's class group "
        "(`acc_in_imagenet`), a probe's (`knn_top1_k20`, `linear_top1`), a transfer metric (`acc_tr`, …); "
        "default: every metric, ACC, ARI, AMI and NMI first.",
    )


class Spec(_StrictModel):
    """A whole run: models × datasets × protocol points × seeds."""

    name: RunName | None = Field(
        None,
        description="Run name, a plain file name (no / or \\, at most 100 characters); default: the spec file's stem.",
    )
    models: list[ModelSpec] = Field(min_length=1, description="Backbones to evaluate.")
    datasets: list[DatasetSpec] = Field(min_length=1, description="Datasets to cluster.")
    protocol: ProtocolSpec = Field(ProtocolSpec(), description="PCA, k-means, seeds and backend; see `protocol.*`.")
    probes: list[ProbeSpec] = Field(
        default_factory=list,
        description="Probes on the raw features beside k-means, once per model × dataset, e.g. "
        "[{id: knn, options: {k: [10, 20, 200]}}, {id: linear}]; default none.",
    )
    extraction: ExtractionSpec = Field(
        ExtractionSpec(), description="How features are extracted and cached; see `extraction.*`."
    )
    report: ReportSpec = Field(ReportSpec(), description="What the reports show; see `report.*`.")
    output_dir: Folder | None = Field(None, description="Where results go; default runs/<name>.")
    cache_dir: Folder | None = Field(
        None, description="Feature cache; default $SSLBENCH_CACHE or ~/.cache/sslbench/features."
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="auto, cpu, cuda, cuda:N or mps; cuda and mps must be available to torch.",
    )

    @model_validator(mode="after")
    def _distinct_files(self) -> Spec:
        """Display names name the rows of the report and the predictions files: no two may meet."""
        models = [(m.label, ("models", i, "name" if m.name else "id")) for i, m in enumerate(self.models)]
        datasets: list[tuple[str, tuple[Any, ...]]] = []
        for i, d in enumerate(self.datasets):
            datasets.append((d.label, ("datasets", i, "name" if d.name else "id")))
            for j, t in enumerate(d.transfer):
                at = ("datasets", i, "transfer", j, "name" if t.name else "id")
                datasets.append((f"{d.label} → {t.label}", at))
        for group, entries in (("models", models), ("datasets", datasets)):
            _distinct_labels(group, entries)
        _short_predictions_names(models, datasets)
        return self


def _where(at: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(at))


def _distinct_labels(group: str, entries: list[tuple[str, tuple[Any, ...]]]) -> None:
    by_label: dict[str, tuple[Any, ...]] = {}
    by_stem: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for label, at in entries:
        if label in by_label:
            raise _located(
                f"two entries are named '{label}' ({_where(by_label[label][:-1])} and {_where(at[:-1])}); "
                "give one a distinct `name`",
                *at,
            )
        by_label[label] = at
        stem = file_stem(label)
        if "__" in stem or stem.startswith("_") or stem.endswith("_"):
            # then <model>__<dataset> would not say where the model ends: 'a__b' on 'c' is 'a' on 'b__c'
            raise _located(
                f"'{label}' made file-safe is '{stem}', which has `__` or an outer `_`; `__` separates the "
                "parts of predictions file names: give it a `name` without them",
                *at,
            )
        folded = stem.lower()  # letter case too: macOS and Windows file systems ignore it
        if folded in by_stem:
            other, other_at = by_stem[folded]
            raise _located(
                f"'{other}' ({_where(other_at[:-1])}) and '{label}' ({_where(at[:-1])}) would write the same "
                f"predictions files ('{stem}__…'); give one a distinct `name`",
                *at,
            )
        by_stem[folded] = (label, at)


def _short_predictions_names(
    models: list[tuple[str, tuple[Any, ...]]], datasets: list[tuple[str, tuple[Any, ...]]]
) -> None:
    """The longest predictions file name the spec can produce fits the file system."""
    model = max(models, key=lambda e: len(file_stem(e[0])))
    dataset = max(datasets, key=lambda e: len(file_stem(e[0])))
    longest = predictions_name(model[0], dataset[0], MAX_SEED, (MAX_CLUSTERS, MAX_PCA_DIMS, MAX_EPOCHS))
    if len(longest) > MAX_PREDICTIONS_NAME:
        at = max(model, dataset, key=lambda e: len(file_stem(e[0])))[1]
        raise _located(
            f"model '{model[0]}' and dataset '{dataset[0]}' make predictions file names of up to "
            f"{len(longest)} characters, more than {MAX_PREDICTIONS_NAME}: give shorter `name`s",
            *at,
        )


# --------------------------------------------------------------------------------------------------
# Reading YAML defensively
#
# The parser's events (libyaml's parser when PyYAML has it) are composed here into a node graph, in
# one pass with no recursion, in which an alias is a second reference to its anchor's node. The pass
# refuses, as soon as it meets them: tags outside JSON's types, an alias of a node still open (a
# cycle), nesting deeper than MAX_YAML_DEPTH, and more than MAX_YAML_NODES values counted with aliases
# expanded (an alias adds its anchor's size, so "billion laughs" is refused after a few events and a
# 1 MB list after MAX_YAML_NODES of them). Values are then built from the nodes, each distinct node
# once; a scalar that is not what its tag says is a one-line error at its line.

_YAML = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"{_YAML}{t}" for t in ("str", "int", "float", "bool", "null"))
_MERGE, _SEQ, _MAP = f"{_YAML}merge", f"{_YAML}seq", f"{_YAML}map"
_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_KINDS = {_INT: "an integer", _FLOAT: "a number", _BOOL: "a boolean", _NULL: "null"}
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_CONVERT = {
    _INT: _CONSTRUCTOR.construct_yaml_int,
    _FLOAT: _CONSTRUCTOR.construct_yaml_float,
    _BOOL: _CONSTRUCTOR.construct_yaml_bool,
}


class _ShallowScanner(yaml.scanner.Scanner):
    """PyYAML's scanner, refusing deep nesting as it meets it: it keeps one possible key per open
    ``[``/``{``, reads ahead through all of them and walks them all at every token (quadratic).
    (libyaml refuses more than 1000 levels itself, at no such cost.)"""

    def _too_deep(self) -> yaml.scanner.ScannerError:
        mark = self.get_mark()  # type: ignore[attr-defined]
        return yaml.scanner.ScannerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark)

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= MAX_YAML_DEPTH:
            raise self._too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        added = bool(super().add_indent(column))
        if added and len(self.indents) > MAX_YAML_DEPTH:
            raise self._too_deep()
        return added


def _loader_class(base: type[Any]) -> type[Any]:
    """``base`` without the implicit timestamp (``2024-02-30`` stays a string), ``=`` and ``!`` types;
    PyYAML's own scanner also refuses deep nesting early."""
    dropped = {f"{_YAML}timestamp", f"{_YAML}value", f"{_YAML}yaml"}
    resolvers = {
        first: [(tag, regexp) for tag, regexp in entries if tag not in dropped]
        for first, entries in base.yaml_implicit_resolvers.items()
    }
    bases = (_ShallowScanner, base) if issubclass(base, yaml.scanner.Scanner) else (base,)
    return type(f"Spec{base.__name__}", bases, {"yaml_implicit_resolvers": resolvers})


#: libyaml's parser when PyYAML was built with it (fast, and it caps nesting itself), else PyYAML's.
_Loader: type[Any] = _loader_class(getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _tag(tag: str | None) -> str:
    tag = tag or "?"
    return one_line("!!" + tag[len(_YAML) :] if tag.startswith(_YAML) else tag, 60)


def _yaml_error(exc: yaml.YAMLError, source: str) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable YAML"])[0]
    return f"{where}: YAML syntax error: {one_line(problem, 200)}"


_ALLOWED_TAGS = {
    yaml.ScalarNode: (_STR, _INT, _FLOAT, _BOOL, _NULL, _MERGE),
    yaml.SequenceNode: (_SEQ,),
    yaml.MappingNode: (_MAP,),
}


@dataclass
class _Open:
    """A list or mapping being composed: its node, its items so far, and what they add up to."""

    node: yaml.CollectionNode
    items: list[yaml.Node]
    size: int = 1
    height: int = 0


class _Composer:
    """Events → nodes, checking as it goes (see the comment above)."""

    def __init__(self, loader: Any, source: str) -> None:
        self.loader, self.source = loader, source
        self.anchors: dict[str, yaml.Node] = {}
        self.size: dict[int, int] = {}  # closed node → values it stands for, aliases expanded
        self.height: dict[int, int] = {}  # closed node → lists and mappings nested in it, itself included
        self.total = 0
        self.resolved: dict[tuple[Any, ...], str] = {}

    def _error(self, event: Any, message: str) -> SSLBenchError:
        return SSLBenchError(f"{self.source}:{event.start_mark.line + 1}: {message}")

    def _tag(self, event: Any, kind: type[yaml.Node], value: str | None) -> str:
        tag = event.tag
        if tag is None or tag == "!":
            key = (kind, value, event.implicit)
            tag = self.resolved.get(key)
            if tag is None:  # the resolver's regular expressions, once per distinct plain value
                tag = self.resolved[key] = self.loader.resolve(kind, value, event.implicit)
        if tag not in _ALLOWED_TAGS[kind]:
            raise self._error(
                event,
                f"YAML tag {_tag(tag)} is not allowed: a spec holds only strings, numbers, booleans, null, "
                "lists and mappings",
            )
        return str(tag)

    def _count(self, event: Any, size: int) -> None:
        self.total += size
        if self.total > MAX_YAML_NODES:
            raise self._error(
                event,
                f"the spec stands for more than {MAX_YAML_NODES} values by here (an alias counts as a copy "
                "of what it refers to); a spec needs far fewer",
            )

    def document(self) -> yaml.Node | None:
        loader = self.loader
        loader.get_event()  # stream start
        if loader.check_event(yaml.StreamEndEvent):
            return None
        loader.get_event()  # document start
        root = self._node()
        loader.get_event()  # document end
        if not loader.check_event(yaml.StreamEndEvent):
            raise self._error(loader.get_event(), "a spec is one YAML document; a second one starts here")
        return root

    def _node(self) -> yaml.Node:
        loader = self.loader
        stack: list[_Open] = []
        while True:
            event: Any = loader.get_event()
            start: Any = event.start_mark  # libyaml's marks are typed apart from PyYAML's
            end: Any = event.end_mark
            anchor: str | None = getattr(event, "anchor", None)
            done: yaml.Node
            if isinstance(event, yaml.ScalarEvent):
                tag = self._tag(event, yaml.ScalarNode, event.value)
                done = yaml.ScalarNode(tag, event.value, start, end, style=event.style)
                size, height = 1, 0
                self._count(event, 1)
                if anchor is not None:
                    self.anchors[anchor] = done
                    self.size[id(done)], self.height[id(done)] = size, height
            elif isinstance(event, yaml.AliasEvent):
                target = self.anchors.get(anchor or "")
                if target is None:
                    raise self._error(event, f"YAML alias *{one_line(anchor or '', 60)} has no anchor before it")
                if id(target) not in self.size:
                    raise self._error(event, f"YAML alias *{one_line(anchor or '', 60)} is inside its own anchor")
                done = target
                size, height = self.size[id(done)], self.height[id(done)]
                if len(stack) + height > MAX_YAML_DEPTH:
                    raise self._error(event, f"YAML nested more than {MAX_YAML_DEPTH} lists and mappings deep")
                self._count(event, size)
            elif isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                if len(stack) >= MAX_YAML_DEPTH:
                    raise self._error(event, f"YAML nested more than {MAX_YAML_DEPTH} lists and mappings deep")
                kind = yaml.SequenceNode if isinstance(event, yaml.SequenceStartEvent) else yaml.MappingNode
                node = kind(self._tag(event, kind, None), [], start, None, flow_style=event.flow_style)
                self._count(event, 1)
                if anchor is not None:
                    self.anchors[anchor] = node
                stack.append(_Open(node, []))
                continue
            else:  # the end of a list or mapping
                closed = stack.pop()
                done = closed.node
                done.end_mark = end
                items = closed.items
                if isinstance(done, yaml.MappingNode):
                    done.value = list(zip(items[::2], items[1::2], strict=True))
                else:
                    done.value = items
                size, height = closed.size, closed.height + 1
                self.size[id(done)], self.height[id(done)] = size, height
            if not stack:
                return done
            parent = stack[-1]
            is_key = isinstance(parent.node, yaml.MappingNode) and len(parent.items) % 2 == 0
            if is_key and not isinstance(done, yaml.ScalarNode):
                raise SSLBenchError(
                    f"{self.source}:{_line(done)}: a mapping key must be a plain value, not a list or mapping"
                )
            parent.items.append(done)
            parent.size += size
            parent.height = max(parent.height, height)


def _compose(text: str, source: str, loader_class: type[Any] | None = None) -> yaml.Node | None:
    loader = None
    # The nodes form no reference cycles; without this, the collector re-scans every node made so
    # far again and again, and composing 100000 of them takes several times longer.
    collecting = gc.isenabled()
    gc.disable()
    try:
        loader = (loader_class or _Loader)(text)  # PyYAML's own reader checks the characters here
        return _Composer(loader, source).document()
    except yaml.YAMLError as exc:
        raise SSLBenchError(_yaml_error(exc, source)) from None
    finally:
        if collecting:
            gc.enable()
        if loader is not None:
            loader.dispose()


def _scalar(node: yaml.ScalarNode, source: str) -> Any:
    value = node.value
    if node.tag in (_STR, _MERGE):  # a `<<` that is not a mapping key is the string "<<"
        return value
    kind = _KINDS[node.tag]
    where = f"{source}:{_line(node)}"
    if node.tag == _NULL:
        if value not in _NULLS:
            raise SSLBenchError(f"{where}: {_shown(value)} is not {kind}")
        return None
    if len(value) > MAX_NUMBER_CHARS:
        raise SSLBenchError(f"{where}: {_shown(value)} is too long for {kind} ({len(value)} characters)")
    try:
        return _CONVERT[node.tag](node)
    except (ValueError, KeyError, TypeError, OverflowError, IndexError):  # `!!int abc`, `!!bool maybe`, `!!int ''`
        raise SSLBenchError(f"{where}: {_shown(value)} is not {kind}") from None


def _build(node: yaml.Node, source: str, built: dict[int, Any]) -> Any:
    """The value of a checked node graph; an alias gives the very object its anchor gave."""
    key = id(node)
    if key in built:
        return built[key]
    if isinstance(node, yaml.ScalarNode):
        value = built[key] = _scalar(node, source)
        return value
    if isinstance(node, yaml.SequenceNode):
        items: list[Any] = []
        built[key] = items
        items.extend(_build(item, source, built) for item in node.value)
        return items
    mapping: dict[Any, Any] = {}
    built[key] = mapping
    merged: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        name = _build(key_node, source, built)
        if key_node.tag == _MERGE:
            name = "<<"
        if name in lines:
            raise SSLBenchError(
                f"{source}:{_line(key_node)}: key {_shown(name)} appears twice in one mapping "
                f"(first at line {lines[name]})"
            )
        lines[name] = _line(key_node)
        if key_node.tag != _MERGE:
            mapping[name] = _build(value_node, source, built)
            continue
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for merge_node in reversed(sources):  # the first mapping listed wins
            if not isinstance(merge_node, yaml.MappingNode):
                raise SSLBenchError(f"{source}:{_line(merge_node)}: `<<` merges a mapping or a list of mappings")
            merged.update(_build(merge_node, source, built))
    if merged:
        mapping.update({k: v for k, v in merged.items() if k not in mapping})
    return mapping


def _child(node: yaml.Node, part: Any) -> tuple[yaml.Node, int] | None:
    """The node at ``part`` of ``node`` (following ``<<`` merges) and the line that holds it."""
    if isinstance(node, yaml.SequenceNode):
        if isinstance(part, int) and not isinstance(part, bool) and 0 <= part < len(node.value):
            item = node.value[part]
            return item, _line(item)
        return None
    if not isinstance(node, yaml.MappingNode) or isinstance(part, int):
        return None
    merges: list[yaml.Node] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            merges.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
        elif key_node.value == str(part):
            return value_node, _line(key_node)
    for merge_node in merges:
        found = _child(merge_node, part)
        if found is not None:
            return found
    return None


class SpecLines(Mapping[tuple[Any, ...], int]):
    """The YAML line of each field path (``("datasets", 0, "options")``), looked up in the node graph
    on demand: aliases are not expanded into a table of every path."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._root = root

    def __getitem__(self, path: tuple[Any, ...]) -> int:
        if self._root is None:
            raise KeyError(path)
        node, line = self._root, _line(self._root)
        for part in path:
            found = _child(node, part)
            if found is None:
                raise KeyError(path)
            node, line = found
        return line

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self._root is None:
            return
        stack: list[tuple[tuple[Any, ...], yaml.Node]] = [((), self._root)]
        while stack:
            path, node = stack.pop()
            yield path
            if isinstance(node, yaml.SequenceNode):
                stack.extend(((*path, i), item) for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                stack.extend(((*path, k.value), v) for k, v in node.value if k.tag != _MERGE)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def read_yaml(text: str, source: str, loader_class: type[Any] | None = None) -> tuple[Any, SpecLines]:
    """The value of a YAML document restricted to JSON's types, and the line of each field path.

    Every problem is an :class:`SSLBenchError` of one line; nothing is built before the node graph
    passed the checks, so no input costs more than a few passes over its text.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SSLBenchError(f"{source}: a spec is at most {MAX_SPEC_BYTES} characters; this one has {len(text)}")
    root = _compose(text, source, loader_class)
    if root is None:
        return None, SpecLines(None)
    return _build(root, source, {}), SpecLines(root)


# --------------------------------------------------------------------------------------------------
# Validation messages


def _format_loc(loc: Sequence[Any], lines: Mapping[tuple[Any, ...], int]) -> tuple[str, int | None]:
    """Dotted field path of a pydantic error location, and the YAML line that holds it."""
    path: tuple[Any, ...] = ()
    for part in loc:
        if (*path, part) in lines:
            path = (*path, part)
        elif isinstance(part, int) and lines:
            continue  # a scalar the validator wrapped in a list
        elif isinstance(part, int):
            path = (*path, part)  # no YAML behind it (a mapping given in code): the index is all that locates it
        elif isinstance(part, str) and not part.startswith(("function-after", "function-before")):
            path = (*path, part)
    text = ""
    for part in path:
        shown = one_line(str(part), 60) or "''"
        text += f"[{shown}]" if isinstance(part, int) else (f".{shown}" if text else shown)
    line = None
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            line = lines[path[:end]]
            break
    return text or "(top level)", line


#: Errors listed in one message; further ones are counted.
MAX_SHOWN_ERRORS = 5


def validation_message(
    exc: ValidationError,
    source: str,
    lines: Mapping[tuple[Any, ...], int],
    model: type[BaseModel] | None = None,
    prefix: tuple[Any, ...] = (),
) -> str:
    """One line listing the validation errors (the first five, one per field), each with file, line
    and field path, joined by ``; ``; further ones are counted, not looked up."""
    shown: dict[str, str] = {}
    seen: set[tuple[Any, ...]] = set()
    more: set[tuple[Any, ...]] = set()
    errors = exc.errors(include_url=False)
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for err in errors:
        if err["type"] == "extra_forbidden":
            unknown.setdefault(tuple(err["loc"][:-1]), []).append(str(err["loc"][-1]))
    for err in errors:
        # A misspelled key is one mistake: its "unknown key (did you mean …)" says it all, so the
        # required key it was meant to be is not reported missing as well.
        if err["type"] == "missing" and closest(str(err["loc"][-1]), unknown.get(tuple(err["loc"][:-1]), ()), n=1):
            continue
        ctx = err.get("ctx") or {}
        at = tuple(ctx.get("at") or ()) if err["type"] == "spec_conflict" else ()
        loc = (*prefix, *err["loc"], *at)
        if loc in seen:
            continue
        if len(shown) >= MAX_SHOWN_ERRORS:
            more.add(loc)
            continue
        seen.add(loc)
        where, line = _format_loc(loc, lines)
        if where in shown:  # one message per field
            continue
        message = err["msg"].removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(err["loc"][:-1])) if model else []
            key = str(err["loc"][-1])
            message = f"unknown key{did_you_mean(key, known) if len(key) <= MAX_LABEL else ''}"
            if known:
                message += f"; allowed: {', '.join(known)}"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict | list):
            message += f" (got {_shown(err['input'])})"
        location = f"{source}:{line}" if line else source
        shown[where] = one_line(f"{location}: {where}: {message}", 400)
    return "; ".join(shown.values()) + (f" (and {len(more)} more)" if more else "")


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from (for error messages and results provenance)."""

    spec: Spec
    source: str
    lines: Mapping[tuple[Any, ...], int]

    @property
    def name(self) -> str:
        return self.spec.name or Path(self.source).stem


def parse_spec(text: str, source: str = "<spec>") -> LoadedSpec:
    """Validate spec ``text``; ``source`` names it in messages. See :func:`read_yaml` for the YAML
    accepted: JSON's types only (strings, numbers, booleans, null, lists, mappings), with anchors,
    aliases and ``<<`` merges, at most :data:`MAX_YAML_NODES` values with aliases expanded and
    :data:`MAX_YAML_DEPTH` levels; a key may appear once per mapping."""
    source = one_line(source)  # escaped, not cut: it also gives the run its default name
    data, lines = read_yaml(text, source)
    if not isinstance(data, dict):
        raise SSLBenchError(f"{source}: a spec must be a YAML mapping with `models` and `datasets`")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SSLBenchError(validation_message(exc, source, lines, Spec)) from None
    if spec.name is None:
        try:
            _run_name(Path(source).stem)
        except ValueError:
            raise SSLBenchError(
                f"{source}: the file's stem {_shown(Path(source).stem)} cannot name the run; give the spec a `name`"
            ) from None
    return LoadedSpec(spec, source, lines)


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file; every problem is an :class:`SSLBenchError` naming the line."""
    path = Path(path)
    shown = one_line(str(path), 300)  # for messages only
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SSLBenchError(f"spec file not found: {shown}") from None
    except (OSError, ValueError) as exc:  # a folder, no permission, a name too long, a NUL in it
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SSLBenchError(f"cannot read spec file {shown}: {one_line(reason, 200)}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SSLBenchError(f"{shown}: a spec file is at most {MAX_SPEC_BYTES} bytes; this one is larger")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SSLBenchError(f"cannot read spec file {shown}: not UTF-8 text (byte {exc.start})") from None
    return parse_spec(text, str(path))


# --------------------------------------------------------------------------------------------------
# Resolving names against the plugins


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec whose names all exist, with every component's options validated."""

    loaded: LoadedSpec
    model_options: list[BaseModel | None]
    dataset_options: list[BaseModel]
    backend_options: BaseModel
    #: Per dataset, the validated options of each of its ``transfer`` targets.
    transfer_options: list[list[BaseModel]] = field(default_factory=list)
    #: The spec's probes, each with its validated options, in the spec's order.
    probes: tuple[ResolvedProbe, ...] = ()

    @property
    def spec(self) -> Spec:
        return self.loaded.spec


@dataclass(frozen=True)
class ResolvedProbe:
    """A probe of the spec (or the API) with its validated options."""

    entry: ProbeEntry
    options: BaseModel

    @property
    def name(self) -> str:
        return self.entry.name

    def metrics(self) -> dict[str, MetricInfo]:
        """What it records with these options, described."""
        return self.entry.metrics(self.options)


def _at(loaded: LoadedSpec, at: tuple[Any, ...]) -> str:
    where, line = _format_loc(at, loaded.lines)
    return f"{loaded.source}:{line}: {where}" if line else f"{loaded.source}: {where}"


def _validate_options(
    loaded: LoadedSpec, options_model: type[BaseModel], options: dict[str, Any], at: tuple[Any, ...]
) -> BaseModel:
    try:
        return options_model.model_validate(options)
    except ValidationError as exc:
        raise SSLBenchError(validation_message(exc, loaded.source, loaded.lines, options_model, prefix=at)) from None


def _named(loaded: LoadedSpec, at: tuple[Any, ...], lookup: Any, name: str) -> Any:
    try:
        return lookup(name)
    except SSLBenchError as exc:
        raise SSLBenchError(one_line(f"{_at(loaded, at)}: {exc}", 400)) from None


def _check_device(loaded: LoadedSpec) -> None:
    """``cuda``, ``cuda:N`` and ``mps`` must be there now (torch is imported only for them)."""
    device = loaded.spec.device
    missing = missing_device(device)
    if missing:
        raise SSLBenchError(f"{_at(loaded, ('device',))}: {unavailable(device, missing)}")


def resolve_spec(loaded: LoadedSpec, plugins: Plugins) -> ResolvedSpec:
    """Check every name in the spec against ``plugins``, validate component options, and check that
    the device is available."""
    spec = loaded.spec
    model_options: list[BaseModel | None] = []
    for i, model in enumerate(spec.models):
        if model.optional and model.id not in plugins.backbones:
            model_options.append(None)  # its plugin is not installed: the run skips it
            continue
        entry = _named(loaded, ("models", i, "id"), plugins.backbones.get, model.id)
        model_options.append(_validate_options(loaded, entry.options, model.options, ("models", i, "options")))
    dataset_options = []
    transfer_options: list[list[BaseModel]] = []
    for i, dataset in enumerate(spec.datasets):
        entry = _named(loaded, ("datasets", i, "id"), plugins.datasets.get, dataset.id)
        dataset_options.append(_validate_options(loaded, entry.options, dataset.options, ("datasets", i, "options")))
        targets = []
        for j, target in enumerate(dataset.transfer):
            at = ("datasets", i, "transfer", j)
            target_entry = _named(loaded, (*at, "id"), plugins.datasets.get, target.id)
            targets.append(_validate_options(loaded, target_entry.options, target.options, (*at, "options")))
        transfer_options.append(targets)
    first = _resolved_protocols(loaded)[0]  # the backend options are those of the first preset's backend
    backend = _named(loaded, ("protocol", "backend"), plugins.backends.get, first.backend)
    backend_options = _validate_options(loaded, backend.options, first.backend_options, ("protocol", "backend_options"))
    probes = []
    for i, probe in enumerate(spec.probes):
        entry = _named(loaded, ("probes", i, "id"), plugins.probes.get, probe.id)
        probes.append(
            ResolvedProbe(entry, _validate_options(loaded, entry.options, probe.options, ("probes", i, "options")))
        )
    _check_probe_metrics(loaded, probes)
    _check_presets(loaded, plugins, probes)
    _check_device(loaded)
    _check_report_metrics(loaded, plugins, probes)
    for i, (dataset, options) in enumerate(zip(spec.datasets, dataset_options, strict=True)):
        labeled = plugins.datasets.get(dataset.id).labeled
        if labeled is not None and not labeled(options):
            check_unlabeled_dataset(loaded, i, plugins)
    return ResolvedSpec(loaded, model_options, dataset_options, backend_options, transfer_options, tuple(probes))


def labelled_main_score(protocol: ProtocolSpec, plugins: Plugins) -> str | None:
    """The main score ``protocol`` asks for explicitly when it compares clusters with classes (None when
    it is a preset's own, or label-free): what data without labels refuses."""
    main = protocol.main_score
    if "main_score" in protocol.model_fields_set and main in plugins.metrics and plugins.metrics.get(main).needs_labels:
        return main
    return None


def check_unlabeled_dataset(loaded: LoadedSpec, index: int, plugins: Plugins) -> None:
    """What ``datasets[index]``, a dataset without class labels, cannot have, refused in one line at its
    place in the spec: k taken from the number of classes, probes, a main score or report columns of
    metrics that compare clusters with classes (a preset's own main score then just does not lead), transfer
    targets."""
    spec = loaded.spec
    dataset = spec.datasets[index]
    why = f"datasets[{index}] ({dataset.label}) has no class labels"
    if None in spec.protocol.k:
        where = ("protocol", "k", spec.protocol.k.index(None)) if len(spec.protocol.k) > 1 else ("protocol", "k")
        raise SSLBenchError(f"{_at(loaded, where)}: {why}, so k cannot be the number of classes: give k")
    if spec.probes:
        raise SSLBenchError(f"{_at(loaded, ('probes', 0, 'id'))}: {why}, and probes learn from labels")
    main = labelled_main_score(spec.protocol, plugins)
    if main is not None:
        at = _at(loaded, ("protocol", "main_score"))
        raise SSLBenchError(f"{at}: {why}, and main_score '{main}' compares clusters with classes")
    if dataset.transfer:
        raise SSLBenchError(
            f"{_at(loaded, ('datasets', index, 'transfer'))}: {why}, so there are no classes to transfer"
        )
    for position, name in enumerate(spec.report.metrics or []):
        if name in plugins.metrics and plugins.metrics.get(name).needs_labels:
            raise SSLBenchError(
                f"{_at(loaded, ('report', 'metrics', position))}: {why}, and metric '{name}' compares "
                "clusters with classes"
            )


def _resolved_protocols(loaded: LoadedSpec) -> list[ProtocolSpec]:
    """The spec's protocol under each of its presets; a preset its fields contradict is named at its line."""
    try:
        return loaded.spec.protocol.resolved()
    except SSLBenchError as exc:
        raise SSLBenchError(one_line(f"{_at(loaded, ('protocol', 'preset'))}: {exc}", 400)) from None


def _check_presets(loaded: LoadedSpec, plugins: Plugins, probes: Sequence[ResolvedProbe]) -> None:
    """Each preset, resolved with the spec's fields, names a backend that can run its k-means choices,
    with the spec's backend options, and a main score the run records."""
    at = ("protocol", "preset")
    known = [*plugins.metrics.names(), *(name for probe in probes for name in probe.metrics())]
    for protocol in _resolved_protocols(loaded):
        name = protocol.preset[0]
        backend = _named(loaded, ("protocol", "backend"), plugins.backends.get, protocol.backend)
        _validate_options(loaded, backend.options, protocol.backend_options, ("protocol", "backend_options"))
        refused = backend.refusal(protocol.algorithm, protocol.n_init)
        if refused:
            raise SSLBenchError(f"{_at(loaded, at)}: preset {name}: {refused}")
        if protocol.main_score not in known:
            raise SSLBenchError(
                f"{_at(loaded, at)}: preset {name}: main_score '{protocol.main_score}' is not a metric of the run"
                f"{did_you_mean(protocol.main_score, known)}"
            )


def _check_probe_metrics(loaded: LoadedSpec, probes: Sequence[ResolvedProbe]) -> None:
    """Two probes (the same one twice, or two recording a metric of one name) would overwrite each other."""
    recorded: dict[str, int] = {}
    for i, probe in enumerate(probes):
        for name in probe.metrics():
            if name in recorded:
                at = _at(loaded, ("probes", i, "id"))
                raise SSLBenchError(
                    f"{at}: metric '{name}' is also recorded by probes[{recorded[name]}]; "
                    "give each probe once (list its options together)"
                )
            recorded[name] = i


def _check_report_metrics(loaded: LoadedSpec, plugins: Plugins, probes: Sequence[ResolvedProbe]) -> None:
    """Each ``report.metrics`` name is a metric the run can record. A ``<metric>_<group>`` name passes
    here when ``<metric>`` is registered: the datasets' class groups are known when the run is planned,
    which checks it again (:func:`sslbench.runner.plan_run`)."""
    from sslbench.transfer import TRANSFER_METRICS

    spec = loaded.spec
    registered = plugins.metrics.names()
    known = [*registered, *(name for probe in probes for name in probe.metrics())]
    if any(d.transfer for d in spec.datasets):
        known += [m for m in TRANSFER_METRICS if m not in known]
    for index, name in enumerate(spec.report.metrics or []):
        group_of = next((m for m in registered if name.startswith(f"{m}_") and name[len(m) + 1 :].isidentifier()), None)
        at = _at(loaded, ("report", "metrics", index))
        if name not in known and group_of is None:
            raise SSLBenchError(f"{at}: unknown metric '{name}'{did_you_mean(name, known)}")
        if name in spec.report.metrics[:index]:  # type: ignore[index]
            raise SSLBenchError(f"{at}: '{name}' is listed twice")


#: Dataset option keys that name a file or folder; a ``splits`` mapping's string values are
#: sub-folders of a sibling ``root`` (or files, without one).
PATH_KEYS = frozenset({"root", "file", "features", "labels"})
#: Missing paths named one by one; further ones are counted.
MAX_SHOWN_WARNINGS = 10


def _missing(value: Any) -> bool:
    try:
        return not Path(value).expanduser().exists()
    except (OSError, ValueError):
        return True


def _missing_in(options: dict[Any, Any]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(key path, path) of each path named by one options mapping (not its nested ones) that is missing."""
    root = options.get("root")
    base = Path(root).expanduser() if isinstance(root, str | os.PathLike) else None
    for key, item in options.items():
        if key in PATH_KEYS and isinstance(item, str | os.PathLike) and _missing(item):
            yield (key,), str(item)
        elif key == "splits" and isinstance(item, dict) and not (base is not None and _missing(base)):
            for split, sub in item.items():  # no warning under a root that is named missing already
                if isinstance(sub, str | os.PathLike):
                    full = base / sub if base is not None else Path(sub)
                    if _missing(full):
                        yield (key, split), str(full)


def missing_paths(resolved: ResolvedSpec) -> list[str]:
    """One line per dataset (or transfer target) option naming a path that does not exist: the
    options' ``root``, ``file``, ``features`` and ``labels`` values and the files of ``splits``,
    at any depth of the validated options."""
    places: list[tuple[tuple[Any, ...], BaseModel]] = []
    for i, options in enumerate(resolved.dataset_options):
        places.append((("datasets", i, "options"), options))
        targets = resolved.transfer_options[i] if i < len(resolved.transfer_options) else []
        places.extend((("datasets", i, "transfer", j, "options"), t) for j, t in enumerate(targets))
    found: list[str] = []
    more = 0
    for at, options in places:
        stack: list[tuple[tuple[Any, ...], Any]] = [(at, options.model_dump())]
        while stack:
            path, value = stack.pop()
            if isinstance(value, dict):
                for keys, missing in _missing_in(value):
                    if len(found) == MAX_SHOWN_WARNINGS:
                        more += 1
                        continue
                    found.append(f"{_at(resolved.loaded, (*path, *keys))}: no such file or folder: {missing}")
                items: list[tuple[Any, Any]] = list(value.items())
            elif isinstance(value, list):
                items = list(enumerate(value))
            else:
                continue
            stack.extend(((*path, k), v) for k, v in reversed(items) if isinstance(v, dict | list))
    if more:
        found.append(f"{resolved.loaded.source}: {more} more dataset paths do not exist")
    return [one_line(line, 400) for line in found]
