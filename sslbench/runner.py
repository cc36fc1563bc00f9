"""``sslbench run`` and ``sslbench extract``: a resolved spec as a plan, one model at a time.

::

    plan (datasets loaded, splits and transfer maps checked, once)
    for each model (outermost: one backbone alive at a time):
        build the backbone
        extract every dataset split and transfer target it needs (from the cache or into it)
        free the backbone (and its device memory) before the next one is built
        for each dataset: the protocol's stages (sslbench.pipeline); results.json rewritten

results.json is rewritten after every model × dataset block, so a failure late in a long run keeps
the blocks already finished. Features come from the cache when an earlier run extracted them.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from sslbench.allocator import trim_allocator
from sslbench.cache import CacheKey, FeatureCache, run_scratch
from sslbench.devices import resolve_device
from sslbench.errors import PluginFailure, SSLBenchError, exception_line
from sslbench.events import Emit, Event, ignore
from sslbench.extract import (
    Extracted,
    ExtractionSettings,
    check_precision,
    extract_split,
    forward_precision,
    key_numerics,
    prepare_backbone,
    resolved_settings,
)
from sslbench.inputs import FeatureSplit, checked_split
from sslbench.interfaces import Backbone, BackboneEntry, Dataset, Split
from sslbench.pipeline import TransferTarget, metric_descriptors, plan_protocol, run_probes, run_protocol
from sslbench.plugins import PluginInfo, Plugins
from sslbench.progress import NullProgress, Progress
from sslbench.ranks import ONE_PROCESS, Ranks
from sslbench.results import (
    HEADLINE_METRICS,
    ExtractionRecord,
    MetricInfo,
    MetricSummary,
    ProbeRecord,
    Published,
    PublishedLookup,
    Results,
    Run,
    RunProtocol,
    SkippedSample,
    build_results,
    checked_columns,
    environment,
    reason,
    shown_path,
    write_output,
)
from sslbench.spec import DatasetSpec, ModelSpec, ResolvedSpec, TransferSpec, check_unlabeled_dataset
from sslbench.table import headline_metrics
from sslbench.transfer import ClassMap, checked_class_groups
from sslbench.weights import BadWeightsFile, no_downloads

#: Reports written next to results.json by ``sslbench run``.
FILE_REPORTS = ("md", "csv")


def write_reports(results: Results, out_dir: Path, plugins: Plugins) -> None:
    results.write(out_dir / "results.json")
    for name in FILE_REPORTS:
        reporter = plugins.reporters.get(name).reporter
        write_output(out_dir / f"results{reporter.suffix}", reporter.render(results))


def checked_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` (with its parents) and prove that it takes a file (one is written and removed),
    before any work: an unusable place is a one-line :class:`SSLBenchError` naming it, not a traceback
    after hours of extraction and clustering."""
    shown = shown_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SSLBenchError(f"the {what} {shown} exists and is not a directory") from None
    except (OSError, ValueError) as exc:
        raise SSLBenchError(f"cannot create the {what} {shown}: {reason(exc)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".sslbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except (OSError, ValueError) as exc:
        raise SSLBenchError(f"cannot write to the {what} {shown}: {reason(exc)}") from None
    return path


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class SplitSource:
    """One split to extract, with what identifies it in the cache (its fingerprint, computed once)."""

    dataset_id: str
    label: str
    options: BaseModel
    name: str
    split: Split
    fingerprint: str


@dataclass(frozen=True)
class TargetPlan:
    spec: TransferSpec
    source: SplitSource
    class_map: ClassMap


@dataclass(frozen=True)
class DatasetPlan:
    spec: DatasetSpec
    dataset: Dataset
    fit: SplitSource
    eval: SplitSource
    class_groups: dict[str, np.ndarray] | None
    targets: tuple[TargetPlan, ...]

    def sources(self) -> list[SplitSource]:
        """Every split a backbone extracts for this dataset, each once."""
        own = [self.fit] if self.fit.name == self.eval.name else [self.fit, self.eval]
        return own + [t.source for t in self.targets]


@dataclass(frozen=True)
class ModelPlan:
    spec: ModelSpec
    options: BaseModel | None
    entry: BackboneEntry | None
    plugin: PluginInfo | None
    #: Why no plugin provides the backbone (an optional model's), e.g. its plugin failed to load.
    missing: str | None = None

    @property
    def owner(self) -> str:
        """How messages name the backbone's code: ``backbone 'x' (plugin p from dist 1.0)``."""
        if self.plugin is None:
            return f"backbone '{self.spec.id}'"
        return f"backbone '{self.spec.id}' ({self.plugin.label})"


@dataclass(frozen=True)
class RunPlan:
    """Every model × dataset of a spec, resolved against the plugins and checked before any work."""

    resolved: ResolvedSpec
    models: tuple[ModelPlan, ...]
    datasets: tuple[DatasetPlan, ...]
    device: str
    cache: FeatureCache
    settings: ExtractionSettings
    #: The processes extracting together (``torchrun -m sslbench extract``); ``sslbench run`` is one.
    ranks: Ranks = ONE_PROCESS


def _split_source(
    d_id: str, label: str, options: BaseModel, dataset: Dataset, name: str, at: str, key: str
) -> SplitSource:
    if name not in dataset.splits:
        raise SSLBenchError(f"{at}.{key}: dataset '{d_id}' has no split '{name}'; it has: {', '.join(dataset.splits)}")
    split = dataset.splits[name]
    return SplitSource(d_id, label, options, name, split, split.fingerprint())


def _dataset_at(resolved: ResolvedSpec, index: int, key: str) -> str:
    lines = resolved.loaded.lines
    line = lines.get(("datasets", index, key)) or lines.get(("datasets", index))
    return f"{resolved.loaded.source}:{line}: datasets[{index}]"


def plan_run(resolved: ResolvedSpec, plugins: Plugins, device: str, ranks: Ranks = ONE_PROCESS) -> RunPlan:
    """Load every dataset once, check its splits, groups and transfer maps, and resolve every model."""
    spec = resolved.spec
    datasets = []
    for index, (d_spec, d_options) in enumerate(zip(spec.datasets, resolved.dataset_options, strict=True)):
        dataset = plugins.datasets.get(d_spec.id).factory(d_options)
        if not dataset.labeled:  # also a plugin's dataset that did not say so before loading
            check_unlabeled_dataset(resolved.loaded, index, plugins)
        fit, eval_ = (
            _split_source(
                d_spec.id,
                d_spec.label,
                d_options,
                dataset,
                getattr(d_spec, key),
                _dataset_at(resolved, index, key),
                key,
            )
            for key in ("fit_split", "eval_split")
        )
        if eval_.name == fit.name:
            eval_ = fit
        for p_index, probe in enumerate(resolved.probes):  # before any extraction: k larger than train is known now
            if probe.entry.check is not None:
                try:
                    probe.entry.check(probe.options, len(fit.split), f"{d_spec.label}/{fit.name}")
                except SSLBenchError as exc:
                    raise SSLBenchError(f"{resolved.loaded.source}: probes[{p_index}]: {exc}") from None
        groups = dataset.metadata.get("class_groups")
        class_groups = (
            dict(checked_class_groups(groups, dataset.num_classes, f"dataset {d_spec.label}"))
            if groups is not None
            else None
        )
        datasets.append(
            DatasetPlan(d_spec, dataset, fit, eval_, class_groups, _target_plans(resolved, plugins, index, dataset))
        )
    models = []
    for m_spec, m_options in zip(spec.models, resolved.model_options, strict=True):
        known = m_spec.id in plugins.backbones
        entry = plugins.backbones.get(m_spec.id) if known else None
        info = plugins.plugin_of(plugins.backbones, m_spec.id) if known else None
        missing = None if known else plugins.backbones.unavailable(m_spec.id)
        models.append(ModelPlan(m_spec, m_options, entry, info, missing))
    ext = spec.extraction
    check_precision(ext.cpu_precision, device)  # before any model is built
    settings = ExtractionSettings.of(ext)
    cache = FeatureCache(Path(spec.cache_dir) if spec.cache_dir else None)
    return RunPlan(resolved, tuple(models), tuple(datasets), device, cache, settings, ranks)


def _target_plans(resolved: ResolvedSpec, plugins: Plugins, d_index: int, source: Dataset) -> tuple[TargetPlan, ...]:
    """The targets of ``datasets[d_index].transfer``, their split and class map checked."""
    d_spec = resolved.spec.datasets[d_index]
    options = resolved.transfer_options[d_index] if resolved.transfer_options else []
    targets = []
    for j, (t_spec, t_options) in enumerate(zip(d_spec.transfer, options, strict=True)):
        at = f"{resolved.loaded.source}: datasets[{d_index}].transfer[{j}]"
        target = plugins.datasets.get(t_spec.id).factory(t_options)
        split = _split_source(t_spec.id, t_spec.label, t_options, target, t_spec.split, at, "split")
        if t_spec.class_map not in target.metadata:
            known = ", ".join(target.metadata) or "none"
            raise SSLBenchError(
                f"{at}.class_map: dataset '{t_spec.id}' has no metadata '{t_spec.class_map}' (it has: {known})"
            )
        class_map = ClassMap.checked(
            target.metadata[t_spec.class_map], target.num_classes, source.num_classes, f"{at}.class_map"
        )
        targets.append(TargetPlan(t_spec, split, class_map))
    return tuple(targets)


# --------------------------------------------------------------------------------------------------
# Features, one model at a time


@dataclass
class ModelFeatures:
    """What one backbone extracted: per dataset, its splits' features by split name."""

    model: ModelPlan
    per_dataset: list[dict[str, Extracted]] = field(default_factory=list)
    extract_s: list[float] = field(default_factory=list)
    #: The settings the extraction ran with (``auto`` resolved for this backbone and device).
    settings: ExtractionSettings = field(default_factory=ExtractionSettings)


def _cache_key(
    model: ModelPlan, backbone: Backbone, source: SplitSource, settings: ExtractionSettings, device: str
) -> CacheKey:
    plugin = model.plugin
    memory_format, precision = key_numerics(settings, device)
    return CacheKey(
        backbone=model.spec.id,
        plugin={
            "name": plugin.name if plugin else None,
            "distribution": plugin.distribution if plugin else None,
            "version": plugin.version if plugin else None,
        },
        backbone_options=model.options.model_dump(mode="json") if model.options is not None else {},
        backbone_fingerprint=backbone.fingerprint(),
        dataset=source.dataset_id,
        dataset_options=source.options.model_dump(mode="json"),
        split=source.name,
        split_fingerprint=source.fingerprint,
        decode=settings.decode,
        memory_format=memory_format,
        precision=precision,
    )


def _build(model: ModelPlan, device: str) -> Backbone:
    if model.entry is None or model.options is None:
        raise SSLBenchError(model.missing or f"no installed plugin provides backbone '{model.spec.id}'")
    try:
        built = model.entry.factory(model.options)
    except SSLBenchError:
        raise
    except Exception as exc:
        raise PluginFailure(f"{model.owner}: building it raised {exception_line(exc)}") from exc
    return prepare_backbone(built, device)


def decode_note(name: str, extracted: Extracted) -> str:
    """The line a run prints about ``decode: reduced``: how close its features are to the exact decode's."""
    check = extracted.decode_check or {}
    head = f"{name}: decode reduced"
    if check.get("min_side") is None:
        return f"{head}: the backbone names no decode side, so every image was decoded in full"
    if "mean_cosine" not in check:
        return f"{head}: no sample could be compared with the exact decode"
    return (
        f"{head} (shorter side ≥ {check['min_side']} px): feature cosine to the exact decode on "
        f"{check['samples']} samples ({check['changed']} decoded smaller): mean {check['mean_cosine']:.6f}, "
        f"min {check['min_cosine']:.6f}"
    )


def precision_note(name: str, extracted: Extracted) -> str:
    """The line a run prints about ``cpu_precision: bfloat16``: how close its features are to float32 ones."""
    check = extracted.precision_check or {}
    head = f"{name}: {check.get('precision', 'reduced precision')}"
    if "mean_cosine" not in check:
        return f"{head}: no sample could be compared with float32"
    return (
        f"{head}: feature cosine to float32 on {check['samples']} samples: mean {check['mean_cosine']:.6f}, "
        f"min {check['min_cosine']:.6f}"
    )


def _release_device_memory(device: str) -> None:
    gc.collect()
    trim_allocator()  # a tuned allocator keeps the model's batches' heap: give it back between models
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def model_features(
    plan: RunPlan, *, use_cache: bool, scratch: Path, progress: Progress, emit: Emit = ignore
) -> Iterator[ModelFeatures]:
    """For each model in turn: build it, extract what every dataset needs, free it, yield the features.

    Optional models whose plugin or weights are missing are skipped with a ``note`` event; weights that
    are here but fail their hash or do not load stop the run, optional or not.
    """
    for m_index, model in enumerate(plan.models):
        emit(Event("stage", model.spec.label, name="build"))
        try:
            if model.spec.optional:
                with no_downloads():
                    backbone = _build(model, plan.device)
            else:
                backbone = _build(model, plan.device)
        except SSLBenchError as exc:
            if not model.spec.optional or isinstance(exc, BadWeightsFile):
                raise
            emit(Event("note", f"optional model {model.spec.label} skipped: {exc}"))
            continue
        settings = resolved_settings(
            backbone, ExtractionSettings(**{**vars(plan.settings), "owner": model.owner}), plan.device
        )
        features = ModelFeatures(model, settings=settings)
        try:
            for d_index, dataset in enumerate(plan.datasets):
                started = time.perf_counter()
                extracted = {}
                for s_index, source in enumerate(dataset.sources()):
                    key = _cache_key(model, backbone, source, settings, plan.device)
                    entry = (
                        plan.cache.entry(key)
                        if use_cache
                        else FeatureCache(scratch / f"features-{m_index}-{d_index}-{s_index}").entry(key)
                    )
                    emit(Event("stage", f"{source.label}/{source.name} ({model.spec.label})", name="extract"))
                    got = extract_split(
                        backbone,
                        source.split,
                        settings=settings,
                        device=plan.device,
                        name=f"{source.label}/{source.name} ({model.spec.label})",
                        entry=entry,
                        progress=progress,
                        reextract_corrupt=plan.resolved.spec.extraction.on_corrupt == "reextract",
                        ranks=plan.ranks,
                    )
                    where = f"{source.label}/{source.name} ({model.spec.label})"
                    if got.decode_check is not None:
                        emit(Event("note", decode_note(where, got)))
                    if got.precision_check is not None:
                        emit(Event("note", precision_note(where, got)))
                    extracted[f"{source.label}/{source.name}"] = got
                features.per_dataset.append(extracted)
                features.extract_s.append(time.perf_counter() - started)
        finally:
            # The next backbone is built only once this one is gone (device memory included).
            del backbone
            _release_device_memory(plan.device)
        yield features


# --------------------------------------------------------------------------------------------------
# sslbench run


def _checked(where: str, extracted: Extracted, labeled: bool = True) -> FeatureSplit:
    if extracted.nonfinite is not None and extracted.nonfinite[0]:
        rows, first = extracted.nonfinite
        raise SSLBenchError(
            f"{where} features contain NaN or inf in {rows} of {len(extracted.labels)} rows (first: sample {first})"
        )
    labels = extracted.labels if labeled else None
    return checked_split(where, extracted.features, labels, known_finite=extracted.nonfinite is not None)


def _skipped(model: str, source: SplitSource, extracted: Extracted) -> list[SkippedSample]:
    return [
        SkippedSample(model=model, dataset=source.label, split=source.name, sample=s["sample"], error=s["error"])
        for s in extracted.skipped
    ]


def run_spec(
    resolved: ResolvedSpec,
    plugins: Plugins,
    *,
    out_dir: Path,
    save_predictions: bool = False,
    emit: Emit = ignore,
    progress: Progress | None = None,
) -> Results:
    spec = resolved.spec
    progress = progress or NullProgress()
    started = time.perf_counter()
    checked_writable_dir(out_dir, "output directory")
    checked_writable_dir(FeatureCache(Path(spec.cache_dir) if spec.cache_dir else None).root, "cache directory")
    device = resolve_device(spec.device)
    plan = plan_run(resolved, plugins, device)
    described = run_metric_descriptors(plan, plugins)
    columns = spec.report.metrics
    if columns is not None:
        checked_columns(columns, list(described), f"{resolved.loaded.source}: report.metrics", "this run's datasets")
    env = environment(device, plugins)
    seed_counts = {protocol.preset[0]: len(protocol.seeds) for protocol in spec.protocol.resolved()}
    spec_record = {
        "source": resolved.loaded.source,
        **spec.model_dump(mode="json"),
        "resolved_protocol": [protocol.model_dump(mode="json") for protocol in spec.protocol.resolved()],
    }
    published = paper_values(resolved, plugins)
    runs: list[Run] = []
    probes: list[ProbeRecord] = []
    skipped: list[SkippedSample] = []
    records: list[ExtractionRecord] = []
    results: Results | None = None
    with run_scratch(plan.cache.root) as scratch:
        for features in model_features(
            plan, use_cache=spec.extraction.cache, scratch=scratch, progress=progress, emit=emit
        ):
            m_label = features.model.spec.label
            for d_index, (dataset, extracted) in enumerate(zip(plan.datasets, features.per_dataset, strict=True)):
                emit(Event("stage", f"{m_label} on {dataset.spec.label}", name="check"))
                splits = {}
                for source in dataset.sources():
                    got = extracted[f"{source.label}/{source.name}"]
                    splits[f"{source.label}/{source.name}"] = _checked(
                        f"{source.label}/{source.name} ({m_label})", got, dataset.dataset.labeled
                    )
                    skipped += _skipped(m_label, source, got)
                    records.append(_extraction_record(m_label, source, got, features.settings, device))
                origin = "cache" if all(e.from_cache for e in extracted.values()) else "extracted"
                said = "from the cache" if origin == "cache" else origin
                text = f"{m_label} on {dataset.spec.label}: features {said}"
                emit(Event("features", text, data={"source": origin}))
                transfers = tuple(
                    TransferTarget(
                        label=f"{dataset.spec.label} → {t.spec.label}",
                        split=t.spec.split,
                        features=splits[f"{t.source.label}/{t.source.name}"],
                        class_map=t.class_map,
                    )
                    for t in dataset.targets
                )
                protocol_plan = plan_protocol(
                    splits[f"{dataset.fit.label}/{dataset.fit.name}"],
                    splits[f"{dataset.eval.label}/{dataset.eval.name}"],
                    n_classes=dataset.dataset.num_classes,
                    protocol=spec.protocol,
                    plugins=plugins,
                    model=m_label,
                    dataset=dataset.spec.label,
                    backend_options=resolved.backend_options,
                    device=device,
                    backbone=features.model.spec.id,
                    fit_split=dataset.fit.name,
                    eval_split=dataset.eval.name,
                    class_groups=dataset.class_groups or {},
                    transfers=transfers,
                    extract_s=features.extract_s[d_index],
                    predictions_dir=out_dir / "predictions" if save_predictions else None,
                    probes=resolved.probes,
                )
                probes += run_probes(protocol_plan, emit)
                for run in run_protocol(protocol_plan, scratch=scratch / "projections", progress=progress, emit=emit):
                    runs.append(run)
                    data = {"seeds": seed_counts[run.protocol.preset], "metrics": described}
                    emit(Event("run", _run_line(run, described), run=run, data=data))
                results = build_results(
                    runs,
                    metrics=described,
                    columns=columns,
                    spec=spec_record,
                    env=env,
                    wall_s=time.perf_counter() - started,
                    skipped=skipped,
                    published=published,
                    extraction=records,
                    probes=probes,
                )
                write_reports(results, out_dir, plugins)
    if results is None:
        raise SSLBenchError("no model of the spec could run (all were optional and unavailable)")
    return results


def _extraction_record(
    model: str, source: SplitSource, got: Extracted, settings: ExtractionSettings, device: str
) -> ExtractionRecord:
    return ExtractionRecord(
        model=model,
        dataset=source.label,
        split=source.name,
        device=device,
        memory_format=settings.memory_format,
        precision=forward_precision(settings, device),
        decode=settings.decode,
        precision_check=got.precision_check,
        decode_check=got.decode_check,
    )


def run_metric_descriptors(plan: RunPlan, plugins: Plugins) -> dict[str, MetricInfo]:
    """Every metric the runs of ``plan`` can record, described (:func:`sslbench.pipeline.metric_descriptors`
    over its datasets, whose class groups and transfer targets are known before any extraction)."""
    described: dict[str, MetricInfo] = {}
    for dataset in plan.datasets:
        groups = dataset.class_groups or {}
        entries = tuple(e for e in plugins.metrics if dataset.dataset.labeled or not e.needs_labels)
        described.update(metric_descriptors(entries, groups, plan.resolved.probes, bool(dataset.targets)))
    return described


def _run_line(run: Run, described: Mapping[str, MetricInfo]) -> str:
    head = f"{run.model} on {run.dataset} k={run.protocol.n_clusters} pca={run.protocol.pca_dims} seed={run.seed}"
    shown = [f"{described[m].label} {described[m].text(run.metrics[m])}" for m in headline_metrics(run.metrics)]
    return f"{head}: {'  '.join(shown) or 'done'}"


def paper_values(resolved: ResolvedSpec, plugins: Plugins) -> PublishedLookup:
    """The paper's Table 1 values from the model cards, for rows with the paper's protocol
    (1000 classes and clusters = overclustering × 1000), and the card's published values of each probe
    of the spec that has some (:attr:`~sslbench.interfaces.ProbeEntry.published`: kNN-20 and linear
    top-1 on 1000-class data)."""
    cards = {}
    for m_spec in resolved.spec.models:
        if m_spec.id in plugins.backbones and plugins.backbones.get(m_spec.id).card is not None:
            cards[m_spec.label] = plugins.backbones.get(m_spec.id).card

    def lookup(model: str, protocol: RunProtocol) -> Published | None:
        card = cards.get(model)
        if card is None:
            return None
        sources, metrics = [], {}
        for row in card.paper if protocol.n_classes == 1000 and protocol.k == 1000 else []:
            if row.overcluster == protocol.overcluster:
                metrics = {
                    name: MetricSummary(mean=getattr(row, name).mean / 100, std=getattr(row, name).std / 100)
                    for name in HEADLINE_METRICS  # the fields of a card's paper row
                }
                sources.append(f"paper Table 1: {row.row}")
                break
        for probe in resolved.probes:
            if probe.entry.published is None:
                continue
            for name, (value, source) in probe.entry.published(card, protocol.n_classes, probe.options).items():
                metrics[name] = MetricSummary(mean=value, std=None)
                sources.append(f"{probe.metrics()[name].label}: {source}")
        return Published(source="; ".join(sources), metrics=metrics) if metrics else None

    return lookup


# --------------------------------------------------------------------------------------------------
# sslbench extract


def extract_spec(
    resolved: ResolvedSpec,
    plugins: Plugins,
    *,
    progress: Progress | None = None,
    device: str | None = None,
    emit: Emit = ignore,
    ranks: Ranks = ONE_PROCESS,
) -> list[ModelFeatures]:
    """Fill the cache for every model × dataset of the spec (each of ``ranks`` extracting its shard of
    every split); computes no clustering."""
    spec = resolved.spec
    checked_writable_dir(FeatureCache(Path(spec.cache_dir) if spec.cache_dir else None).root, "cache directory")
    plan = plan_run(resolved, plugins, device or resolve_device(resolved.spec.device), ranks)
    with run_scratch(plan.cache.root) as scratch:
        return list(
            model_features(plan, use_cache=True, scratch=scratch, progress=progress or NullProgress(), emit=emit)
        )
