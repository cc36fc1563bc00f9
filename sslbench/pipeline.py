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

and, once per plan before the clustering stages, when ``protocol.knn`` lists any k::

    score_knn        weighted kNN top-1 (the DINO protocol, :mod:`sslbench.knn`) of the eval split
                     against the train split, on the raw features (no PCA, no seed)

Where kNN lives in the results: its top-1 for each k is added to the metrics of every run of that model
× dataset as ``knn_top1_k<k>`` (not to transfer runs), and its time to ``timings.knn_s``. So the
summaries, reports, CSV and merges carry it with no new structure; the value is the same for every
seed (its std is 0 by construction), and runs without kNN keep exactly the metrics they had.

No stage holds a whole feature or projection matrix in memory: inputs are read and outputs written in
row chunks, so a full ImageNet run needs a few GB of RAM whatever the feature dimension. Only the
cluster ids (8 bytes per sample) are kept whole.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ValidationError

from sslbench.arrays import RowReader, RowWriter
from sslbench.errors import SSLBenchError
from sslbench.events import Emit, Event, ignore
from sslbench.interfaces import (
    DEFAULT_CHUNK_ROWS,
    BackendEntry,
    ClustererConfig,
    MetricEntry,
    Reducer,
    ReducerConfig,
    ScoringContext,
    iter_chunks,
)
from sslbench.knn import check_knn, knn_metric, knn_top1
from sslbench.predictions import predictions_name, save_predictions
from sslbench.progress import NullProgress, Progress
from sslbench.protocol import contingency
from sslbench.results import Run, RunProtocol, Timings
from sslbench.spec import ProtocolPoint, ProtocolSpec
from sslbench.transfer import TRANSFER_METRICS, ClassMap, transfer_scores

if TYPE_CHECKING:
    from sslbench.plugins import Plugins


@dataclass(frozen=True)
class FeatureSplit:
    """Features (possibly a memmap larger than RAM) and labels of one split, checked by
    :func:`checked_split`."""

    name: str
    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TransferTarget:
    """Another dataset's split that the clusters fitted on train also predict (Table C.2)."""

    label: str
    split: str
    features: FeatureSplit
    class_map: ClassMap


# --------------------------------------------------------------------------------------------------
# Input checks
#
# The one contract for features and labels, whether they come through the API (evaluate_features) or
# the ``features`` dataset of a spec:
#
# * features: a non-empty 2-D array (samples × dims) of real numbers, a floating or integer dtype
#   (bool, complex, datetime/timedelta, strings, objects and structured records are refused), finite,
#   and with its largest magnitude within [2^-100, 2^100] (or all zero): the backends compute in
#   float32, whose squares hold no more.
# * labels: a 1-D array of non-negative integer class indices, one per feature row: any integer dtype,
#   or floats that are whole numbers (NaN, inf and fractions are refused).
# * classes (when their number is not given): the labels of all splits index them directly, with
#   ``max label + 1`` classes, unless the labels are sparse (see :func:`class_index`), in which case they
#   are renumbered 0..m-1 in increasing order. Contiguous labels always index the classes as given.

#: Features of larger (or smaller, non-zero) magnitude are refused: the backends' float32 arithmetic
#: would overflow (or lose them to underflow). Within these bounds the protocol rescales the PCA
#: projections by a power of two when needed (see :func:`projection_scale`).
MAX_FEATURE_MAGNITUDE = 2.0**100
MIN_FEATURE_MAGNITUDE = 2.0**-100
#: Labels are sparse, and renumbered, when the largest is at least twice their number plus this.
SPARSE_LABEL_SLACK = 64
_INT64_MAX = int(np.iinfo(np.int64).max)


def _as_array(name: str, what: str, value: object) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SSLBenchError(f"{name} {what} cannot be read as an array: {text}") from None


def checked_labels(name: str, labels: object) -> np.ndarray:
    """Labels as int64 class indices; errors name the split."""
    array = _as_array(name, "labels", labels)
    if array.ndim != 1:
        raise SSLBenchError(f"{name} labels must be a 1-D array of class indices, got shape {array.shape}")
    if len(array) == 0:
        raise SSLBenchError(f"{name} is empty")
    if array.dtype.names is not None or array.dtype.kind not in "iuf":
        raise SSLBenchError(f"{name} labels must be integer class indices, got dtype {array.dtype}")
    if array.dtype.kind == "f":
        whole = np.isfinite(array)
        whole[whole] = np.mod(array[whole], 1) == 0
        if not whole.all():
            row = int(np.argmin(whole))
            raise SSLBenchError(f"{name} labels must be integer class indices, got {array[row]} at row {row}")
    low, high = array.min(), array.max()
    if low < 0:
        raise SSLBenchError(f"{name} labels must be non-negative class indices, found {low}")
    if int(high) > _INT64_MAX:
        raise SSLBenchError(f"{name} labels must be below 2^63, found {high}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class ClassIndex:
    """How labels index classes: directly (``ids`` is None), or renumbered, class ``i`` being the
    label ``ids[i]``."""

    n_classes: int
    ids: np.ndarray | None = None

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` (int64, each one of ``ids``) as class indices."""
        return labels if self.ids is None else np.searchsorted(self.ids, labels).astype(np.int64)


def class_index(label_arrays: Sequence[np.ndarray]) -> ClassIndex:
    """The classes of checked labels (:func:`checked_labels`) of every split together, when their number
    is not given.

    Labels index the classes directly, ``max label + 1`` of them, unless they are sparse: when the
    largest label is at least ``2 × (distinct labels) + 64``, the distinct labels are renumbered
    0..m-1 in increasing order (a label of 10^12 does not make 10^12 classes). Contiguous labels,
    or labels with a few classes missing, index the classes as given.
    """
    top = max(int(labels.max()) for labels in label_arrays)
    if top < 2 + SPARSE_LABEL_SLACK:  # fewer than 2·1 + slack: never sparse, whatever the count
        return ClassIndex(top + 1)
    ids = np.unique(np.concatenate([np.asarray(labels) for labels in label_arrays]))
    if top < 2 * len(ids) + SPARSE_LABEL_SLACK:
        return ClassIndex(top + 1)
    return ClassIndex(len(ids), ids)


def checked_feature_array(name: str, features: object) -> np.ndarray:
    """Dtype and shape of one split's features (no row is read): a non-empty 2-D array of real numbers."""
    array = _as_array(name, "features", features)
    if array.dtype.names is not None or array.dtype.kind not in "iuf":
        raise SSLBenchError(
            f"{name} features must be real numbers (a floating or integer dtype), got dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise SSLBenchError(f"{name} features must be a 2-D array (samples × dims), got shape {array.shape}")
    if array.shape[0] == 0:
        raise SSLBenchError(f"{name} features have no rows (shape {array.shape})")
    if array.shape[1] == 0:
        raise SSLBenchError(f"{name} features have no dimensions (shape {array.shape})")
    return array


@dataclass(frozen=True)
class RowScan:
    """What one read of a feature matrix found: rows holding NaN or inf, the first of them (-1: none),
    and the largest finite magnitude."""

    bad_rows: int
    first_bad: int
    max_abs: float


def scan_rows(features: np.ndarray) -> RowScan:
    """Non-finite rows and the largest finite magnitude, read in row chunks with bounded memory."""
    reader = RowReader(features)
    bad_rows, first_bad, max_abs = 0, -1, 0.0
    for rows in iter_chunks(len(reader)):
        chunk = reader.rows(rows, as_float32=False)
        if chunk.dtype.kind in "iu":  # |int64 min| overflows in its own dtype
            chunk = chunk.astype(np.float64)
        finite = np.isfinite(chunk)
        bad = ~finite.all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = rows.start + int(np.argmax(bad))
            bad_rows += int(bad.sum())
            chunk = np.where(finite, chunk, 0)
        if chunk.size:
            max_abs = max(max_abs, float(np.abs(chunk).max()))
    reader.release()
    return RowScan(bad_rows, first_bad, max_abs)


def first_nonfinite_rows(features: np.ndarray) -> tuple[int, int]:
    """(rows holding NaN or inf, the first such row or -1), read in row chunks with bounded memory."""
    scan = scan_rows(features)
    return scan.bad_rows, scan.first_bad


def checked_split(name: str, features: object, labels: object, *, known_finite: bool = False) -> FeatureSplit:
    """Validate one split's features and labels; errors name the split and the problem.

    ``known_finite``: the features were checked for NaN/inf when they were written (a feature cache
    entry records it), so they are not read again here.
    """
    array = checked_feature_array(name, features)
    checked = checked_labels(name, labels)
    if len(checked) != len(array):
        raise SSLBenchError(f"{name} has {len(array)} feature rows but {len(checked)} labels; they must be equal")
    if not known_finite:
        scan = scan_rows(array)
        if scan.bad_rows:
            raise SSLBenchError(
                f"{name} features contain NaN or inf in {scan.bad_rows} of {len(array)} rows "
                f"(first: row {scan.first_bad})"
            )
        if scan.max_abs > MAX_FEATURE_MAGNITUDE or 0 < scan.max_abs < MIN_FEATURE_MAGNITUDE:
            raise SSLBenchError(
                f"{name} features reach a magnitude of {scan.max_abs:.3g}, outside what float32 arithmetic "
                f"keeps ({MIN_FEATURE_MAGNITUDE:.3g} to {MAX_FEATURE_MAGNITUDE:.3g}); rescale them"
            )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    return FeatureSplit(name, array, checked)


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

    @functools.cached_property
    def points(self) -> list[ProtocolPoint]:
        return self.protocol.points(self.n_classes)


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
    """Check that the splits, the protocol and the transfer targets fit together; resolve the backend
    and the metrics. Every problem is found here, before any computation.

    ``extra`` sets the other :class:`ProtocolPlan` fields (device, backbone, split names, groups,
    transfers, extraction time, predictions folder).
    """
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
    check_knn(protocol.knn, n_train, train.name)
    backend = plugins.backends.get(protocol.backend)
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
        metrics=tuple(plugins.metrics),
        **{**extra, "transfers": tuple(transfers)},  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------------------------------
# Stage: fit the reducer


@dataclass(frozen=True)
class FittedReducer:
    reducer: Reducer
    n_components: int
    fit_s: float


def fit_reducer(plan: ProtocolPlan, progress: Progress, emit: Emit = ignore) -> FittedReducer:
    """PCA with all components, fitted once on the train split; every ``pca_dims`` truncates it."""
    emit(Event("stage", f"{plan.model}/{plan.dataset}: PCA on {plan.train.features.shape}", name="fit-pca"))
    started = time.perf_counter()
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


#: Train projections whose largest magnitude lies in this range reach k-means as computed; others are
#: first scaled by a power of two (see :func:`projection_scale`).
PROJECTION_RANGE = (2.0**-32, 2.0**32)


def projection_scale(max_abs: float) -> int:
    """The exponent of the power of two the projections are multiplied by before k-means: 0 (left as
    they are) when the train projections' largest magnitude lies in :data:`PROJECTION_RANGE`, else the
    one that brings it into [0.5, 1).

    k-means sees features only through float32 squared distances, which overflow for projections of
    magnitude 1e20 and underflow to zero for 1e-30 (every point then ties with every centre). k-means
    is scale-invariant and multiplying by a power of two is exact, so rescaled projections get the
    assignments that exact arithmetic gives the original ones.
    """
    if max_abs == 0 or PROJECTION_RANGE[0] <= max_abs <= PROJECTION_RANGE[1]:
        return 0
    return -math.frexp(max_abs)[1]


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
    return Projected(n, arrays[0], arrays[1], tuple(arrays[2:]), fitted.fit_s + time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------
# Stage: cluster one seed


def kmeans_steps(options: BaseModel, epochs: int) -> tuple[int, str]:
    """What a k-means fit reports through ``on_epoch``, for its progress bar: ``epochs`` epochs, or for
    a full-batch Lloyd fit (``algorithm: lloyd``), at most ``max_iter`` iterations."""
    max_iter = getattr(options, "max_iter", None)
    if getattr(options, "algorithm", None) == "lloyd" and isinstance(max_iter, int):
        return max_iter, "iterations"
    return epochs, "epochs"


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
    total, unit = kmeans_steps(plan.backend_options, point.epochs)
    task = progress.task(f"k-means {where}", total, unit=unit)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        task.advance()

    config = ClustererConfig(
        point.n_clusters, point.epochs, point.batch_size, seed, plan.device, plan.backend_options, step
    )
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
    train_cost: np.ndarray,
    eval_pred: np.ndarray,
    eval_labels: np.ndarray,
    n_clusters: int,
    n_classes: int,
    assignment: np.ndarray | None = None,
) -> ScoringContext:
    ctx = ScoringContext(
        train_pred=train_pred,
        train_labels=train_labels,
        eval_pred=eval_pred,
        eval_labels=eval_labels,
        n_clusters=n_clusters,
        n_classes=n_classes,
        train_contingency=train_cost,
        eval_contingency=contingency(eval_pred, eval_labels, n_clusters, n_classes),
    )
    if assignment is not None:
        # The assignment is a function of the train contingency alone: contexts derived from one run
        # share it instead of solving the same Hungarian problem again.
        ctx.__dict__["train_assignment"] = assignment
    return ctx


def _metrics(entries: Sequence[MetricEntry], ctx: ScoringContext) -> dict[str, float]:
    if len(ctx.eval_labels) == 0:
        return {entry.name: float("nan") for entry in entries}
    return {entry.name: float(entry.fn(ctx)) for entry in entries}


def group_metric(metric: str, group: str) -> str:
    """Name under which a metric restricted to a class group is recorded: ``acc_in_imagenet``."""
    return f"{metric}_{group}"


@dataclass(frozen=True)
class SeedScores:
    metrics: dict[str, float]
    #: Per transfer target: its metrics and the number of target samples scored.
    transfers: tuple[tuple[dict[str, float], int], ...]


def score_seed(plan: ProtocolPlan, n_clusters: int, preds: SeedPredictions, emit: Emit = ignore) -> SeedScores:
    """Every metric plugin on the eval split, on each class group's samples and on each transfer target.

    The train assignment (Hungarian on the train contingency, majority for extra clusters) is solved
    once and shared by all of them.
    """
    emit(Event("stage", f"{plan.model}/{plan.dataset} k={n_clusters}", name="score"))
    train_cost = contingency(preds.train_pred, plan.train.labels, n_clusters, plan.n_classes)
    ctx = _context(
        preds.train_pred, plan.train.labels, train_cost, preds.eval_pred, plan.eval.labels, n_clusters, plan.n_classes
    )
    metrics = _metrics(plan.metrics, ctx)
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
        )
        metrics.update({group_metric(name, group): value for name, value in _metrics(plan.metrics, sub).items()})
    transfers = tuple(
        _score_transfer(plan, target, pred, preds.train_pred, train_cost, ctx.train_assignment, n_clusters)
        for target, pred in zip(plan.transfers, preds.transfer_pred, strict=True)
    )
    return SeedScores(metrics, transfers)


def _score_transfer(
    plan: ProtocolPlan,
    target: TransferTarget,
    target_pred: np.ndarray,
    train_pred: np.ndarray,
    train_cost: np.ndarray,
    assignment: np.ndarray,
    n_clusters: int,
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
    )
    metrics = _metrics(plan.metrics, ctx)
    metrics.update({name: table[name] for name in TRANSFER_METRICS})
    return metrics, scored


# --------------------------------------------------------------------------------------------------
# Stage: kNN


@dataclass(frozen=True)
class KnnScores:
    #: ``knn_top1_k<k>`` → top-1 (a fraction), for every k of ``protocol.knn``; empty when it is off.
    metrics: dict[str, float]
    #: None when it is off.
    knn_s: float | None


def score_knn(plan: ProtocolPlan, emit: Emit = ignore) -> KnnScores:
    """Weighted kNN top-1 of the eval split against the train split for every ``protocol.knn`` k, on the
    raw features (L2-normalised, cosine, ``exp(sim / T)`` votes; see :mod:`sslbench.knn`). It depends on
    neither the PCA nor the seed, so it runs once per plan."""
    ks = plan.protocol.knn
    if not ks:
        return KnnScores({}, None)
    emit(Event("stage", f"{plan.model}/{plan.dataset}: kNN k={', '.join(map(str, ks))}", name="knn"))
    result = knn_top1(
        plan.train.features,
        plan.train.labels,
        plan.eval.features,
        plan.eval.labels,
        ks,
        n_classes=plan.n_classes,
        temperature=plan.protocol.knn_temperature,
        device=plan.device,
    )
    return KnnScores({knn_metric(k): result.top1[k] for k in ks}, result.seconds)


# --------------------------------------------------------------------------------------------------
# The stages in order


def run_protocol(
    plan: ProtocolPlan, *, scratch: Path, progress: Progress | None = None, emit: Emit = ignore
) -> Iterator[Run]:
    """kNN (when asked) → fit the reducer → per dims: project → per point and seed: cluster, score, save → runs.

    Yields each run as soon as it is scored (transfer runs right after their source run).
    ``scratch`` receives the projections; the caller owns it and removes it.
    """
    progress = progress or NullProgress()
    knn = score_knn(plan, emit)
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
            )
            swept = None if len(plan.points) == 1 else (point.n_clusters, projected.dims, point.epochs)
            for seed in plan.protocol.seeds:
                preds = cluster_seed(plan, point, seed, projected, progress, emit)
                started = time.perf_counter()
                scores = score_seed(plan, point.n_clusters, preds, emit)
                timings = Timings(
                    extract_s=plan.extract_s,
                    pca_s=projected.pca_s,
                    kmeans_s=preds.kmeans_s,
                    eval_s=preds.predict_s + time.perf_counter() - started,
                    knn_s=knn.knn_s,
                )
                run = Run(
                    model=plan.model,
                    backbone=plan.backbone,
                    dataset=plan.dataset,
                    protocol=protocol,
                    seed=seed,
                    n_train=len(plan.train.labels),
                    n_eval=len(plan.eval.labels),
                    metrics={**scores.metrics, **knn.metrics},
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
