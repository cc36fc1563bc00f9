"""``sslbench run``: every model × dataset of a resolved spec through extraction and the protocol.

results.json is rewritten after every model × dataset block, so a failure late in a long run keeps
the blocks already finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sslbench.errors import SSLBenchError
from sslbench.evaluate import checked_split, run_protocol
from sslbench.extract import extract_features, resolve_device
from sslbench.interfaces import Backbone, Dataset
from sslbench.plugins import Plugins
from sslbench.results import Results, Run, build_results, environment, write_atomic
from sslbench.spec import DatasetSpec, ResolvedSpec

#: Reports written next to results.json by ``sslbench run``.
FILE_REPORTS = ("md", "csv")


def _split(dataset: Dataset, spec: DatasetSpec, which: str, resolved: ResolvedSpec, index: int) -> str:
    name = getattr(spec, which)
    if name not in dataset.splits:
        line = resolved.loaded.lines.get(("datasets", index, which)) or resolved.loaded.lines.get(
            ("datasets", index)
        )
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


def run_spec(
    resolved: ResolvedSpec,
    plugins: Plugins,
    *,
    out_dir: Path,
    save_predictions: bool = False,
    log: Callable[[str], None] = lambda line: None,
) -> Results:
    spec = resolved.spec
    started = time.perf_counter()
    device = resolve_device(spec.device)
    env = environment(device, plugins)
    spec_record = {"source": resolved.loaded.source, **spec.model_dump(mode="json")}
    runs: list[Run] = []
    backbones: dict[int, Backbone] = {}
    results: Results | None = None

    for d_index, (d_spec, d_options) in enumerate(zip(spec.datasets, resolved.dataset_options, strict=True)):
        dataset = plugins.datasets.get(d_spec.id).factory(d_options)
        fit_split = _split(dataset, d_spec, "fit_split", resolved, d_index)
        eval_split = _split(dataset, d_spec, "eval_split", resolved, d_index)
        for m_index, (m_spec, m_options) in enumerate(zip(spec.models, resolved.model_options, strict=True)):
            if m_index not in backbones:
                backbones[m_index] = plugins.backbones.get(m_spec.id).factory(m_options).to(device)
            backbone = backbones[m_index]
            log(f"[bold]{m_spec.label}[/] on [bold]{d_spec.label}[/]: extracting features")
            t0 = time.perf_counter()
            splits = []
            for split_name in (fit_split, eval_split):
                where = f"{d_spec.label}/{split_name} ({m_spec.label})"
                split = dataset.splits[split_name]
                features = extract_features(
                    backbone, split, batch_size=spec.extraction.batch_size, device=device, name=where
                )
                splits.append(checked_split(where, features, split.labels))
            extract_s = time.perf_counter() - t0

            def report(run: Run) -> None:
                m = run.metrics
                log(
                    f"  k={run.protocol.n_clusters} pca={run.protocol.pca_dims} seed={run.seed}: "
                    f"ACC {100 * m['acc']:.2f}  ARI {100 * m['ari']:.2f}  NMI {100 * m['nmi']:.2f}"
                    if {"acc", "ari", "nmi"} <= m.keys()
                    else f"  k={run.protocol.n_clusters} seed={run.seed}: done"
                )

            runs += run_protocol(
                splits[0],
                splits[1],
                n_classes=dataset.num_classes,
                protocol=spec.protocol,
                plugins=plugins,
                model=m_spec.label,
                dataset=d_spec.label,
                device=device,
                extract_s=extract_s,
                on_run=report,
                predictions_dir=out_dir / "predictions" if save_predictions else None,
                split_names=(fit_split, eval_split),
            )
            results = build_results(runs, spec=spec_record, env=env, wall_s=time.perf_counter() - started)
            write_reports(results, out_dir, plugins)
    assert results is not None  # the spec has at least one model and one dataset
    return results
