"""The ``sslbench`` command line.

Exit status: 0 on success; 2 for a user error (one line on stderr, no traceback); 1 for anything
else, which is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslbench.errors import PluginFailure, SSLBenchError

if TYPE_CHECKING:
    from rich.console import Console

    from sslbench.events import Event
    from sslbench.plugins import Plugins
    from sslbench.results import MetricInfo, Run

# Everything else is imported inside the command that uses it: `sslbench --help` and the listing
# commands start in a fraction of a second instead of loading numpy, pydantic, rich and torch first.


def _console() -> Console:
    from rich.console import Console

    # Piped output keeps whole rows (ids, paths) instead of wrapping them at 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def point_summary(runs: list[Run], describe: Mapping[str, MetricInfo] | None = None) -> str:
    """``model on dataset k=10 pca=64: ACC 71.89 ± 9.13  ARI …  (5 seeds)`` for one protocol point: its
    headline metrics (:func:`sslbench.table.headline_metrics`), shown as ``describe`` says."""
    import statistics

    from sslbench.results import schema1_info
    from sslbench.table import headline_metrics

    first = runs[0]
    head = f"{first.model} on {first.dataset} k={first.protocol.n_clusters} pca={first.protocol.pca_dims}"
    parts = []
    for name in headline_metrics(set.intersection(*(set(r.metrics) for r in runs))):
        info = (describe or {}).get(name) or schema1_info(name)
        values = [info.scaled(r.metrics[name]) for r in runs]
        spread = f" ± {statistics.stdev(values):.{info.decimals}f}" if len(values) > 1 else ""
        parts.append(f"{info.label} {statistics.fmean(values):.{info.decimals}f}{spread}")
    seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    return f"{head}: {'  '.join(parts) or 'done'}  ({seeds})"


def _renderer(console: Console, stages: bool) -> Callable[[Event], None]:
    """Events of the core on the terminal: the only place where they get colours."""
    from rich.markup import escape

    pending: dict[tuple[object, ...], list[Run]] = {}

    # soft_wrap: a line is never cut into pieces, so notes (paths, URLs) stay copyable and greppable.
    def render(event: Event) -> None:
        if event.kind == "note":
            console.print(f"[yellow]{escape(event.text)}", soft_wrap=True)
        elif event.kind == "features":
            console.print(f"[bold]{escape(event.text)}", soft_wrap=True)
        elif event.kind == "probe":
            console.print(f"  {escape(event.text)}", soft_wrap=True)
        elif event.kind == "run" and event.run is not None:
            # One line per protocol point once all its seeds are in, not one per seed.
            run = event.run
            key = (
                run.model,
                run.dataset,
                run.protocol.preset,
                run.protocol.n_clusters,
                run.protocol.pca_dims,
                run.protocol.epochs,
            )
            pending.setdefault(key, []).append(run)
            if len(pending[key]) >= int(event.data.get("seeds", 1)):
                summary = point_summary(pending.pop(key), event.data.get("metrics"))
                console.print(f"  {escape(summary)}", soft_wrap=True)
        elif event.kind == "stage" and stages:
            # Plain and greppable: benchmarks time the stages from these lines.
            console.print(f"sslbench: stage {event.name} {event.text}", markup=False, soft_wrap=True)

    return render


def cmd_run(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.console import Console

    from sslbench.bundled import find_spec
    from sslbench.progress import rich_progress
    from sslbench.runner import run_spec
    from sslbench.spec import load_spec, resolve_spec

    resolved = resolve_spec(load_spec(find_spec(args.spec)), plugins)
    out_dir = Path(args.out or resolved.spec.output_dir or Path("runs") / resolved.loaded.name)
    console = _console()
    log_console = Console(stderr=True, highlight=False)
    with rich_progress(log_console) as progress:
        results = run_spec(
            resolved,
            plugins,
            out_dir=out_dir,
            save_predictions=args.save_predictions,
            emit=_renderer(log_console, args.stages),
            progress=progress,
        )
    plugins.reporters.get("rich").reporter.show(results, console)
    if results.skipped:
        log_console.print(f"[yellow]{len(results.skipped)} unreadable sample(s) skipped; listed in results.json")
    console.print(f"results: {out_dir / 'results.json'}")
    return 0


def cmd_extract(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.console import Console

    from sslbench.bundled import find_spec
    from sslbench.extract import init_distributed_from_env
    from sslbench.progress import rich_progress
    from sslbench.runner import extract_spec
    from sslbench.spec import load_spec, resolve_spec

    ranks = init_distributed_from_env()
    resolved = resolve_spec(load_spec(find_spec(args.spec)), plugins)
    device = None
    if ranks.distributed and resolved.spec.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
    log_console = Console(stderr=True, highlight=False)
    quiet = ranks.rank != 0
    with rich_progress(None if not quiet else Console(quiet=True)) as progress:
        models = extract_spec(
            resolved,
            plugins,
            progress=progress,
            device=device,
            emit=_renderer(log_console, stages=False),
            ranks=ranks,
        )
    if not quiet:
        for features in models:
            for extracted in features.per_dataset:
                for split, got in extracted.items():
                    state = "cached" if got.from_cache else "extracted"
                    log_console.print(
                        f"{features.model.spec.label} / {split}: "
                        f"{got.features.shape[0]} × {got.features.shape[1]} {state}"
                        + (f", {len(got.skipped)} skipped" if got.skipped else ""),
                        markup=False,
                    )
    if ranks.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def cmd_cache(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.markup import escape
    from rich.table import Table

    from sslbench.cache import FeatureCache

    cache = FeatureCache(Path(args.dir) if args.dir else None)
    if args.cache_command == "rm":
        for path in cache.remove(args.patterns, everything=args.all):
            print(f"removed {path}")
        return 0
    table = Table(title=f"feature cache: {cache.root}")
    for column in ("entry", "backbone", "dataset", "split", "rows × dims", "state", "size"):
        table.add_column(column)
    for status in cache.scan():
        size = f"{status.size / 1e6:.1f} MB"
        if status.manifest is not None:
            key = status.manifest.key
            cells = [str(key.get(k, "")) for k in ("backbone", "dataset", "split")]
            cells.append(f"{status.manifest.n} × {status.manifest.dims}")
        else:
            cells = ["", "", "", f"{status.committed} committed" if status.state == "partial" else ""]
        state = {"complete": "complete", "partial": "partial (resumable)"}.get(
            status.state, f"broken ({status.reason})"
        )
        table.add_row(escape(status.path.name), *(escape(c) for c in cells), escape(state), size)
    _console().print(table)
    return 0


def cmd_prepare_imagenet_val(args: argparse.Namespace, plugins: Plugins) -> int:
    from sslbench.imagenet_val import prepare_imagenet_val

    synsets = Path(args.synsets) if args.synsets else None
    placed = prepare_imagenet_val(Path(args.val_dir), Path(args.labels), synsets, args.link)
    print(f"{placed} images sorted into class folders under {args.val_dir}")
    return 0


def cmd_validate(args: argparse.Namespace, plugins: Plugins) -> int:
    from sslbench.bundled import find_spec
    from sslbench.spec import load_spec, missing_paths, resolve_spec

    loaded = load_spec(find_spec(args.spec))
    resolved = resolve_spec(loaded, plugins)
    for warning in missing_paths(resolved):
        print(f"sslbench: warning: {warning}", file=sys.stderr)
    spec = loaded.spec
    targets = sum(len(d.transfer) for d in spec.datasets)
    for protocol in spec.protocol.resolved():
        per_dataset = len(protocol.pca_dims) * len(protocol.k) * len(protocol.overcluster) * len(protocol.epochs)
        runs = len(spec.models) * len(spec.datasets) * per_dataset * len(protocol.seeds)
        transfer_runs = len(spec.models) * targets * per_dataset * len(protocol.seeds)
        extra = f" (+ {transfer_runs} on {targets} transfer target(s))" if targets else ""
        preset = f", preset {protocol.preset[0]}" if len(spec.protocol.preset) > 1 else ""
        print(
            f"{loaded.source}: ok: {len(spec.models)} model(s) × {len(spec.datasets)} dataset(s) × "
            f"{per_dataset} protocol point(s) × {len(protocol.seeds)} seed(s) = {runs} runs{extra}, "
            f"backend '{protocol.backend}'{preset}"
        )
    return 0


def cmd_plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.markup import escape
    from rich.table import Table

    if args.json:
        print(json.dumps([vars(p) for p in plugins.plugins], indent=2))
        return 0
    table = Table(title="sslbench plugins")
    for column in ("plugin", "distribution", "version", "registers"):
        table.add_column(column)
    for info in plugins.plugins:
        if info.failure:
            would = "".join(f"\nwould register {kind}: {', '.join(n)}" for kind, n in info.would_register.items())
            registers = f"[red]{escape(info.failure)}[/]{escape(would)}"
        else:
            registers = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
        table.add_row(info.name, info.distribution or "-", info.version or "-", registers or "-")
    _console().print(table)
    return 0


def cmd_models(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.table import Table

    from sslbench.weights import CARD_LOADER, weights_status

    rows = []
    for entry in plugins.backbones:
        dim = str(entry.feature_dim) if entry.feature_dim is not None else "input"
        card = entry.card
        linear = f"{card.linear_top1.value:g}" if card and card.linear_top1 else "-"
        paper = ", ".join(f"{p.acc.mean:.2f}" for p in card.paper) if card and card.paper else "-"
        if card is None:
            weights = entry.weights
        elif card.loader != CARD_LOADER:  # e.g. TF checkpoints: that loader looks for its own files
            weights = f"{entry.weights}; looked up by the {card.loader} loader when it runs"
        else:
            status = weights_status(card, verify=args.verify)
            weights = f"absent ({entry.weights})" if status.state == "absent" else str(status)
        rows.append((entry.name, entry.family, dim, linear, paper, weights, plugins.backbones.origin(entry.name)))
    columns = ("id", "family", "dim", "linear top-1", "paper ACC", "weights", "plugin")
    if args.plain or not sys.stdout.isatty():
        # Piped: one tab-separated line per backbone, ids whole, for grep and cut.
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))
        return 0
    console = _console()
    # On a narrow terminal the family and plugin columns go first (`--plain` has them all).
    keep = [0, 2, 3, 4, 5] if console.width < 120 else list(range(len(columns)))
    table = Table(title="registered backbones")
    # The id is what users copy into a spec: never cut or wrapped; the other columns wrap instead.
    table.add_column("id", no_wrap=True, min_width=max((len(r[0]) for r in rows), default=2))
    for index in keep[1:]:
        table.add_column(columns[index], overflow="fold")
    for row in rows:
        table.add_row(*(row[index] for index in keep))
    console.print(table)
    return 0


def cmd_report(args: argparse.Namespace, plugins: Plugins) -> int:
    from sslbench.interfaces import ReportContext
    from sslbench.results import load_results, merge_results, write_output

    results = merge_results([load_results(path) for path in args.results], args.results)
    if args.metrics is not None:
        results = results.with_columns([name.strip() for name in args.metrics.split(",")], what="--metrics")
    reporter = plugins.reporters.get(args.format).reporter
    context = ReportContext.from_arguments(args.results, plugins)
    if args.output:
        write_output(Path(args.output), reporter.render_with_context(results, context))
    elif args.format == "rich":
        reporter.show(results, _console())
    else:
        sys.stdout.write(reporter.render_with_context(results, context))
    return 0


def cmd_clusters(args: argparse.Namespace, plugins: Plugins) -> int:
    from rich.table import Table

    from sslbench.inputs import NO_LABEL
    from sslbench.inspection import cluster_stats, largest_and_smallest, purest_and_least_pure
    from sslbench.predictions import find_predictions, load_predictions

    path = find_predictions(Path(args.run_dir), args.model, args.dataset, args.seed, args.clusters)
    pred, labels = load_predictions(path, args.split)
    stats = cluster_stats(pred, labels)
    labeled = bool(labels[0] != NO_LABEL)
    console = _console()
    console.print(f"{path.name}: {len(stats)} non-empty clusters on the {args.split} split")
    if labeled:
        purest, impure = purest_and_least_pure(stats, args.top, args.min_size)
        listed = (("purest clusters", purest), ("least pure clusters", impure))
    else:
        console.print("no class labels: clusters by size (purity needs labels)")
        largest, smallest = largest_and_smallest(stats, args.top)
        listed = (("largest clusters", largest), ("smallest clusters", smallest))
    columns = ("cluster", "size", "majority class", "purity") if labeled else ("cluster", "size")
    for title, rows in listed:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right")
        for stat in rows:
            purity = (str(stat.majority_class), f"{100 * stat.purity:.1f} %") if labeled else ()
            table.add_row(str(stat.cluster), str(stat.size), *purity)
        console.print(table)
    if args.grid is not None:
        out = _cluster_grid(args, path, pred, plugins)
        console.print(f"cluster {args.grid}: grid of its images written to {out}")
    return 0


def _cluster_grid(args: argparse.Namespace, path: Path, pred: Any, plugins: Plugins) -> Path:
    """Rebuild the run's dataset from its results.json and tile images of cluster ``args.grid``."""
    from sslbench.inspection import as_image, cluster_members, image_grid, kept_indices
    from sslbench.results import load_results

    results = load_results(Path(args.run_dir))
    label = args.dataset or next((r.dataset for r in results.runs if r.model == args.model), None)
    dataset_id, options, split_name, skipped_label = _images_of(results.spec or {}, label, args.split)
    entry = plugins.datasets.get(dataset_id)
    split = entry.factory(entry.options.model_validate(options)).splits[split_name]
    skipped = {
        s.sample
        for s in results.skipped
        if s.model == args.model and s.dataset == skipped_label and s.split == split_name
    }
    kept = kept_indices(len(split), split.describe, skipped, len(pred))
    members = cluster_members(pred, args.grid)[: args.grid_count]
    images = [as_image(split[int(kept[m])], split.describe(int(kept[m]))) for m in members]
    out = Path(args.grid_out or f"{path.stem}__cluster{args.grid}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cell=args.grid_cell, columns=args.grid_columns).save(out)
    return out


def _images_of(spec: dict[str, Any], label: str | None, which: str) -> tuple[str, dict[str, Any], str, str]:
    """(dataset id, options, split, dataset label in ``skipped``) holding the images of the rows
    labelled ``label``: a dataset of the spec, or a transfer target (``Source → Target``)."""
    found: dict[str, tuple[str, dict[str, Any], str, str]] = {}
    for d in spec.get("datasets") or []:
        d_label = d.get("name") or d["id"]
        fit = (d["id"], d.get("options") or {}, d.get("fit_split", "train"), d_label)
        own = (d["id"], d.get("options") or {}, d.get("eval_split", "val"), d_label)
        found[d_label] = own if which == "eval" else fit
        for t in d.get("transfer") or []:
            t_label = t.get("name") or t["id"]
            target = (t["id"], t.get("options") or {}, t.get("split", "test"), t_label)
            found[f"{d_label} → {t_label}"] = target if which == "eval" else fit
    if label not in found:
        raise SSLBenchError(f"the run's spec has no dataset '{label}' to read images from")
    return found[label]


def cmd_plot(args: argparse.Namespace, plugins: Plugins) -> int:
    from sslbench.plots import FigureSize, plot_results
    from sslbench.results import load_results, merge_results

    results = merge_results([load_results(path) for path in args.results], args.results)
    size = FigureSize(args.width, args.height, args.dpi)
    outcome = plot_results(
        results, Path(args.out), plugins=plugins, size=size, formats=[f.strip() for f in args.formats.split(",")]
    )
    console = _console()
    for written in outcome.written:
        console.print(f"wrote {written}")
    for reason in outcome.skipped:
        console.print(f"[yellow]skipped {reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sslbench",
        description="Cluster frozen features of pretrained models with PCA + k-means and score them.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a spec and write results.json, results.md, results.csv")
    run.add_argument("spec", help="spec YAML file, or the name of a bundled spec (e.g. quickstart)")
    run.add_argument("--out", help="output directory (default: the spec's output_dir or runs/<name>)")
    run.add_argument("--save-predictions", action="store_true", help="save per-run cluster ids as .npz")
    run.add_argument("--stages", action="store_true", help="log each protocol stage as it starts (plain lines)")
    run.set_defaults(func=cmd_run)

    extract = sub.add_parser(
        "extract", help="extract features of every model × dataset into the cache (torchrun: sharded)"
    )
    extract.add_argument("spec")
    extract.set_defaults(func=cmd_extract)

    cache = sub.add_parser("cache", help="list or remove feature-cache entries")
    dir_help = "cache root (default: $SSLBENCH_CACHE or ~/.cache/sslbench/features)"
    cache.add_argument("--dir", help=dir_help)
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = cache_sub.add_parser("ls", help="list entries: complete, partial (resumable) or broken (why)")
    rm = cache_sub.add_parser("rm", help="remove entries by exact name or shell-style pattern (quoted), or --all")
    rm.add_argument("patterns", nargs="*", metavar="NAME", help="an entry's name or a pattern such as '*__val__*'")
    rm.add_argument("--all", action="store_true", help="remove every entry")
    for action in (ls, rm):  # --dir also after the action: `sslbench cache rm NAME --dir ROOT`
        action.add_argument("--dir", default=argparse.SUPPRESS, help=dir_help)
    cache.set_defaults(func=cmd_cache)

    clusters = sub.add_parser("clusters", help="the purest and least pure clusters of a saved run")
    clusters.add_argument("run_dir", help="a run directory written with --save-predictions")
    clusters.add_argument("--model", required=True, help="the model's display name in the run")
    clusters.add_argument("--dataset", help="the dataset's display name (when the run has several)")
    clusters.add_argument("--seed", type=int, default=0)
    clusters.add_argument("--clusters", type=int, help="number of clusters (when the run swept k)")
    clusters.add_argument("--split", choices=("eval", "train"), default="eval")
    clusters.add_argument("--top", type=int, default=5)
    clusters.add_argument("--min-size", type=int, default=10, help="ignore smaller clusters")
    clusters.add_argument("--grid", type=int, metavar="CLUSTER", help="also save a PNG grid of this cluster's images")
    clusters.add_argument("--grid-out", help="grid file (default: <predictions>__cluster<N>.png)")
    clusters.add_argument("--grid-count", type=int, default=32, help="images in the grid (dataset order)")
    clusters.add_argument("--grid-columns", type=int, default=8)
    clusters.add_argument("--grid-cell", type=int, default=96, help="pixels per image square")
    clusters.set_defaults(func=cmd_clusters)

    plot = sub.add_parser("plot", help="the paper's figures (Fig. 1, Fig. 2) from results files, PNG and SVG")
    plot.add_argument("results", nargs="+", help="results.json files or run directories (merged)")
    plot.add_argument("--out", default="figures", help="output folder (default: figures)")
    plot.add_argument("--formats", default="png,svg", help="comma-separated: png, svg")
    plot.add_argument("--width", type=float, default=6.4, help="inches")
    plot.add_argument("--height", type=float, default=4.8, help="inches")
    plot.add_argument("--dpi", type=int, default=100, help="PNG pixels per inch")
    plot.set_defaults(func=cmd_plot)

    prepare = sub.add_parser(
        "prepare-imagenet-val", help="sort the flat ILSVRC2012 val folder into val/<wnid>/ class folders"
    )
    prepare.add_argument("val_dir")
    prepare.add_argument("labels", help="LOC_val_solution.csv, '<file> <wnid>' lines, or the ground truth ids")
    prepare.add_argument("--synsets", help="wnids in ILSVRC2012_ID order (with the ground-truth id file)")
    prepare.add_argument("--link", action="store_true", help="symlink instead of moving the images")
    prepare.set_defaults(func=cmd_prepare_imagenet_val)

    validate = sub.add_parser("validate", help="check a spec and resolve its names; computes nothing")
    validate.add_argument("spec")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list plugins, their versions and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    models = sub.add_parser("models", help="list registered backbones")
    models.add_argument("--plain", action="store_true", help="tab-separated lines (the default when piped)")
    models.add_argument(
        "--verify", action="store_true", help="hash every weights file present but not yet verified (may take minutes)"
    )
    models.set_defaults(func=cmd_models)

    report = sub.add_parser("report", help="render a results.json (or its run directory)")
    report.add_argument("results", nargs="+", help="results.json files or run directories (merged)")
    report.add_argument("--format", default="rich", help="a registered reporter: rich, md, csv, json, latex, html, …")
    report.add_argument("--output", "-o", help="write to this file instead of stdout")
    report.add_argument(
        "--metrics",
        metavar="NAME,…",
        help="the metric columns, in order (names as in results.json: acc,nmi,knn_top1_k20,…); "
        "default: the spec's report.metrics, else every metric, ACC, ARI, AMI and NMI first",
    )
    report.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    import importlib.metadata

    try:
        return f"sslbench {importlib.metadata.version('sslbench')}"
    except importlib.metadata.PackageNotFoundError:
        return "sslbench 0+unknown"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that ``finally`` blocks (a run's scratch
    folder, a cache entry's commit) run as they do on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)  # --help and --version end here, before any heavy import

    from sslbench.threads import prefer_sleeping_threads

    prefer_sleeping_threads()  # before torch is imported, or OpenMP never reads it

    from sslbench.allocator import tune_allocator
    from sslbench.plugins import get_plugins

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            if hasattr(signal, name):
                signum = getattr(signal, name)
                previous[signum] = signal.signal(signum, terminate)
    try:
        tune_allocator()  # before the first large allocation; SSLBENCH_MALLOC=system leaves it alone
        return int(args.func(args, get_plugins()))
    except SSLBenchError as exc:
        print(f"sslbench: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"sslbench: terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("sslbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`sslbench models | head`): not an error; keep Python from printing one
        # while flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PluginFailure as exc:
        traceback.print_exc()
        print(
            f"sslbench: error: a plugin failed (a bug in it; traceback above): {exc}".splitlines()[0], file=sys.stderr
        )
        return 1
    except Exception:  # noqa: BLE001 - anything else is a bug: show where, exit 1
        traceback.print_exc()
        print("sslbench: internal error (a bug in sslbench or a plugin); traceback above", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
