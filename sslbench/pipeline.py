"""The protocol on extracted features, as named stages over one resolved plan.

For one model on one dataset (a :class:`ProtocolPlan`, checked by :func:`plan_protocol`)::

    fit_reducer      PCA fitted once on the train features (all components)
    project_splits   per pca_dims: train, eval and transfer features projected chunk by chunk
                     into memory-mapped files in the run's scratch folder
    cluster_seed     per protocol point and seed: k-means fitted on the projected train split,
                     then every split predicted (in row chunks)
    score_seed       the train assignment (Hungarian on the train contingency, majority for extra
                     clusters), then every metric plugin on the eval split, on each class group
                     and on each transfer target
    save_predictions the run's cluster ids, when asked

and, once per plan, for each of the spec's probes (kNN, linear, a plugin's: :class:`ProbeEntry`)::

    run_probes       each probe learns from the train split's raw features and labels (no PCA, no
                     seed) and scores the eval split

A probe's values are stored once per model × dataset (:class:`~sslbench.results.ProbeRecord`, with its
options, details, notes and time), not in the runs; each summary row of that model × dataset shows them.

No stage holds a whole feature or projection matrix in memory: inputs are read and outputs written in
row chunks, so a full ImageNet run needs a few GB of RAM whatever the feature dimension. Only the
cluster ids (8 bytes per sample) are kept whole.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ValidationError

from sslbench.arrays import RowReader, RowWriter, available_memory_bytes, projection_scale
from sslbench.errors import PluginFailure, SSLBenchError, did_you_mean, exception_line
from sslbench.events import Emit, Event, ignore
from sslbench.inputs import (
    FeatureSplit,
)
from sslbench.interfaces import (
    DEFAULT_CHUNK_ROWS,
    BackendEntry,
    ClustererConfig,
    MetricEntry,
    ProbeData,
    Reducer,
    ReducerConfig,
    ScoringContext,
    iter_chunks,
)
from sslbench.predictions import predictions_name, save_predictions
from sslbench.progress import NullProgress, Progress
from sslbench.protocol import contingency
from sslbench.results import MetricInfo, ProbeRecord, Run, RunProtocol, Timings
from sslbench.spec import ProtocolPoint, ProtocolSpec, ResolvedProbe, one_line
from sslbench.transfer import TRANSFER_METRIC_INFO, TRANSFER_METRICS, ClassMap, transfer_scores

if TYPE_CHECKING:
    from sslbench.plugins import Plugins


@dataclass(frozen=True)
class TransferTarget:
    """Another dataset's split that the clusters fitted on train also predict (Table C.2)."""

    label: str
    split: str
    features: FeatureSplit
    class_map: ClassMap


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class ProtocolPlan:
    """One model on one dataset, resolved and checked: everything the stages read."""

    model: str
    dataset: str
    train: FeatureSplit
    eval: FeatureSplit
    n_classes: int
    protocol: ProtocolSpec
    backend: BackendEntry
    backend_options: BaseModel
    metrics: tuple[MetricEntry, ...]
    #: How messages name each metric's and probe's code: ``metric 'm' (plugin 'p' from dist 1.0)``.
    metric_owners: Mapping[str, str] = field(default_factory=dict)
    probe_owners: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    #: The registered backbone (null for the API's features): runs record it for the plots.
    backbone: str | None = None
    #: The dataset's names of the fit and eval splits, recorded in each run.
    fit_split: str = "train"
    eval_split: str = "val"
    class_groups: Mapping[str, np.ndarray] = field(default_factory=dict)
    transfers: tuple[TransferTarget, ...] = ()
    extract_s: float = 0.0
    predictions_dir: Path | None = None
    #: The probes run once on this model × dataset.
    probes: tuple[ResolvedProbe, ...] = ()
    #: The split the probes learn from and its name, when the k-means is fitted on another one (a preset
    #: with ``fit_on: eval_split``): a probe always learns from the train split and scores the eval split.
    probe_train: FeatureSplit | None = None
    probe_fit_split: str | None = None
    #: With several presets (``protocol.preset``), one plan per preset, each with its resolved protocol.
    variants: tuple[ProtocolPlan, ...] = ()

    @functools.cached_property
    def points(self) -> list[ProtocolPoint]:
        return self.protocol.points(self.n_classes)

    @functools.cached_property
    def shared_scores(self) -> dict[str, dict[str, float]]:
        """Per scored set of rows (the eval split, a class group, a transfer target), the values every
        run of this plan shares (:attr:`ScoringContext.shared`: RankMe)."""
        return {}

    @functools.cached_property
    def metric_descriptors(self) -> dict[str, MetricInfo]:
        """Every metric the runs of this plan record, described (see :func:`metric_descriptors`)."""
        return metric_descriptors(self.metrics, self.class_groups, self.probes, bool(self.transfers))

    @property
    def labeled(self) -> bool:
        """Whether the splits have class labels (else only the label-free metrics are scored)."""
        return self.n_classes > 0


def validated_backend_options(backend: BackendEntry, options: Mapping[str, object]) -> BaseModel:
    """``protocol.backend_options`` through the backend's options model (the API's path; a spec's
    options are validated by :func:`sslbench.spec.resolve_spec` with file and line)."""
    try:
        return backend.options.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in ("protocol", "backend_options", *err["loc"]))
        raise SSLBenchError(f"{where}: {err['msg']}") from None


def plan_protocol(
    train: FeatureSplit,
    eval_: FeatureSplit,
    *,
    n_classes: int,
    protocol: ProtocolSpec,
    plugins: Plugins,
    model: str,
    dataset: str,
    backend_options: BaseModel | None = None,
    **extra: object,
) -> ProtocolPlan:
    """The plan of each preset of ``protocol`` (:meth:`ProtocolSpec.resolved`), checked by
    :func:`plan_resolved`: the first, holding all of them in ``variants`` when there are several (each
    then saves its predictions in a sub-folder named after its preset). ``backend_options`` (validated)
    serve the presets that run the first preset's backend; the others validate ``protocol.backend_options``."""
    variants = []
    several = len(protocol.preset) > 1
    protocols = protocol.resolved()
    for resolved in protocols:
        options = backend_options if resolved.backend == protocols[0].backend else None
        own: dict[str, object] = dict(extra)
        if resolved.fit_on == "eval_split":
            own["fit_split"] = extra.get("eval_split", ProtocolPlan.eval_split)
        folder = extra.get("predictions_dir")
        if several and isinstance(folder, Path):
            own["predictions_dir"] = folder / resolved.preset[0]
        fit = eval_ if resolved.fit_on == "eval_split" else train
        planned = plan_resolved(
            fit,
            eval_,
            n_classes=n_classes,
            protocol=resolved,
            plugins=plugins,
            model=model,
            dataset=dataset,
            backend_options=options,
            **own,
        )
        if fit is not train:
            planned = replace(planned, probe_train=train, probe_fit_split=str(extra.get("fit_split", "train")))
        variants.append(planned)
    return replace(variants[0], variants=tuple(variants)) if several else variants[0]


def plan_resolved(
    train: FeatureSplit,
    eval_: FeatureSplit,
    *,
    n_classes: int,
    protocol: ProtocolSpec,
    plugins: Plugins,
    model: str,
    dataset: str,
    backend_options: BaseModel | None = None,
    **extra: object,
) -> ProtocolPlan:
    """Check that the splits, the protocol and the transfer targets fit together; resolve the backend
    and the metrics. Every problem is found here, before any computation.

    ``extra`` sets the other :class:`ProtocolPlan` fields (device, backbone, split names, groups,
    transfers, extraction time, predictions folder).

    Splits without labels (``n_classes`` 0) are clustered and given the label-free scores only.
    """
    if n_classes == 0:
        check_label_free(protocol, extra, train.name)
    else:
        top = max(int(train.labels.max()), int(eval_.labels.max()))
        if top >= n_classes:
            raise SSLBenchError(f"labels go up to {top} but the dataset has {n_classes} classes")
    if train.features.shape[1] != eval_.features.shape[1]:
        raise SSLBenchError(
            f"{train.name} features have {train.features.shape[1]} dims but {eval_.name} features have "
            f"{eval_.features.shape[1]}; both splits must come from the same model"
        )
    n_train, dims = train.features.shape
    most_clusters = max(p.n_clusters for p in protocol.points(n_classes))
    if n_train < most_clusters:
        raise SSLBenchError(f"{train.name} has {n_train} samples, fewer than the {most_clusters} clusters asked for")
    most_dims = max((d for d in protocol.pca_dims if d is not None), default=None)
    if most_dims is not None and most_dims > min(n_train, dims):
        raise SSLBenchError(
            f"pca_dims={most_dims} exceeds what {train.name} allows: "
            f"min({n_train} samples, {dims} feature dims) = {min(n_train, dims)}"
        )
    transfers: Sequence[TransferTarget] = extra.get("transfers", ())  # type: ignore[assignment]
    for target in transfers:
        if target.features.features.shape[1] != dims:
            raise SSLBenchError(
                f"{target.features.name} features have {target.features.features.shape[1]} dims but "
                f"{train.name} features have {dims}; both must come from the same model"
            )
        if target.class_map.n_source != n_classes:
            raise SSLBenchError(
                f"{target.features.name}: its class map refers to {target.class_map.n_source} source classes "
                f"but {train.name} has {n_classes}"
            )
    probes: Sequence[ResolvedProbe] = extra.get("probes", ())  # type: ignore[assignment]
    for probe in probes:
        if probe.entry.check is not None:
            probe.entry.check(probe.options, n_train, train.name)
    backend = plugins.backends.get(protocol.backend)
    refused = backend.refusal(protocol.algorithm, protocol.n_init)
    if refused:
        raise SSLBenchError(f"protocol (preset {protocol.preset[0]}): {refused}")
    recorded = [*plugins.metrics.names(), *(name for probe in probes for name in probe.metrics())]
    if protocol.main_score not in recorded:
        raise SSLBenchError(
            f"protocol (preset {protocol.preset[0]}): main_score '{protocol.main_score}' is not a metric of the run"
            f"{did_you_mean(protocol.main_score, recorded)}"
        )
    options = (
        backend_options if backend_options is not None else validated_backend_options(backend, protocol.backend_options)
    )
    return ProtocolPlan(
        model=model,
        dataset=dataset,
        train=train,
        eval=eval_,
        n_classes=n_classes,
        protocol=protocol,
        backend=backend,
        backend_options=options,
        metrics=tuple(e for e in plugins.metrics if n_classes or not e.needs_labels),
        metric_owners={
            entry.name: f"metric '{entry.name}' ({plugins.plugin_of(plugins.metrics, entry.name).label})"
            for entry in plugins.metrics
        },
        probe_owners={
            probe.name: f"probe '{probe.name}' ({plugins.plugin_of(plugins.probes, probe.name).label})"
            for probe in probes
            if probe.name in plugins.probes
        },
        **{**extra, "transfers": tuple(transfers), "probes": tuple(probes)},  # type: ignore[arg-type]
    )


def check_label_free(protocol: ProtocolSpec, extra: Mapping[str, object], split: str) -> None:
    """What a plan of splits without labels cannot do, refused in one line: choose k by the number of
    classes, probes, transfer targets, class groups."""
    if None in protocol.k:
        raise SSLBenchError(f"{split} has no labels, so there is no number of classes to take k from: give protocol.k")
    for key, what in (("probes", "probes learn from labels"), ("transfers", "transfer maps classes")):
        if extra.get(key):
            raise SSLBenchError(f"{split} has no labels, and {what}: remove the {key}")
    if extra.get("class_groups"):
        raise SSLBenchError(f"{split} has no labels, so class groups select nothing: remove them")


# --------------------------------------------------------------------------------------------------
# Stage: fit the reducer


class Unreduced(Reducer):
    """No PCA (``protocol.pca: false``): k-means sees the features themselves, as float32."""

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def fit(self, features: np.ndarray) -> None:
        """Nothing to learn."""

    @property
    def n_components(self) -> int:
        return self.dims

    def project(self, rows: np.ndarray, n_components: int, whiten: bool) -> np.ndarray:
        return np.asarray(rows, dtype=np.float32)


@dataclass(frozen=True)
class FittedReducer:
    reducer: Reducer
    n_components: int
    fit_s: float


def fit_reducer(plan: ProtocolPlan, progress: Progress, emit: Emit = ignore) -> FittedReducer:
    """PCA with all components, fitted once on the train split; every ``pca_dims`` truncates it."""
    started = time.perf_counter()
    if not plan.protocol.pca:
        unreduced = Unreduced(plan.train.features.shape[1])
        return FittedReducer(unreduced, unreduced.n_components, time.perf_counter() - started)
    emit(Event("stage", f"{plan.model}/{plan.dataset}: PCA on {plan.train.features.shape}", name="fit-pca"))
    task = progress.task(f"PCA {plan.model}/{plan.dataset}", len(plan.train.features), unit="rows")
    reducer = plan.backend.pca(ReducerConfig(device=plan.device, options=plan.backend_options, on_rows=task.advance))
    reducer.fit(plan.train.features)
    found = reducer.n_components
    too_many = [d for d in plan.protocol.pca_dims if d is not None and d > found]
    if too_many:
        raise SSLBenchError(
            f"pca_dims={max(too_many)} exceeds the {found} components the PCA of {plan.train.name} found"
        )
    return FittedReducer(reducer, found, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# Stage: project every split


@dataclass(frozen=True)
class Projected:
    """Every split projected onto ``dims`` components, as read-only memory maps."""

    dims: int
    train: np.ndarray
    eval: np.ndarray
    transfers: tuple[np.ndarray, ...]
    pca_s: float


def project_to_file(
    reducer: Reducer, features: np.ndarray, n_components: int, whiten: bool, path: Path, name: str
) -> tuple[np.ndarray, float]:
    """``features`` projected chunk by chunk into the ``.npy`` file ``path``; returns its memory map
    and the projections' largest magnitude."""
    reader = RowReader(features)
    writer = RowWriter(path, len(reader), n_components)
    max_abs = 0.0
    try:
        for rows in iter_chunks(len(reader), DEFAULT_CHUNK_ROWS):
            projected = np.asarray(reducer.project(reader.rows(rows, as_float32=False), n_components, whiten))
            expected = (rows.stop - rows.start, n_components)
            if projected.shape != expected:
                raise RuntimeError(
                    f"backend's project() returned shape {projected.shape} for {expected[0]} rows and "
                    f"{n_components} components"
                )
            if not np.isfinite(projected).all():
                raise SSLBenchError(
                    f"{name}: the PCA projection overflowed to NaN or inf (features of extreme magnitude?); "
                    "rescale the features"
                )
            max_abs = max(max_abs, float(np.abs(projected).max()))
            writer.write(projected)
    except OSError as exc:
        writer.close()
        raise SSLBenchError(f"cannot write the projection of {name} to {path}: {exc.strerror or exc}") from None
    finally:
        reader.release()
    return writer.finish(), max_abs


#: Projections of at most this many bytes in all are read into memory once per protocol point:
#: k-means gathers random rows every batch, and from memory that is a copy, from the file a system
#: call per run of rows. Larger ones (ImageNet's: 10 GB) stay memory-mapped files, read in bounded memory.
IN_MEMORY_PROJECTIONS = 1 << 30


def in_memory_if_small(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` (memory maps of projection files) copied into memory when they are small enough in
    all, and take at most a quarter of the memory still available."""
    total = sum(int(a.nbytes) for a in arrays)
    available = available_memory_bytes()
    if total > IN_MEMORY_PROJECTIONS or (available is not None and total > available // 4):
        return arrays
    copies = []
    for array in arrays:
        reader = RowReader(array)
        try:
            rows = reader.rows(slice(0, len(reader)), as_float32=False)
            copies.append(rows.copy() if np.shares_memory(rows, array) else rows)
        finally:
            reader.release()
    return copies


def rescale_projection(projection: np.ndarray, exponent: int, path: Path, name: str) -> np.ndarray:
    """The projection file ``path`` (memory-mapped as ``projection``) multiplied by ``2**exponent``,
    exactly, in row chunks; returns the new memory map."""
    scaled_path = path.with_name(f"{path.stem}.scaled.npy")
    reader = RowReader(projection)
    writer = RowWriter(scaled_path, *projection.shape)
    try:
        for rows in iter_chunks(len(reader), DEFAULT_CHUNK_ROWS):
            writer.write(np.ldexp(reader.rows(rows), exponent))
    except OSError as exc:
        writer.close()
        raise SSLBenchError(f"cannot write the projection of {name} to {scaled_path}: {exc.strerror or exc}") from None
    finally:
        reader.release()
    del projection
    writer.finish()
    os.replace(scaled_path, path)
    # Readers open a memory map's file by name: map the file under its final name.
    return np.load(path, mmap_mode="r")


def project_splits(
    plan: ProtocolPlan, fitted: FittedReducer, dims: int | None, scratch: Path, emit: Emit = ignore
) -> Projected:
    """The projections one ``pca_dims`` value needs, in the scratch folder (replacing the last ones);
    rescaled by one power of two when the train projections' magnitude needs it (:func:`projection_scale`)."""
    n = fitted.n_components if dims is None else dims
    emit(Event("stage", f"{plan.model}/{plan.dataset}: projecting onto {n} components", name="project"))
    started = time.perf_counter()
    whiten = plan.protocol.whiten
    scratch.mkdir(parents=True, exist_ok=True)
    named = [(plan.train.name, plan.train.features, "train"), (plan.eval.name, plan.eval.features, "eval")]
    named += [(t.features.name, t.features.features, f"transfer{i}") for i, t in enumerate(plan.transfers)]
    projected = []
    for name, features, stem in named:
        path = scratch / f"{stem}.npy"
        projected.append((*project_to_file(fitted.reducer, features, n, whiten, path, name), path, name))
    exponent = projection_scale(projected[0][1])
    if exponent:
        emit(
            Event(
                "note",
                f"{plan.model}/{plan.dataset}: PCA projections of magnitude {projected[0][1]:.3g} scaled by "
                f"2^{exponent} for float32 k-means (exact; k-means is scale-invariant)",
            )
        )
        arrays = [rescale_projection(z, exponent, path, name) for z, _, path, name in projected]
    else:
        arrays = [z for z, _, _, _ in projected]
    arrays = in_memory_if_small(arrays)
    return Projected(n, arrays[0], arrays[1], tuple(arrays[2:]), fitted.fit_s + time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# Stage: cluster one seed


@dataclass(frozen=True)
class SeedPredictions:
    train_pred: np.ndarray
    eval_pred: np.ndarray
    transfer_pred: tuple[np.ndarray, ...]
    kmeans_s: float
    predict_s: float


def cluster_seed(
    plan: ProtocolPlan,
    point: ProtocolPoint,
    seed: int,
    projected: Projected,
    progress: Progress,
    emit: Emit = ignore,
) -> SeedPredictions:
    """k-means fitted on the projected train split with ``seed``; then every split predicted."""
    where = f"{plan.model}/{plan.dataset} k={point.n_clusters} seed {seed}"
    emit(Event("stage", where, name="kmeans"))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        task.advance()

    chosen = plan.protocol
    config = ClustererConfig(
        point.n_clusters,
        point.epochs,
        point.batch_size,
        seed,
        plan.device,
        plan.backend_options,
        step,
        algorithm=chosen.algorithm,
        n_init=chosen.n_init,
        max_iter=chosen.max_iter,
        tol=chosen.tol,
    )
    total, unit = BackendEntry.steps(config)
    task = progress.task(f"k-means {where}", total, unit=unit)
    started = time.perf_counter()
    clusterer = plan.backend.kmeans(config)
    clusterer.fit(projected.train)
    kmeans_s = time.perf_counter() - started
    if done < total:  # a fit that converged early: the bar ends full
        task.advance(total - done)

    emit(Event("stage", where, name="predict"))
    started = time.perf_counter()
    named = [(plan.train.name, projected.train), (plan.eval.name, projected.eval)]
    named += [(t.features.name, z) for t, z in zip(plan.transfers, projected.transfers, strict=True)]
    predictions = []
    for name, z in named:
        pred = np.asarray(clusterer.predict(z), dtype=np.int64)
        if pred.shape != (len(z),) or (len(pred) and (pred.min() < 0 or pred.max() >= point.n_clusters)):
            raise RuntimeError(
                f"backend '{plan.backend.name}' returned cluster ids outside [0, {point.n_clusters}) or of the "
                f"wrong shape {pred.shape} for {name}"
            )
        predictions.append(pred)
    return SeedPredictions(
        predictions[0], predictions[1], tuple(predictions[2:]), kmeans_s, time.perf_counter() - started
    )


# --------------------------------------------------------------------------------------------------
# Stage: assign and score


def _context(
    train_pred: np.ndarray,
    train_labels: np.ndarray,
    train_cost: np.ndarray | None,
    eval_pred: np.ndarray,
    eval_labels: np.ndarray,
    n_clusters: int,
    n_classes: int,
    assignment: np.ndarray | None = None,
    space: ScoredSpace | None = None,
) -> ScoringContext:
    ctx = ScoringContext(
        train_pred=train_pred,
        train_labels=train_labels,
        eval_pred=eval_pred,
        eval_labels=eval_labels,
        n_clusters=n_clusters,
        n_classes=n_classes,
        train_contingency=_no_classes(n_clusters) if train_cost is None else train_cost,
        eval_contingency=contingency(eval_pred, eval_labels, n_clusters, n_classes)
        if n_classes
        else _no_classes(n_clusters),
    )
    if space is not None:
        ctx = dataclasses.replace(
            ctx,
            eval_space=space.projection,
            eval_features=space.features,
            eval_rows=space.rows,
            fit_features=space.fit_features,
            seed=space.seed,
            silhouette_rows=space.silhouette_rows,
            shared=space.shared,
        )
    if assignment is not None:
        # The assignment is a function of the train contingency alone: contexts derived from one run
        # share it instead of solving the same Hungarian problem again.
        ctx.__dict__["train_assignment"] = assignment
    return ctx


def _no_classes(n_clusters: int) -> np.ndarray:
    """The contingency table of splits without labels: no class column."""
    return np.zeros((n_clusters, 0), dtype=np.int64)


def _metrics(plan: ProtocolPlan, ctx: ScoringContext) -> dict[str, float]:
    if len(ctx.eval_labels) == 0:
        return {entry.name: float("nan") for entry in plan.metrics}
    return {entry.name: _metric_value(entry, ctx, plan.metric_owners) for entry in plan.metrics}


def _metric_value(entry: MetricEntry, ctx: ScoringContext, owners: Mapping[str, str]) -> float:
    """``entry``'s value for ``ctx``; what its function raises or returns instead of a number is a
    :class:`~sslbench.errors.PluginFailure` naming the metric and its plugin."""
    owner = owners.get(entry.name, f"metric '{entry.name}'")
    try:
        value = entry.fn(ctx)
    except SSLBenchError:
        raise
    except Exception as exc:
        raise PluginFailure(f"{owner}: its function raised {exception_line(exc)}") from exc
    if isinstance(value, bool | str | bytes):
        raise PluginFailure(f"{owner}: its function returned {value!r}, not a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        shown = one_line(repr(value), 80)
        raise PluginFailure(f"{owner}: its function returned {type(value).__name__} {shown}, not a number") from None


def group_metric(metric: str, group: str) -> str:
    """Name under which a metric restricted to a class group is recorded: ``acc_in_imagenet``."""
    return f"{metric}_{group}"


def metric_descriptors(
    entries: Sequence[MetricEntry], class_groups: Iterable[str], probes: Sequence[ResolvedProbe], transfer: bool
) -> dict[str, MetricInfo]:
    """How the reports show every metric a plan records, in column order: the registered metrics,
    each again per class group, the transfer metrics (when there are transfer targets), the probes'
    in the order of the probes. Results carry this table (results.json ``metrics``)."""
    described = {entry.name: entry.info for entry in entries}
    for group in class_groups:
        described.update({group_metric(e.name, group): e.info.in_group(e.name, group) for e in entries})
    if transfer:
        described.update({n: info for n, info in TRANSFER_METRIC_INFO.items() if n not in described})
    for probe in probes:
        described.update(probe.metrics())
    return described


@dataclass(frozen=True)
class ScoredSpace:
    """What the label-free scores of one scored set of rows read: the split's projection (the space the
    clusters were fitted in) and raw features, the rows scored, the run's seed, the silhouette's
    sample size, and the values shared by every run of this model × split (:attr:`ScoringContext.shared`)."""

    projection: np.ndarray
    features: np.ndarray
    rows: np.ndarray | None
    seed: int
    silhouette_rows: int
    shared: dict[str, float]
    #: The raw features of the split the clusters were fitted on (RankMe of the fit split); only where
    #: every eval row is scored (not a class group's or transfer target's subset).
    fit_features: np.ndarray | None = None

    def restricted(self, inside: np.ndarray, shared: dict[str, float]) -> ScoredSpace:
        """The same space scoring only the rows where ``inside`` is true."""
        return ScoredSpace(
            self.projection, self.features, np.flatnonzero(inside), self.seed, self.silhouette_rows, shared
        )


@dataclass(frozen=True)
class SeedScores:
    metrics: dict[str, float]
    #: Per transfer target: its metrics and the number of target samples scored.
    transfers: tuple[tuple[dict[str, float], int], ...]


def score_seed(
    plan: ProtocolPlan,
    n_clusters: int,
    preds: SeedPredictions,
    emit: Emit = ignore,
    projected: Projected | None = None,
    seed: int = 0,
) -> SeedScores:
    """Every metric plugin on the eval split, on each class group's samples and on each transfer target.

    The train assignment (Hungarian on the train contingency, majority for extra clusters) is solved
    once and shared by all of them. ``projected`` (the splits in the space the clusters were fitted
    in) and ``seed`` are what the label-free scores read; without them those scores are NaN.
    """
    emit(Event("stage", f"{plan.model}/{plan.dataset} k={n_clusters}", name="score"))
    train_cost = contingency(preds.train_pred, plan.train.labels, n_clusters, plan.n_classes) if plan.labeled else None
    shared = plan.shared_scores
    space = (
        None
        if projected is None
        else ScoredSpace(
            projected.eval,
            plan.eval.features,
            None,
            seed,
            plan.protocol.silhouette_rows,
            shared.setdefault("", {}),
            fit_features=plan.train.features,
        )
    )
    ctx = _context(
        preds.train_pred,
        plan.train.labels,
        train_cost,
        preds.eval_pred,
        plan.eval.labels,
        n_clusters,
        plan.n_classes,
        space=space,
    )
    metrics = _metrics(plan, ctx)
    for group, classes in plan.class_groups.items():
        inside = np.isin(plan.eval.labels, classes)
        sub = _context(
            preds.train_pred,
            plan.train.labels,
            train_cost,
            preds.eval_pred[inside],
            plan.eval.labels[inside],
            n_clusters,
            plan.n_classes,
            ctx.train_assignment,
            space and space.restricted(inside, shared.setdefault(f"group {group}", {})),
        )
        metrics.update({group_metric(name, group): value for name, value in _metrics(plan, sub).items()})
    target_spaces: list[ScoredSpace | None] = [None] * len(plan.transfers)
    if space is not None and projected is not None:
        target_spaces = [
            ScoredSpace(
                z, t.features.features, None, seed, space.silhouette_rows, shared.setdefault(f"transfer {t.label}", {})
            )
            for t, z in zip(plan.transfers, projected.transfers, strict=True)
        ]
    transfers = tuple(
        _score_transfer(
            plan, target, pred, preds.train_pred, train_cost, ctx.train_assignment, n_clusters, target_space
        )
        for target, pred, target_space in zip(plan.transfers, preds.transfer_pred, target_spaces, strict=True)
    )
    return SeedScores(metrics, transfers)


def _score_transfer(
    plan: ProtocolPlan,
    target: TransferTarget,
    target_pred: np.ndarray,
    train_pred: np.ndarray,
    train_cost: np.ndarray | None,
    assignment: np.ndarray,
    n_clusters: int,
    space: ScoredSpace | None = None,
) -> tuple[dict[str, float], int]:
    """Every metric plugin in the target's class space (its classes that map onto source classes,
    renumbered), then the Table C.2 columns, which take precedence over plugin metrics of the same name.

    In the target context a cluster's assigned class is the target class containing its source-train
    class (-1: none), so the assignment-based metrics score how the source clusters transfer.
    """
    class_map = target.class_map
    table, scored = transfer_scores(assignment, target_pred, target.features.labels, class_map, n_clusters)
    inside = np.isin(target.features.labels, class_map.shared)
    dense = np.searchsorted(class_map.shared, target.features.labels[inside])
    ctx = _context(
        train_pred,
        plan.train.labels,
        train_cost,
        target_pred[inside],
        dense,
        n_clusters,
        len(class_map.shared),
        class_map.composed_assignment(assignment),
        space and space.restricted(inside, space.shared),
    )
    metrics = _metrics(plan, ctx)
    metrics.update({name: table[name] for name in TRANSFER_METRICS})
    return metrics, scored


# --------------------------------------------------------------------------------------------------
# Stage: probes


def run_probes(plan: ProtocolPlan, emit: Emit = ignore) -> list[ProbeRecord]:
    """Each probe of the plan on the raw train and eval features (they depend on neither the PCA nor the
    seed, so each runs once per plan); its notes are emitted as they come."""
    train = plan.probe_train if plan.probe_train is not None else plan.train
    fit_split = plan.probe_fit_split if plan.probe_fit_split is not None else plan.fit_split
    data = ProbeData(train.features, train.labels, plan.eval.features, plan.eval.labels, plan.n_classes, plan.device)
    records = []
    for probe in plan.probes:
        emit(Event("stage", f"{plan.model}/{plan.dataset}: {probe.name} probe", name="probe"))
        owner = plan.probe_owners.get(probe.name, f"probe '{probe.name}'")
        started = time.perf_counter()
        try:
            outcome = probe.entry.run(data, probe.options)
        except SSLBenchError:
            raise
        except Exception as exc:
            raise PluginFailure(f"{owner}: run() raised {exception_line(exc)}") from exc
        seconds = time.perf_counter() - started
        declared = probe.metrics()
        if set(outcome.metrics) != set(declared):  # a plugin's bug: its columns would silently differ
            raise PluginFailure(
                f"{owner}: run() returned metrics {sorted(outcome.metrics)} but declared {sorted(declared)}"
            )
        for note in outcome.notes:
            emit(Event("note", f"{plan.model}/{plan.dataset}: {probe.name} probe: {note}"))
        record = ProbeRecord(
            model=plan.model,
            backbone=plan.backbone,
            dataset=plan.dataset,
            probe=probe.name,
            options=probe.options.model_dump(mode="json"),
            fit_split=fit_split,
            eval_split=plan.eval_split,
            n_classes=plan.n_classes,
            n_train=len(train.labels),
            n_eval=len(plan.eval.labels),
            metrics={name: float(outcome.metrics[name]) for name in declared},
            details=dict(outcome.details),
            notes=list(outcome.notes),
            seconds=seconds,
        )
        shown = "  ".join(f"{info.label} {info.text(record.metrics[name])}" for name, info in declared.items())
        emit(Event("probe", f"{plan.model} on {plan.dataset}: {shown}  ({seconds:.1f} s)", data={"record": record}))
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------------
# The stages in order


def run_protocol(
    plan: ProtocolPlan, *, scratch: Path, progress: Progress | None = None, emit: Emit = ignore
) -> Iterator[Run]:
    """Fit the reducer → per dims: project → per point and seed: cluster, score, save → runs (the probes
    are :func:`run_probes`).

    Yields each run as soon as it is scored (transfer runs right after their source run).
    ``scratch`` receives the projections; the caller owns it and removes it.
    """
    progress = progress or NullProgress()
    for variant in plan.variants or (plan,):
        yield from _run_resolved(variant, scratch, progress, emit)


def _run_resolved(plan: ProtocolPlan, scratch: Path, progress: Progress, emit: Emit) -> Iterator[Run]:
    """:func:`run_protocol` for one resolved protocol (one preset)."""
    fitted = fit_reducer(plan, progress, emit)
    for dims in plan.protocol.pca_dims:
        projected = project_splits(plan, fitted, dims, scratch, emit)
        for point in (p for p in plan.points if p.pca_dims == dims):
            protocol = RunProtocol(
                fit_split=plan.fit_split,
                eval_split=plan.eval_split,
                n_classes=plan.n_classes,
                k=point.k,
                overcluster=point.overcluster,
                n_clusters=point.n_clusters,
                pca_dims=projected.dims,
                whiten=point.whiten,
                epochs=point.epochs,
                batch_size=point.batch_size,
                backend=plan.protocol.backend,
                silhouette_rows=plan.protocol.silhouette_rows,
                preset=plan.protocol.preset[0],
                pca=plan.protocol.pca,
                algorithm=plan.protocol.algorithm,
                n_init=plan.protocol.n_init,
                max_iter=plan.protocol.max_iter,
                tol=plan.protocol.tol,
                main_score=plan.protocol.main_score,
                same_as=point.same_as,
            )
            swept = None if len(plan.points) == 1 else (point.n_clusters, projected.dims, point.epochs)
            for seed in plan.protocol.seeds:
                preds = cluster_seed(plan, point, seed, projected, progress, emit)
                started = time.perf_counter()
                scores = score_seed(plan, point.n_clusters, preds, emit, projected, seed)
                timings = Timings(
                    extract_s=plan.extract_s,
                    pca_s=projected.pca_s,
                    kmeans_s=preds.kmeans_s,
                    eval_s=preds.predict_s + time.perf_counter() - started,
                )
                run = Run(
                    model=plan.model,
                    backbone=plan.backbone,
                    dataset=plan.dataset,
                    protocol=protocol,
                    seed=seed,
                    n_train=len(plan.train.labels),
                    n_eval=len(plan.eval.labels),
                    metrics=scores.metrics,
                    timings=timings,
                )
                transfer_runs = [
                    Run(
                        model=plan.model,
                        backbone=plan.backbone,
                        dataset=target.label,
                        protocol=protocol.model_copy(
                            update={"eval_split": target.split, "n_classes": len(target.class_map.shared)}
                        ),
                        seed=seed,
                        n_train=len(plan.train.labels),
                        n_eval=n_scored,
                        metrics=metrics,
                        timings=timings,
                    )
                    for target, (metrics, n_scored) in zip(plan.transfers, scores.transfers, strict=True)
                ]
                if plan.predictions_dir is not None:
                    emit(Event("stage", f"{plan.model}/{plan.dataset} seed {seed}", name="save"))
                    save_run_predictions(plan, preds, seed, swept)
                yield run
                yield from transfer_runs


def save_run_predictions(
    plan: ProtocolPlan, preds: SeedPredictions, seed: int, swept: tuple[int, int, int] | None
) -> None:
    """The run's cluster ids (and those of its transfer rows: every target sample, scored or not)."""
    assert plan.predictions_dir is not None
    folder = plan.predictions_dir
    save_predictions(
        folder / predictions_name(plan.model, plan.dataset, seed, swept),
        preds.train_pred,
        plan.train.labels,
        preds.eval_pred,
        plan.eval.labels,
    )
    for target, pred in zip(plan.transfers, preds.transfer_pred, strict=True):
        save_predictions(
            folder / predictions_name(plan.model, target.label, seed, swept),
            preds.train_pred,
            plan.train.labels,
            pred,
            target.features.labels,
        )
