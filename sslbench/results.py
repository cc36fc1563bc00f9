"""The results model: what a run produced, serialised as results.json.

Every report, export and plot is a rendering of a :class:`Results`; ``sslbench report`` reads it
back from another machine. The JSON schema is documented in README.md ("results.json").
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import stat
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from sslbench.errors import SSLBenchError, did_you_mean

if TYPE_CHECKING:
    from sslbench.plugins import Plugins

#: 3: probes (kNN, linear, a plugin's) are stored once per model × dataset in ``probes``, not in every run's
#: metrics, and ``timings.knn_s`` is gone; 2: results carry ``metrics``, the descriptor of every metric, and
#: ``columns``; 1 had neither. Files of schemas 1 and 2 are read as they were written.
SCHEMA_VERSION = 3

#: The metrics reports show first, in this order (the paper's Table 1); the rest follow.
HEADLINE_METRICS = ("acc", "ari", "ami", "nmi")


class _Model(BaseModel):
    # A score undefined for a run (a silhouette of one cluster, a metric of an empty class group) is NaN,
    # written as JSON's NaN constant (as Python's json module writes and reads it), not as null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class MetricInfo(_Model):
    """How reports show a metric: what a plugin's :class:`~sslbench.interfaces.MetricEntry` declares,
    carried in results.json so that a machine without that plugin renders it the same."""

    label: str = Field(min_length=1, description="column title")
    description: str = ""
    unit: Literal["percent", "raw"] = Field(
        "percent", description="percent: a fraction in [0, 1] shown × 100; raw: shown as recorded"
    )
    better: Literal["higher", "lower"] = Field("higher", description="which way the best value of a column lies")
    needs_labels: bool = Field(True, description="whether it compares the clusters with the class labels")
    decimals: int = Field(2, ge=0, le=10, description="decimal places shown (of the percent, for percent metrics)")
    of: str | None = Field(None, description="the metric this one restricts to a class group (acc_in_imagenet: acc)")
    group: str | None = Field(None, description="the class group it is restricted to")

    def scaled(self, value: float) -> float:
        """``value`` in the unit it is shown in (× 100 for percent)."""
        return 100 * value if self.unit == "percent" else value

    def text(self, value: float) -> str:
        """``23.09`` for 0.2309 in percent, ``1.50`` for a raw 1.5."""
        return f"{self.scaled(value):.{self.decimals}f}"

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` in this metric's direction (NaN never wins)."""
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return math.nan
        return max(finite) if self.better == "higher" else min(finite)

    def within(self, value: float, best: float, spread: float) -> bool:
        """Whether ``value`` is no further than ``spread`` from ``best`` on the worse side."""
        return value >= best - spread if self.better == "higher" else value <= best + spread

    def in_group(self, name: str, group: str) -> MetricInfo:
        """The descriptor of metric ``name`` restricted to class group ``group`` (``ACC in imagenet``)."""
        return self.model_copy(
            update={
                "label": f"{self.label} {group.replace('_', ' ')}",
                "description": f"{self.description or self.label}, over class group {group}",
                "of": name,
                "group": group,
            }
        )


#: Labels of the metrics sslbench wrote before results carried descriptors (schema 1), so that such
#: files read as they did; any other name there is shown raw under its own name.
_SCHEMA1_LABELS = {
    "acc": "ACC",
    "acc_majority": "ACC-maj",
    "acc_eval_assignment": "ACC-eval",
    "ari": "ARI",
    "ami": "AMI",
    "nmi": "NMI",
    "v_measure": "V",
    "fowlkes_mallows": "FM",
    "acc_tr": "ACC-tr",
    "acc_val": "ACC-val",
    "single_cluster": "1 cluster",
}
_SCHEMA1_KNN = re.compile(r"^knn_top1_k(\d+)$")


def schema1_info(name: str) -> MetricInfo:
    """The descriptor of a metric recorded without one (results.json of schema 1): the built-in names
    of that time as they were shown, ``<metric>_<group>`` for their class groups, else raw under its name."""
    if name in _SCHEMA1_LABELS:
        return MetricInfo(label=_SCHEMA1_LABELS[name])
    knn = _SCHEMA1_KNN.match(name)
    if knn:
        return MetricInfo(label=f"kNN-{knn.group(1)}")
    for base in sorted(_SCHEMA1_LABELS, key=len, reverse=True):
        if name.startswith(f"{base}_") and name[len(base) + 1 :].isidentifier():
            return MetricInfo(label=_SCHEMA1_LABELS[base]).in_group(base, name[len(base) + 1 :])
    return MetricInfo(label=name, unit="raw", decimals=4)


class RunProtocol(_Model):
    """The resolved protocol of one run."""

    fit_split: str
    eval_split: str
    n_classes: int
    k: int = Field(description="clusters before overclustering")
    overcluster: float
    n_clusters: int = Field(description="clusters fitted: int(overcluster × k)")
    pca_dims: int = Field(description="components kept after PCA")
    whiten: bool
    epochs: int
    batch_size: int
    backend: str
    silhouette_rows: int | None = Field(
        None, description="most eval rows the silhouette read, drawn with the run's seed (null: older results)"
    )
    #: The preset and the k-means choices it resolved to (results before presets: the paper's, their defaults).
    preset: str = "zheltonozhskii2020"
    pca: bool = True
    algorithm: str = "minibatch"
    n_init: int = 1
    max_iter: int = 300
    tol: float = 1e-4
    main_score: str = "acc"
    same_as: tuple[tuple[int, float], ...] = Field(
        default=(), description="(k, overcluster) of the sweep's other points that fit these clusters"
    )


class Timings(_Model):
    """Wall-clock seconds. ``extract_s`` and ``pca_s`` are shared by the runs that reuse them."""

    extract_s: float
    pca_s: float
    kmeans_s: float
    eval_s: float

    @model_validator(mode="before")
    @classmethod
    def _schema2_knn_time(cls, data: Any) -> Any:
        """Schema 2 recorded the kNN's time in every run (``knn_s``); a probe now keeps its own (``seconds``)."""
        if isinstance(data, dict) and "knn_s" in data:
            return {key: value for key, value in data.items() if key != "knn_s"}
        return data


class Run(_Model):
    model: str
    #: The registered backbone (its card gives the linear top-1 for plots); null for the API's features.
    backbone: str | None = None
    dataset: str
    protocol: RunProtocol
    seed: int
    n_train: int
    n_eval: int
    metrics: dict[str, float]
    timings: Timings


class ProbeRecord(_Model):
    """One probe (kNN, linear, a plugin's) of one model on one dataset: stored once, whatever the seeds."""

    model: str
    backbone: str | None = None
    dataset: str
    probe: str = Field(description="the registered probe's name")
    options: dict[str, Any] = Field(description="its validated options")
    fit_split: str
    eval_split: str
    n_classes: int
    n_train: int
    n_eval: int
    metrics: dict[str, float]
    details: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="other values it recorded (the linear probe's chosen C)"
    )
    notes: list[str] = Field(default_factory=list, description="non-convergence, separable data, …")
    seconds: float


class MetricSummary(_Model):
    mean: float
    std: float | None = Field(description="sample std (ddof=1); null for a single seed")


class Published(_Model):
    """A published value for the same model and protocol, in the same units (fractions)."""

    source: str
    metrics: dict[str, MetricSummary]


class SummaryRow(_Model):
    model: str
    backbone: str | None = None
    dataset: str
    protocol: RunProtocol
    n_seeds: int
    seeds: list[int]
    metrics: dict[str, MetricSummary]
    published: Published | None = None
    #: The results file a row came from, set when several files are merged (rows may look alike).
    source: str | None = None


class SkippedSample(_Model):
    """A sample that could not be read and was left out (``extraction.on_error: skip``)."""

    model: str
    dataset: str
    split: str
    sample: str
    error: str


class ExtractionRecord(_Model):
    """How one split's features were computed: the numeric settings beyond the spec's words (``auto``
    resolved) and, for an approximation, how far it moved the features (cosines to the reference)."""

    model: str
    dataset: str
    split: str
    device: str
    memory_format: str
    precision: str
    decode: str
    #: ``{"samples", "precision", "mean_cosine", "min_cosine"}`` against float32 (``cpu_precision: bfloat16``).
    precision_check: dict[str, Any] | None = None
    #: ``{"samples", "min_side", "changed", "mean_cosine", "min_cosine"}`` (``decode: reduced``).
    decode_check: dict[str, Any] | None = None


class PluginVersion(_Model):
    name: str
    distribution: str | None
    version: str | None


class Environment(_Model):
    python: str
    platform: str
    sslbench: str
    torch: str | None
    numpy: str
    scikit_learn: str
    scipy: str
    device: str
    plugins: list[PluginVersion]


class Results(_Model):
    schema_version: int = SCHEMA_VERSION
    sslbench_version: str
    created: str
    spec: dict[str, Any] | None
    environment: Environment
    wall_s: float
    #: How reports show each metric of the runs, in the order of their columns (empty in schema 1).
    metrics: dict[str, MetricInfo] = Field(default_factory=dict)
    #: The metrics reports show, in order (the spec's ``report.metrics``, ``sslbench report --metrics``);
    #: None: every metric, the headline ones first (see :func:`sslbench.table.default_metrics`).
    columns: list[str] | None = None
    runs: list[Run]
    #: Each probe of each model × dataset, once (schema 3; in schema 2 the kNN was in the runs' metrics).
    probes: list[ProbeRecord] = Field(default_factory=list)
    summary: list[SummaryRow]
    skipped: list[SkippedSample] = Field(default_factory=list)
    #: One record per model × split extracted by a spec's run; left out of the JSON when empty (results of
    #: the API's features, older files), so that such results read as before.
    extraction: list[ExtractionRecord] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _without_extraction_when_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if not self.extraction:
            data.pop("extraction", None)
        return data

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def metric_names(self) -> list[str]:
        """Every metric of the results: the described ones in their order, then any other a row holds."""
        names = dict.fromkeys(self.metrics)
        for row in self.summary:
            names.update(dict.fromkeys(row.metrics))
        for run in self.runs:
            names.update(dict.fromkeys(run.metrics))
        return list(names)

    def metric_info(self, name: str) -> MetricInfo:
        """How ``name`` is shown: its descriptor, or for results without one :func:`schema1_info`."""
        return self.metrics.get(name) or schema1_info(name)

    def with_columns(self, names: Sequence[str] | None, what: str = "report metrics") -> Results:
        """These results with ``names`` as the report columns, in that order (None: the default choice).

        An unknown or repeated name is a one-line :class:`SSLBenchError` starting with ``what``, with a
        did-you-mean.
        """
        if names is None:
            return self.model_copy(update={"columns": None})
        checked = checked_columns(names, self.metric_names(), what, "the results")
        return self.model_copy(update={"columns": checked})

    def write(self, path: str | Path) -> Path:
        """Write results.json atomically; an unwritable place or a full disk raises :class:`SSLBenchError`."""
        return write_output(Path(path), self.to_json())


def checked_columns(names: Sequence[str], known: Sequence[str], what: str, holder: str) -> list[str]:
    """``names`` as a list of report columns, each one of ``known`` (the metrics ``holder`` has), none
    twice, at least one; else a one-line :class:`SSLBenchError` starting with ``what``."""
    if isinstance(names, str) or not names:
        raise SSLBenchError(f"{what}: give a list of metric names (e.g. acc,nmi)")
    for index, name in enumerate(names):
        if name not in known:
            hint = did_you_mean(name, known) or f"; {holder} have: {', '.join(known) or 'none'}"
            raise SSLBenchError(f"{what}: unknown metric '{name}'{hint}")
        if name in names[:index]:
            raise SSLBenchError(f"{what}: '{name}' is listed twice")
    return list(names)


def version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def sslbench_version() -> str:
    return version_of("sslbench") or "0+unknown"


def environment(device: str, plugins: Plugins) -> Environment:
    """Versions of everything that can change a number, and the plugins that were loaded."""
    loaded = [
        PluginVersion(name=p.name, distribution=p.distribution, version=p.version)
        for p in plugins.plugins
        if p.error is None
    ]
    return Environment(
        python=platform.python_version(),
        platform=platform.platform(),
        sslbench=sslbench_version(),
        torch=version_of("torch"),
        numpy=version_of("numpy") or "unknown",
        scikit_learn=version_of("scikit-learn") or "unknown",
        scipy=version_of("scipy") or "unknown",
        device=device,
        plugins=loaded,
    )


PublishedLookup = Callable[[str, RunProtocol], Published | None]


def summarize(
    runs: Iterable[Run], published: PublishedLookup | None = None, probes: Sequence[ProbeRecord] = ()
) -> list[SummaryRow]:
    """Mean and sample std (ddof=1) of every metric over the seeds of each protocol point, and the values
    of the probes of its model × dataset (on the same eval split; no std: a probe has no seed).

    ``published(model, protocol)`` may return the published value of a row, shown beside it.
    """
    groups: dict[tuple[str, str, RunProtocol], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.model, run.dataset, run.protocol), []).append(run)
    rows = []
    for (model, dataset, protocol), group in groups.items():
        metrics = {}
        for name in group[0].metrics:
            values = [run.metrics[name] for run in group]
            finite = all(math.isfinite(v) for v in values)
            std = statistics.stdev(values) if len(values) > 1 and finite else None
            metrics[name] = MetricSummary(mean=statistics.fmean(values), std=std)
        for probe in probes:
            if (probe.model, probe.dataset, probe.eval_split) == (model, dataset, protocol.eval_split):
                metrics.update({name: MetricSummary(mean=value, std=None) for name, value in probe.metrics.items()})
        rows.append(
            SummaryRow(
                model=model,
                backbone=group[0].backbone,
                dataset=dataset,
                protocol=protocol,
                n_seeds=len(group),
                seeds=[run.seed for run in group],
                metrics=metrics,
                published=published(model, protocol) if published else None,
            )
        )
    return rows


def build_results(
    runs: list[Run],
    *,
    spec: dict[str, Any] | None,
    env: Environment,
    wall_s: float,
    metrics: Mapping[str, MetricInfo] | None = None,
    columns: Sequence[str] | None = None,
    skipped: list[SkippedSample] | None = None,
    published: PublishedLookup | None = None,
    extraction: list[ExtractionRecord] | None = None,
    probes: Sequence[ProbeRecord] = (),
) -> Results:
    """The results of ``runs`` and ``probes``; ``metrics`` describes (at least) every metric they hold, in
    column order (None: none is described, and reports show them as :func:`schema1_info` says)."""
    recorded = {name for run in runs for name in run.metrics} | {name for probe in probes for name in probe.metrics}
    metrics = metrics if metrics is not None else {}
    missing = sorted(recorded - metrics.keys()) if metrics else []
    if missing:  # the producer of the runs forgot to describe what it recorded: a bug, not a user error
        raise ValueError(f"metrics recorded without a descriptor: {', '.join(missing)}")
    results = Results(
        skipped=skipped or [],
        extraction=extraction or [],
        sslbench_version=sslbench_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec=spec,
        environment=env,
        wall_s=wall_s,
        metrics={name: info for name, info in metrics.items() if name in recorded},
        runs=runs,
        probes=list(probes),
        summary=summarize(runs, published, probes),
    )
    # Chosen before the run and checked there (:func:`checked_columns`): a column of a dataset not yet
    # run is kept for the results rewritten once it is.
    return results.model_copy(update={"columns": list(columns)}) if columns is not None else results


def merged_descriptors(parts: Sequence[Results], sources: Sequence[str]) -> dict[str, MetricInfo]:
    """The descriptor tables of several results files as one; a metric described differently by two
    files is a one-line :class:`SSLBenchError` naming both."""
    merged: dict[str, MetricInfo] = {}
    origin: dict[str, str] = {}
    for part, source in zip(parts, sources, strict=True):
        for name, info in part.metrics.items():
            if name not in merged:
                merged[name], origin[name] = info, source
            elif merged[name] != info:
                theirs = merged[name]
                differ = next(f for f in MetricInfo.model_fields if getattr(info, f) != getattr(theirs, f))
                raise SSLBenchError(
                    f"metric '{name}' is described differently in {origin[name]} and {source} "
                    f"({differ}: {getattr(theirs, differ)!r} vs {getattr(info, differ)!r}); "
                    "were they written with different versions of its plugin?"
                )
    return merged


def merge_results(parts: list[Results], sources: list[str]) -> Results:
    """Several results files as one: runs, summary rows and skipped samples side by side.

    Each file's summary is kept as computed there; the environment is the first file's, and the
    spec records which files were merged. The metric descriptors are merged (see
    :func:`merged_descriptors`); the report columns are kept when every file chose the same.
    """
    if len(parts) == 1:
        return parts[0]
    columns = parts[0].columns if all(part.columns == parts[0].columns for part in parts) else None
    return Results(
        sslbench_version=sslbench_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec={"merged": sources},
        environment=parts[0].environment,
        wall_s=sum(part.wall_s for part in parts),
        metrics=merged_descriptors(parts, sources),
        columns=columns,
        runs=[run for part in parts for run in part.runs],
        probes=[probe for part in parts for probe in part.probes],
        summary=[
            row.model_copy(update={"source": row.source or source})
            for part, source in zip(parts, sources, strict=True)
            for row in part.summary
        ],
        skipped=[sample for part in parts for sample in part.skipped],
        extraction=[record for part in parts for record in part.extraction],
    )


def load_results(path: str | Path) -> Results:
    """A results.json (or the one in a run directory); anything else is a one-line :class:`SSLBenchError`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SSLBenchError(f"results file not found: {path}") from None
    except UnicodeDecodeError:
        raise SSLBenchError(f"{path}: not an sslbench results file: not UTF-8 text (a binary file?)") from None
    except (OSError, ValueError) as exc:
        raise SSLBenchError(f"cannot read results file {path}: {reason(exc)}") from None
    try:
        return Results.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = (str(first["msg"]).strip().splitlines() or [""])[0]
        raise SSLBenchError(f"{path}: not an sslbench results file: {where}: {message}") from None


def reason(exc: BaseException) -> str:
    """An OS error's reason in one line (``Permission denied``), or the exception's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader never sees a partial file.

    The file gets the permissions of a file created by ``open`` (``0o666`` less the umask), or keeps
    those of the file it replaces; the temporary file it is written to is private until then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_output(path: Path, text: str) -> Path:
    """:func:`write_atomic` for a file the user asked for (results, reports): an unwritable place or a
    full disk is a one-line :class:`SSLBenchError` naming the file."""
    try:
        return write_atomic(path, text)
    except (OSError, ValueError) as exc:
        raise SSLBenchError(f"cannot write {shown_path(path)}: {reason(exc)}") from None


def shown_path(path: Path | str) -> str:
    """A path as messages show it: as is, or quoted with escapes when it holds unprintable characters."""
    text = str(path)
    return text if text.isprintable() else repr(text)
