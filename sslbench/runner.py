"""``sslbench run`` and ``sslbench extract``: every model × dataset of a resolved spec.

Features come from the cache when an earlier run (another k, other PCA dims) extracted them.
results.json is rewritten after every model × dataset block, so a failure late in a long run keeps
the blocks already finished.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from sslbench.cache import CacheEntry, CacheKey, FeatureCache
from sslbench.errors import SSLBenchError
from sslbench.evaluate import TransferTarget, checked_split, run_protocol
from sslbench.extract import Extracted, ExtractionSettings, extract_split, prepare_backbone, resolve_device
from sslbench.interfaces import Backbone, Dataset, Split
from sslbench.plugins import Plugins
from sslbench.progress import NullProgress, Progress
from sslbench.results import (
    MetricSummary,
    Published,
    PublishedLookup,
    Results,
    Run,
    RunProtocol,
    SkippedSample,
    build_results,
    environment,
    write_atomic,
)
from sslbench.spec import DatasetSpec, ModelSpec, ResolvedSpec, TransferSpec
from sslbench.transfer import ClassMap, checked_class_groups

#: Reports written next to results.json by ``sslbench run``.
FILE_REPORTS = ("md", "csv")


def _split(dataset: Dataset, spec: DatasetSpec, which: str, resolved: ResolvedSpec, index: int) -> str:
    name = getattr(spec, which)
    if name not in dataset.splits:
        line = resolved.loaded.lines.get(("datasets", index, which)) or resolved.loaded.lines.get(("datasets", index))
        raise SSLBenchError(
            f"{resolved.loaded.source}:{line}: datasets[{index}].{which}: dataset '{spec.id}' has no "
            f"split '{name}'; it has: {', '.join(dataset.splits)}"
        )
    return name


def write_reports(results: Results, out_dir: Path, plugins: Plugins) -> None:
    results.write(out_dir / "results.json")
    for name in FILE_REPORTS:
        reporter = plugins.reporters.get(name).reporter
        write_atomic(out_dir / f"results{reporter.suffix}", reporter.render(results))


@dataclass
class Block:
    """One model on one dataset, with the features of its two splits."""

    model: ModelSpec
    dataset_spec: DatasetSpec
    dataset: Dataset
    fit_split: str
    eval_split: str
    extracted: dict[str, Extracted]
    extract_s: float
    #: Per ``transfer`` entry of the dataset spec: its checked class map and extracted split.
    transfers: list[tuple[TransferSpec, ClassMap, Extracted]] = field(default_factory=list)


def _settings(resolved: ResolvedSpec) -> ExtractionSettings:
    ext = resolved.spec.extraction
    return ExtractionSettings(ext.batch_size, ext.workers, ext.amp, ext.on_error, ext.commit_every)


def _dump(options: BaseModel) -> dict[str, object]:
    return options.model_dump(mode="json")


@dataclass(frozen=True)
class _Extractor:
    """Extracts splits with one backbone through the cache (or a scratch folder)."""

    model: ModelSpec
    model_options: BaseModel | None
    backbone: Backbone
    settings: ExtractionSettings
    device: str
    cache: FeatureCache
    use_cache: bool
    progress: Progress

    def __call__(
        self, dataset_id: str, dataset_label: str, options: BaseModel, split_name: str, split: Split
    ) -> Extracted:
        key = CacheKey(
            backbone=self.model.id,
            backbone_options=_dump(self.model_options) if self.model_options is not None else {},
            backbone_fingerprint=self.backbone.fingerprint(),
            dataset=dataset_id,
            dataset_options=_dump(options),
            split=split_name,
            split_fingerprint=split.fingerprint(),
        )
        return extract_split(
            self.backbone,
            split,
            settings=self.settings,
            device=self.device,
            name=f"{dataset_label}/{split_name} ({self.model.label})",
            entry=self.cache.entry(key) if self.use_cache else _scratch_entry(key),
            progress=self.progress,
        )


def extracted_blocks(
    resolved: ResolvedSpec,
    plugins: Plugins,
    device: str,
    progress: Progress,
    cache: FeatureCache,
    notes: list[str],
) -> Iterator[Block]:
    """Features of both splits for every model × dataset, from the cache or extracted into it.

    Optional models whose backbone or weights are not installed are skipped, with a line in ``notes``.
    """
    spec = resolved.spec
    settings = _settings(resolved)
    backbones: dict[int, Backbone] = {}
    unavailable: set[int] = set()
    for d_index, (d_spec, d_options) in enumerate(zip(spec.datasets, resolved.dataset_options, strict=True)):
        dataset = plugins.datasets.get(d_spec.id).factory(d_options)
        fit_split = _split(dataset, d_spec, "fit_split", resolved, d_index)
        eval_split = _split(dataset, d_spec, "eval_split", resolved, d_index)
        targets = _transfer_targets(resolved, plugins, d_index, dataset)
        for m_index, (m_spec, m_options) in enumerate(zip(spec.models, resolved.model_options, strict=True)):
            if m_index in unavailable:
                continue
            if m_index not in backbones:
                try:
                    if m_options is None:
                        raise SSLBenchError(f"no installed plugin provides backbone '{m_spec.id}'")
                    built = plugins.backbones.get(m_spec.id).factory(m_options)
                except SSLBenchError as exc:
                    if not m_spec.optional:
                        raise
                    unavailable.add(m_index)
                    notes.append(f"optional model {m_spec.label} skipped: {exc}")
                    continue
                backbones[m_index] = prepare_backbone(built, device)
            backbone = backbones[m_index]
            started = time.perf_counter()

            extractor = _Extractor(
                m_spec, m_options, backbone, settings, device, cache, spec.extraction.cache, progress
            )
            extracted = {
                name: extractor(d_spec.id, d_spec.label, d_options, name, dataset.splits[name])
                for name in dict.fromkeys((fit_split, eval_split))
            }
            transfers = [
                (
                    t_spec,
                    class_map,
                    extractor(t_spec.id, t_spec.label, t_opts, t_spec.split, t_dataset.splits[t_spec.split]),
                )
                for t_spec, t_opts, t_dataset, class_map in targets
            ]
            yield Block(
                m_spec, d_spec, dataset, fit_split, eval_split, extracted, time.perf_counter() - started, transfers
            )


def _transfer_targets(
    resolved: ResolvedSpec, plugins: Plugins, d_index: int, source: Dataset
) -> list[tuple[TransferSpec, BaseModel, Dataset, ClassMap]]:
    """The target datasets of ``datasets[d_index].transfer``, their split checked, with their class maps."""
    d_spec = resolved.spec.datasets[d_index]
    options = resolved.transfer_options[d_index] if resolved.transfer_options else []
    targets = []
    for j, (t_spec, t_options) in enumerate(zip(d_spec.transfer, options, strict=True)):
        at = f"{resolved.loaded.source}: datasets[{d_index}].transfer[{j}]"
        target = plugins.datasets.get(t_spec.id).factory(t_options)
        if t_spec.split not in target.splits:
            raise SSLBenchError(
                f"{at}.split: dataset '{t_spec.id}' has no split '{t_spec.split}'; it has: {', '.join(target.splits)}"
            )
        if t_spec.class_map not in target.metadata:
            known = ", ".join(target.metadata) or "none"
            raise SSLBenchError(
                f"{at}.class_map: dataset '{t_spec.id}' has no metadata '{t_spec.class_map}' (it has: {known})"
            )
        class_map = ClassMap.checked(
            target.metadata[t_spec.class_map], target.num_classes, source.num_classes, f"{at}.class_map"
        )
        targets.append((t_spec, t_options, target, class_map))
    return targets


def _scratch_entry(key: CacheKey) -> CacheEntry:
    """An entry in a temporary directory removed at exit (``extraction.cache: false``)."""
    folder = Path(tempfile.mkdtemp(prefix="sslbench-features-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return FeatureCache(folder).entry(key)


def cache_for(resolved: ResolvedSpec) -> FeatureCache:
    cache_dir = resolved.spec.cache_dir
    return FeatureCache(Path(cache_dir) if cache_dir else None)


def run_spec(
    resolved: ResolvedSpec,
    plugins: Plugins,
    *,
    out_dir: Path,
    save_predictions: bool = False,
    log: Callable[[str], None] = lambda line: None,
    progress: Progress | None = None,
) -> Results:
    spec = resolved.spec
    progress = progress or NullProgress()
    started = time.perf_counter()
    device = resolve_device(spec.device)
    env = environment(device, plugins)
    spec_record = {"source": resolved.loaded.source, **spec.model_dump(mode="json")}
    runs: list[Run] = []
    skipped: list[SkippedSample] = []
    results: Results | None = None

    notes: list[str] = []
    for block in extracted_blocks(resolved, plugins, device, progress, cache_for(resolved), notes):
        while notes:
            log(f"[yellow]{notes.pop(0)}")
        m_label, d_label = block.model.label, block.dataset_spec.label
        splits = []
        for split_name in (block.fit_split, block.eval_split):
            extracted = block.extracted[split_name]
            where = f"{d_label}/{split_name} ({m_label})"
            splits.append(checked_split(where, extracted.features, extracted.labels))
            skipped += [
                SkippedSample(model=m_label, dataset=d_label, split=split_name, sample=s["sample"], error=s["error"])
                for s in extracted.skipped
            ]
        source = "from the cache" if all(e.from_cache for e in block.extracted.values()) else "extracted"
        log(f"[bold]{m_label}[/] on [bold]{d_label}[/]: features {source}")

        def report(run: Run) -> None:
            m = run.metrics
            log(
                f"  k={run.protocol.n_clusters} pca={run.protocol.pca_dims} seed={run.seed}: "
                f"ACC {100 * m['acc']:.2f}  ARI {100 * m['ari']:.2f}  NMI {100 * m['nmi']:.2f}"
                if {"acc", "ari", "nmi"} <= m.keys()
                else f"  k={run.protocol.n_clusters} seed={run.seed}: done"
            )

        transfers = []
        for t_spec, class_map, t_extracted in block.transfers:
            where = f"{t_spec.label}/{t_spec.split} ({m_label})"
            skipped += [
                SkippedSample(
                    model=m_label, dataset=t_spec.label, split=t_spec.split, sample=s["sample"], error=s["error"]
                )
                for s in t_extracted.skipped
            ]
            transfers.append(
                TransferTarget(
                    label=f"{d_label} → {t_spec.label}",
                    split=t_spec.split,
                    features=checked_split(where, t_extracted.features, t_extracted.labels),
                    class_map=class_map,
                )
            )
        groups = block.dataset.metadata.get("class_groups")
        class_groups = (
            checked_class_groups(groups, block.dataset.num_classes, f"dataset {d_label}")
            if groups is not None
            else None
        )
        runs += run_protocol(
            splits[0],
            splits[1],
            n_classes=block.dataset.num_classes,
            protocol=spec.protocol,
            plugins=plugins,
            model=m_label,
            dataset=d_label,
            device=device,
            extract_s=block.extract_s,
            on_run=report,
            predictions_dir=out_dir / "predictions" if save_predictions else None,
            split_names=(block.fit_split, block.eval_split),
            progress=progress,
            class_groups=class_groups,
            transfers=transfers,
            backbone=block.model.id,
        )
        results = build_results(
            runs,
            spec=spec_record,
            env=env,
            wall_s=time.perf_counter() - started,
            skipped=skipped,
            published=paper_values(resolved, plugins),
        )
        write_reports(results, out_dir, plugins)
    for note in notes:
        log(f"[yellow]{note}")
    if results is None:
        raise SSLBenchError("no model of the spec could run (all were optional and unavailable)")
    return results


def paper_values(resolved: ResolvedSpec, plugins: Plugins) -> PublishedLookup:
    """The paper's Table 1 values from the model cards, for rows with the paper's protocol
    (1000 classes and clusters = overclustering × 1000)."""
    cards = {}
    for m_spec in resolved.spec.models:
        if m_spec.id in plugins.backbones and plugins.backbones.get(m_spec.id).card is not None:
            cards[m_spec.label] = plugins.backbones.get(m_spec.id).card

    def lookup(model: str, protocol: RunProtocol) -> Published | None:
        card = cards.get(model)
        if card is None or protocol.n_classes != 1000 or protocol.k != 1000:
            return None
        for row in card.paper:
            if row.overcluster == protocol.overcluster:
                metrics = {
                    name: MetricSummary(mean=getattr(row, name).mean / 100, std=getattr(row, name).std / 100)
                    for name in ("acc", "ari", "ami", "nmi")
                }
                return Published(source=f"paper Table 1: {row.row}", metrics=metrics)
        return None

    return lookup


def extract_spec(
    resolved: ResolvedSpec, plugins: Plugins, *, progress: Progress | None = None, device: str | None = None
) -> list[Block]:
    """Fill the cache for every model × dataset of the spec; computes no clustering."""
    device = device or resolve_device(resolved.spec.device)
    notes: list[str] = []
    return list(extracted_blocks(resolved, plugins, device, progress or NullProgress(), cache_for(resolved), notes))
