"""The protocol's inner loop on extracted features, and the Python API around it.

``evaluate_features`` is what an SSL paper calls from its own eval suite; ``sslbench run`` calls
:func:`run_protocol` with the features it extracted. Both produce the same :class:`Run` records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from sslbench.errors import SSLBenchError
from sslbench.extract import resolve_device
from sslbench.inspect import predictions_name
from sslbench.interfaces import (
    Clusterer,
    ClustererConfig,
    MetricEntry,
    ReducerConfig,
    ScoringContext,
    iter_chunks,
)
from sslbench.plugins import Plugins, get_plugins
from sslbench.progress import NullProgress, Progress
from sslbench.protocol import contingency
from sslbench.results import Results, Run, RunProtocol, Timings, build_results, environment
from sslbench.spec import ProtocolSpec
from sslbench.transfer import ClassMap, group_accuracies, transfer_scores


@dataclass(frozen=True)
class FeatureSplit:
    """Features and labels of one split, checked by :func:`checked_split`."""

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


def checked_split(name: str, features: Any, labels: Any) -> FeatureSplit:
    """Validate one split's features and labels; errors name the split and the problem."""
    if not isinstance(features, np.ndarray):
        features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise SSLBenchError(f"{name} features must be a 2-D array (samples × dims), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        if not np.issubdtype(features.dtype, np.number):
            raise SSLBenchError(f"{name} features must be numeric, got dtype {features.dtype}")
        features = features.astype(np.float32)
    if labels.ndim != 1:
        raise SSLBenchError(f"{name} labels must be a 1-D array of class indices, got shape {labels.shape}")
    if len(labels) != len(features):
        raise SSLBenchError(f"{name} has {len(features)} feature rows but {len(labels)} labels; they must be equal")
    if len(labels) == 0:
        raise SSLBenchError(f"{name} is empty")
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and bool(np.all(np.mod(labels, 1) == 0))
    )
    if not integral:
        raise SSLBenchError(f"{name} labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise SSLBenchError(f"{name} labels must be non-negative class indices, found {labels.min()}")
    bad_rows, first_bad = 0, -1
    for rows in iter_chunks(len(features)):
        bad = ~np.isfinite(np.asarray(features[rows])).all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = rows.start + int(np.argmax(bad))
            bad_rows += int(bad.sum())
    if bad_rows:
        raise SSLBenchError(
            f"{name} features contain NaN or inf in {bad_rows} of {len(features)} rows (first: row {first_bad})"
        )
    return FeatureSplit(name, features, labels)


def _check_pair(train: FeatureSplit, eval_: FeatureSplit, protocol: ProtocolSpec, n_classes: int) -> None:
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


def run_protocol(
    train: FeatureSplit,
    eval_: FeatureSplit,
    *,
    n_classes: int,
    protocol: ProtocolSpec,
    plugins: Plugins,
    model: str,
    dataset: str,
    device: str = "cpu",
    extract_s: float = 0.0,
    on_run: Callable[[Run], None] | None = None,
    predictions_dir: Path | None = None,
    split_names: tuple[str, str] | None = None,
    progress: Progress | None = None,
    class_groups: Mapping[str, np.ndarray] | None = None,
    transfers: Sequence[TransferTarget] = (),
    backbone: str | None = None,
) -> list[Run]:
    """PCA fitted on train → k-means fitted on train → predict both → score; per point and seed.

    ``split_names`` are the dataset's names of the two splits recorded in each run's protocol
    (default: the :class:`FeatureSplit` names, which error messages use). ``class_groups`` adds
    the ACC of each group of classes (``acc_<group>``); each of ``transfers`` is predicted by the
    same PCA and clusters and scored as its own run (dataset = its label).
    """
    fit_split, eval_split = split_names or (train.name, eval_.name)
    if max(train.labels.max(), eval_.labels.max()) >= n_classes:
        raise SSLBenchError(
            f"labels go up to {max(train.labels.max(), eval_.labels.max())} but the dataset has {n_classes} classes"
        )
    _check_pair(train, eval_, protocol, n_classes)
    for target in transfers:
        if target.features.features.shape[1] != train.features.shape[1]:
            raise SSLBenchError(
                f"{target.features.name} features have {target.features.features.shape[1]} dims but "
                f"{train.name} features have {train.features.shape[1]}; both must come from the same model"
            )
        if target.class_map.n_source != n_classes:
            raise SSLBenchError(
                f"{target.features.name}: its class map refers to {target.class_map.n_source} source classes "
                f"but {train.name} has {n_classes}"
            )
    reducer_entry, clusterer_entry = plugins.backend(protocol.backend)
    try:
        backend_options = clusterer_entry.options.model_validate(protocol.backend_options)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in ("protocol", "backend_options", *err["loc"]))
        raise SSLBenchError(f"{where}: {err['msg']}") from None
    metric_entries = list(plugins.metrics)
    points = protocol.points(n_classes)

    progress = progress or NullProgress()
    started = time.perf_counter()
    pca_task = progress.task(f"PCA {model}/{dataset}", len(train.features), unit="rows")
    reducer = reducer_entry.factory(ReducerConfig(device=device, options=backend_options, on_rows=pca_task.advance))
    reducer.fit(train.features)
    fit_s = time.perf_counter() - started
    found = reducer.n_components
    too_many = [d for d in protocol.pca_dims if d is not None and d > found]
    if too_many:
        raise SSLBenchError(f"pca_dims={max(too_many)} exceeds the {found} components the PCA of {train.name} found")

    runs: list[Run] = []
    for dims in protocol.pca_dims:
        started = time.perf_counter()
        n_components = found if dims is None else dims
        train_z = reducer.transform(train.features, n_components, protocol.whiten)
        eval_z = reducer.transform(eval_.features, n_components, protocol.whiten)
        transfer_z = [reducer.transform(t.features.features, n_components, protocol.whiten) for t in transfers]
        pca_s = fit_s + time.perf_counter() - started
        for point in (p for p in points if p.pca_dims == dims):
            run_protocol_point = RunProtocol(
                fit_split=fit_split,
                eval_split=eval_split,
                n_classes=n_classes,
                k=point.k,
                overcluster=point.overcluster,
                n_clusters=point.n_clusters,
                pca_dims=train_z.shape[1],
                whiten=point.whiten,
                epochs=point.epochs,
                batch_size=point.batch_size,
                backend=protocol.backend,
            )
            for seed in protocol.seeds:
                task = progress.task(
                    f"k-means {model}/{dataset} k={point.n_clusters} seed {seed}", point.epochs, unit="epochs"
                )
                outcome = _run_seed(
                    clusterer_entry.factory,
                    ClustererConfig(
                        point.n_clusters,
                        point.epochs,
                        point.batch_size,
                        seed,
                        device,
                        backend_options,
                        on_epoch=task.advance,
                    ),
                    train,
                    eval_,
                    train_z,
                    eval_z,
                    n_classes,
                    metric_entries,
                    class_groups or {},
                    transfers,
                    transfer_z,
                )
                run = Run(
                    model=model,
                    backbone=backbone,
                    dataset=dataset,
                    protocol=run_protocol_point,
                    seed=seed,
                    n_train=len(train.labels),
                    n_eval=len(eval_.labels),
                    metrics=outcome.metrics,
                    timings=Timings(extract_s=extract_s, pca_s=pca_s, kmeans_s=outcome.kmeans_s, eval_s=outcome.eval_s),
                )
                swept = None if len(points) == 1 else (point.n_clusters, train_z.shape[1], point.epochs)

                if predictions_dir is not None:
                    _save_predictions(
                        predictions_dir / predictions_name(model, dataset, seed, swept),
                        outcome,
                        train.labels,
                        outcome.eval_pred,
                        eval_.labels,
                    )
                runs.append(run)
                if on_run is not None:
                    on_run(run)
                for target, target_pred, (metrics, n_scored) in zip(
                    transfers, outcome.transfer_pred, outcome.transfer_scores, strict=True
                ):
                    transfer_run = Run(
                        model=model,
                        backbone=backbone,
                        dataset=target.label,
                        protocol=run_protocol_point.model_copy(
                            update={"eval_split": target.split, "n_classes": len(target.class_map.shared)}
                        ),
                        seed=seed,
                        n_train=len(train.labels),
                        n_eval=n_scored,
                        metrics=metrics,
                        timings=Timings(
                            extract_s=extract_s, pca_s=pca_s, kmeans_s=outcome.kmeans_s, eval_s=outcome.eval_s
                        ),
                    )
                    if predictions_dir is not None:
                        _save_predictions(
                            predictions_dir / predictions_name(model, target.label, seed, swept),
                            outcome,
                            train.labels,
                            target_pred,
                            target.features.labels,
                        )
                    runs.append(transfer_run)
                    if on_run is not None:
                        on_run(transfer_run)
    return runs


def _save_predictions(
    path: Path, outcome: _SeedOutcome, train_labels: np.ndarray, eval_pred: np.ndarray, eval_labels: np.ndarray
) -> None:
    """One run's cluster ids as ``sslbench clusters`` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, train_pred=outcome.train_pred, train_labels=train_labels, eval_pred=eval_pred, eval_labels=eval_labels
    )


@dataclass(frozen=True)
class _SeedOutcome:
    metrics: dict[str, float]
    train_pred: np.ndarray
    eval_pred: np.ndarray
    transfer_pred: list[np.ndarray]
    #: (metrics, target samples scored) per transfer target.
    transfer_scores: list[tuple[dict[str, float], int]]
    kmeans_s: float
    eval_s: float


def _run_seed(
    factory: Callable[[ClustererConfig], Clusterer],
    config: ClustererConfig,
    train: FeatureSplit,
    eval_: FeatureSplit,
    train_z: np.ndarray,
    eval_z: np.ndarray,
    n_classes: int,
    metric_entries: Sequence[MetricEntry],
    class_groups: Mapping[str, np.ndarray],
    transfers: Sequence[TransferTarget],
    transfer_z: Sequence[np.ndarray],
) -> _SeedOutcome:
    started = time.perf_counter()
    clusterer = factory(config)
    clusterer.fit(train_z)
    kmeans_s = time.perf_counter() - started

    started = time.perf_counter()
    train_pred = np.asarray(clusterer.predict(train_z), dtype=np.int64)
    eval_pred = np.asarray(clusterer.predict(eval_z), dtype=np.int64)
    transfer_pred = [np.asarray(clusterer.predict(z), dtype=np.int64) for z in transfer_z]
    for split, pred in ((train.name, train_pred), (eval_.name, eval_pred), *(("transfer", p) for p in transfer_pred)):
        if len(pred) and (pred.min() < 0 or pred.max() >= config.n_clusters):
            raise RuntimeError(f"clusterer returned cluster ids outside [0, {config.n_clusters}) for {split}")
    ctx = ScoringContext(
        train_pred=train_pred,
        train_labels=train.labels,
        eval_pred=eval_pred,
        eval_labels=eval_.labels,
        n_clusters=config.n_clusters,
        n_classes=n_classes,
        train_contingency=contingency(train_pred, train.labels, config.n_clusters, n_classes),
        eval_contingency=contingency(eval_pred, eval_.labels, config.n_clusters, n_classes),
    )
    metrics = {entry.name: float(entry.fn(ctx)) for entry in metric_entries}
    if class_groups:
        metrics.update(group_accuracies(ctx.train_assignment, eval_pred, eval_.labels, class_groups))
    scores = [
        transfer_scores(ctx.train_assignment, pred, target.features.labels, target.class_map, config.n_clusters)
        for target, pred in zip(transfers, transfer_pred, strict=True)
    ]
    return _SeedOutcome(metrics, train_pred, eval_pred, transfer_pred, scores, kmeans_s, time.perf_counter() - started)


def evaluate_features(
    train_features: Any,
    train_labels: Any,
    eval_features: Any,
    eval_labels: Any,
    *,
    n_clusters: int | None = None,
    overcluster: float | Sequence[float] = 1.0,
    pca_dim: int | Sequence[int | None] | None = None,
    whiten: bool = False,
    epochs: int = 60,
    batch_size: int | None = None,
    seeds: int | Sequence[int] = 5,
    backend: str = "torch",
    backend_options: dict[str, Any] | None = None,
    device: str = "auto",
    n_classes: int | None = None,
    model: str = "features",
    dataset: str = "features",
    plugins: Plugins | None = None,
) -> Results:
    """Cluster precomputed features with the paper's protocol and score them.

    PCA and k-means are fitted on the train features; the eval features are predicted and scored
    with the cluster → class assignment built on the train split. Every metric is computed per seed
    and summarised as mean ± sample std.

    :param train_features: ``(n_train, d)`` array (a ``np.memmap`` is read in chunks).
    :param train_labels: ``(n_train,)`` integer class indices.
    :param n_clusters: clusters before overclustering; ``None`` = number of classes.
    :param overcluster: fit ``int(overcluster × n_clusters)`` clusters; a list sweeps.
    :param pca_dim: PCA components to keep; ``None`` keeps all; a list sweeps.
    :param seeds: a count ``n`` (seeds ``0..n-1``) or explicit seeds.
    :param backend: ``reference`` (the paper's scikit-learn code) or ``torch`` (fast, CPU or GPU).
    :param backend_options: options of the backend's clusterer, e.g. ``{"algorithm": "lloyd"}``.
    :param device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; used by backends that run on GPUs.
    :param n_classes: number of classes; ``None`` = ``max(label) + 1`` over both splits.
    :returns: :class:`~sslbench.results.Results` with ``runs`` (per seed) and ``summary``.
    :raises SSLBenchError: unusable input (NaN/inf, mismatched shapes, k larger than the train set).
    """
    started = time.perf_counter()
    plugins = plugins or get_plugins()
    try:
        protocol = ProtocolSpec.model_validate(
            {
                "pca_dims": list(pca_dim) if isinstance(pca_dim, Sequence) else pca_dim,
                "whiten": whiten,
                "k": n_clusters,
                "overcluster": list(overcluster) if isinstance(overcluster, Sequence) else overcluster,
                "epochs": epochs,
                "batch_size": batch_size,
                "seeds": list(seeds) if isinstance(seeds, Sequence) else seeds,
                "backend": backend,
                "backend_options": backend_options or {},
            }
        )
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"][:1])
        raise SSLBenchError(f"evaluate_features: {field}: {err['msg']} (got {err.get('input')!r})") from None
    train = checked_split("train", train_features, train_labels)
    eval_ = checked_split("eval", eval_features, eval_labels)
    classes = n_classes if n_classes is not None else int(max(train.labels.max(), eval_.labels.max())) + 1
    device = resolve_device(device)
    runs = run_protocol(
        train,
        eval_,
        n_classes=classes,
        protocol=protocol,
        plugins=plugins,
        model=model,
        dataset=dataset,
        device=device,
    )
    env = environment(device, plugins)
    spec = {"api": "evaluate_features", "protocol": protocol.model_dump(mode="json")}
    return build_results(runs, spec=spec, env=env, wall_s=time.perf_counter() - started)
