"""The run specification: a YAML file validated by pydantic, with errors that point at the line.

Validation has two stages. :func:`load_spec` checks structure and values (unknown keys, types,
ranges) and needs no plugins. :func:`resolve_spec` then checks every name against the loaded plugins
and validates each component's ``options`` with that component's own options model, so third-party
options are type-checked too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sslbench.errors import SSLBenchError, did_you_mean
from sslbench.plugins import Plugins

PositiveInt = Annotated[int, Field(ge=1)]
Overcluster = Annotated[float, Field(ge=1.0, allow_inf_nan=False)]

#: The paper's k-means batch size rule, from its code: max(2048, 2^ceil(log2 k)).
MIN_KMEANS_BATCH = 2048


def default_kmeans_batch_size(n_clusters: int) -> int:
    return max(MIN_KMEANS_BATCH, 2 ** math.ceil(math.log2(n_clusters)))


def overclustered_k(k: int, factor: float) -> int:
    """Clusters for ``k`` classes at overclustering ``factor``, truncated as the paper's code does."""
    return max(1, int(factor * k + 1e-9))


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class ModelSpec(_StrictModel):
    """One backbone to evaluate."""

    id: str = Field(description="Registered backbone name (see `sslbench models`).")
    name: str | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Backbone options.")
    optional: bool = Field(False, description="Skip (with a note) when the backbone or its weights are not installed.")

    @property
    def label(self) -> str:
        return self.name or self.id


class TransferSpec(_StrictModel):
    """Another dataset the fitted clusters are applied to (the paper's ImageNet → ObjectNet, Table C.2)."""

    id: str = Field(description="Registered dataset name of the target.")
    name: str | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Dataset options of the target.")
    split: str = Field("test", description="Split of the target that is predicted and scored.")
    class_map: str = Field(
        "imagenet_classes",
        description="Key of the target's metadata listing, per target class, the source classes it maps onto.",
    )

    @property
    def label(self) -> str:
        return self.name or self.id


class DatasetSpec(_StrictModel):
    """One dataset, with the split k-means is fitted on and the split it is scored on."""

    id: str = Field(description="Registered dataset name.")
    name: str | None = Field(None, description="Display name in reports; defaults to `id`.")
    options: dict[str, Any] = Field(default_factory=dict, description="Dataset options.")
    fit_split: str = Field("train", description="Split that PCA and k-means are fitted on.")
    eval_split: str = Field("val", description="Split that is predicted and scored.")
    transfer: list[TransferSpec] = Field(
        default_factory=list, description="Datasets the clusters fitted here are also applied to."
    )

    @property
    def label(self) -> str:
        return self.name or self.id


class ProtocolSpec(_StrictModel):
    """The clustering protocol. List-valued fields sweep: every combination is run."""

    pca_dims: list[PositiveInt | None] = Field(default=[None], description="PCA dimensions; null keeps all components.")
    whiten: bool = Field(False, description="Scale PCA components to unit variance.")
    k: list[PositiveInt | None] = Field(default=[None], description="Clusters before overclustering; null = classes.")
    overcluster: list[Overcluster] = Field(default=[1.0], description="Clusters = int(overcluster × k).")
    epochs: list[PositiveInt] = Field(default=[60], description="k-means epochs.")
    batch_size: PositiveInt | None = Field(
        None, description="k-means batch size; null = max(2048, 2^ceil(log2 clusters))."
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default=[0, 1, 2, 3, 4],
        description="k-means seeds: a list, or a count n meaning 0..n-1.",
    )
    backend: str = Field("torch", description="PCA + k-means implementation.")
    backend_options: dict[str, Any] = Field(
        default={}, description="Options of the backend's clusterer (e.g. torch: algorithm)."
    )

    _as_lists = field_validator("pca_dims", "k", "overcluster", "epochs", mode="before")(_as_list)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"a seed count must be at least 1, got {value}")
            return list(range(value))
        return value

    @field_validator("pca_dims", "k", "overcluster", "epochs", "seeds")
    @classmethod
    def _non_empty_unique(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) != len(value):
            raise ValueError(f"has repeated values: {value}")
        return value

    def points(self, n_classes: int) -> list[ProtocolPoint]:
        """Every protocol point of the sweep, PCA dims outermost (one projection serves many)."""
        points = []
        for dims in self.pca_dims:
            for k in self.k:
                base = k if k is not None else n_classes
                for factor in self.overcluster:
                    n_clusters = overclustered_k(base, factor)
                    batch = self.batch_size or default_kmeans_batch_size(n_clusters)
                    for epochs in self.epochs:
                        points.append(ProtocolPoint(dims, self.whiten, base, factor, n_clusters, epochs, batch))
        return points


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


class ExtractionSpec(_StrictModel):
    """How features are extracted."""

    batch_size: PositiveInt = Field(256, description="Images per forward pass.")
    workers: Annotated[int, Field(ge=0)] = Field(
        min(4, os.cpu_count() or 1), description="Processes that decode images (0 = in the main one)."
    )
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on the CPU).")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="An unreadable image: stop naming it, or skip it and list it in results."
    )
    commit_every: PositiveInt = Field(20, description="Batches between durable commits to the cache.")
    cache: bool = Field(True, description="Keep features in the cache and reuse them.")


class Spec(_StrictModel):
    """A whole run: models × datasets × protocol points × seeds."""

    name: str | None = Field(None, description="Run name; defaults to the spec file's stem.")
    models: list[ModelSpec] = Field(min_length=1, description="Backbones to evaluate.")
    datasets: list[DatasetSpec] = Field(min_length=1, description="Datasets to cluster.")
    protocol: ProtocolSpec = ProtocolSpec()
    extraction: ExtractionSpec = ExtractionSpec()
    output_dir: str | None = Field(None, description="Where results go; default runs/<name>.")
    cache_dir: str | None = Field(
        None, description="Feature cache; default $SSLBENCH_CACHE or ~/.cache/sslbench/features."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
        description="auto, cpu, cuda, cuda:N or mps.",
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> Spec:
        for field_name, items in (("models", self.models), ("datasets", self.datasets)):
            seen: set[str] = set()
            for item in items:
                if item.label in seen:
                    raise ValueError(f"{field_name}: two entries are named '{item.label}'; give one a distinct `name`")
                seen.add(item.label)
        return self


# --------------------------------------------------------------------------------------------------
# Loading with line numbers


def _node_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            _node_lines(value_node, key_path, lines)
            lines[key_path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, (*path, index), lines)


def _format_loc(loc: Sequence[Any], lines: dict[tuple[Any, ...], int]) -> tuple[str, int | None]:
    """Dotted field path of a pydantic error location, and the YAML line that holds it."""
    path: tuple[Any, ...] = ()
    for part in loc:
        if (*path, part) in lines:
            path = (*path, part)
        elif isinstance(part, int):
            continue  # a scalar the validator wrapped in a list
        elif isinstance(part, str) and not any(p == part for p in ("function-after", "function-before")):
            path = (*path, part)
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    line = None
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            line = lines[path[:end]]
            break
    return text or "(top level)", line


def validation_message(
    exc: ValidationError,
    source: str,
    lines: dict[tuple[Any, ...], int],
    model: type[BaseModel] | None = None,
    prefix: tuple[Any, ...] = (),
) -> str:
    """One line for the first validation error, with file, line and field path."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = (*prefix, *err["loc"])
    where, line = _format_loc(loc, lines)
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        known = _fields_at(model, tuple(err["loc"][:-1])) if model else []
        message = f"unknown key{did_you_mean(str(err['loc'][-1]), known)}"
        if known:
            message += f"; allowed: {', '.join(known)}"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        message += f" (got {err['input']!r})"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    location = f"{source}:{line}" if line else source
    return f"{location}: {where}: {message}{more}"


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


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from (for error messages and results provenance)."""

    spec: Spec
    source: str
    lines: dict[tuple[Any, ...], int]

    @property
    def name(self) -> str:
        return self.spec.name or Path(self.source).stem


def parse_spec(text: str, source: str = "<spec>") -> LoadedSpec:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SSLBenchError(f"{where}: YAML syntax error: {problem}") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    if not isinstance(data, dict):
        raise SSLBenchError(f"{source}: a spec must be a YAML mapping with `models` and `datasets`")
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SSLBenchError(validation_message(exc, source, lines, Spec)) from None
    return LoadedSpec(spec, source, lines)


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file; every problem is an :class:`SSLBenchError` naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SSLBenchError(f"spec file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SSLBenchError(f"cannot read spec file {path}: {exc}") from None
    return parse_spec(text, str(path))


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec whose names all exist, with every component's options validated."""

    loaded: LoadedSpec
    model_options: list[BaseModel | None]
    dataset_options: list[BaseModel]
    backend_options: BaseModel
    #: Per dataset, the validated options of each of its ``transfer`` targets.
    transfer_options: list[list[BaseModel]] = field(default_factory=list)

    @property
    def spec(self) -> Spec:
        return self.loaded.spec


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
        where, line = _format_loc(at, loaded.lines)
        raise SSLBenchError(f"{loaded.source}:{line}: {where}: {exc}") from None


def resolve_spec(loaded: LoadedSpec, plugins: Plugins) -> ResolvedSpec:
    """Check every name in the spec against ``plugins`` and validate component options."""
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
    backend = _named(loaded, ("protocol", "backend"), plugins.backends.get, spec.protocol.backend)
    backend_options = _validate_options(
        loaded, backend.options, spec.protocol.backend_options, ("protocol", "backend_options")
    )
    return ResolvedSpec(loaded, model_options, dataset_options, backend_options, transfer_options)
