"""The results model: what a run produced, serialised as results.json.

Every report, export and plot is a rendering of a :class:`Results`; ``sslbench report`` reads it
back from another machine. The JSON schema is documented in README.md ("results.json").
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import stat
import statistics
import tempfile
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from sslbench.errors import SSLBenchError

if TYPE_CHECKING:
    from sslbench.plugins import Plugins

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Timings(_Model):
    """Wall-clock seconds. ``extract_s``, ``pca_s`` and ``knn_s`` are shared by the runs that reuse them."""

    extract_s: float
    pca_s: float
    kmeans_s: float
    eval_s: float
    #: The kNN search and vote (``protocol.knn``), once per model × dataset; None, and left out of the
    #: JSON, when kNN is off, so that results without kNN read as before (older readers forbid new keys).
    knn_s: float | None = None

    @model_serializer(mode="wrap")
    def _without_knn_when_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if self.knn_s is None:
            data.pop("knn_s", None)
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
    runs: list[Run]
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

    def write(self, path: str | Path) -> Path:
        """Write results.json atomically; an unwritable place or a full disk raises :class:`SSLBenchError`."""
        return write_output(Path(path), self.to_json())


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


def summarize(runs: Iterable[Run], published: PublishedLookup | None = None) -> list[SummaryRow]:
    """Mean and sample std (ddof=1) of every metric over the seeds of each protocol point.

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
    skipped: list[SkippedSample] | None = None,
    published: PublishedLookup | None = None,
    extraction: list[ExtractionRecord] | None = None,
) -> Results:
    return Results(
        skipped=skipped or [],
        extraction=extraction or [],
        sslbench_version=sslbench_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec=spec,
        environment=env,
        wall_s=wall_s,
        runs=runs,
        summary=summarize(runs, published),
    )


def merge_results(parts: list[Results], sources: list[str]) -> Results:
    """Several results files as one: runs, summary rows and skipped samples side by side.

    Each file's summary is kept as computed there; the environment is the first file's, and the
    spec records which files were merged.
    """
    if len(parts) == 1:
        return parts[0]
    return Results(
        sslbench_version=sslbench_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec={"merged": sources},
        environment=parts[0].environment,
        wall_s=sum(part.wall_s for part in parts),
        runs=[run for part in parts for run in part.runs],
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
