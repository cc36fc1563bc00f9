"""The ``sslbench`` command line.

Exit status: 0 on success; 2 for a user error (one line on stderr, no traceback); 1 for anything
else, which is a bug and prints its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sslbench.bundled import find_spec
from sslbench.errors import SSLBenchError
from sslbench.plugins import Plugins, get_plugins
from sslbench.results import load_results, write_atomic
from sslbench.spec import load_spec, resolve_spec


def _console() -> Console:
    return Console(highlight=False)


def cmd_run(args: argparse.Namespace, plugins: Plugins) -> int:
    from sslbench.runner import run_spec

    resolved = resolve_spec(load_spec(find_spec(args.spec)), plugins)
    out_dir = Path(args.out or resolved.spec.output_dir or Path("runs") / resolved.loaded.name)
    console = _console()
    log_console = Console(stderr=True, highlight=False)
    results = run_spec(
        resolved, plugins, out_dir=out_dir, save_predictions=args.save_predictions, log=log_console.print
    )
    plugins.reporters.get("rich").reporter.show(results, console)
    console.print(f"results: {out_dir / 'results.json'}")
    return 0


def cmd_validate(args: argparse.Namespace, plugins: Plugins) -> int:
    loaded = load_spec(find_spec(args.spec))
    resolve_spec(loaded, plugins)
    spec = loaded.spec
    protocol = spec.protocol
    per_dataset = len(protocol.pca_dims) * len(protocol.k) * len(protocol.overcluster) * len(protocol.epochs)
    runs = len(spec.models) * len(spec.datasets) * per_dataset * len(protocol.seeds)
    print(
        f"{loaded.source}: ok: {len(spec.models)} model(s) × {len(spec.datasets)} dataset(s) × "
        f"{per_dataset} protocol point(s) × {len(protocol.seeds)} seed(s) = {runs} runs, "
        f"backend '{protocol.backend}'"
    )
    return 0


def cmd_plugins(args: argparse.Namespace, plugins: Plugins) -> int:
    if args.json:
        print(json.dumps([vars(p) for p in plugins.plugins], indent=2))
        return 0
    table = Table(title="sslbench plugins")
    for column in ("plugin", "distribution", "version", "registers"):
        table.add_column(column)
    for info in plugins.plugins:
        if info.error:
            registers = f"[red]failed to import: {info.error}[/]"
        else:
            registers = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in info.registered.items())
        table.add_row(info.name, info.distribution or "-", info.version or "-", registers or "-")
    _console().print(table)
    return 0


def cmd_models(args: argparse.Namespace, plugins: Plugins) -> int:
    table = Table(title="registered backbones")
    for column in ("id", "family", "feature dim", "weights", "plugin", "description"):
        table.add_column(column)
    for entry in plugins.backbones:
        dim = str(entry.feature_dim) if entry.feature_dim is not None else "input"
        table.add_row(
            entry.name,
            entry.family,
            dim,
            entry.weights,
            plugins.backbones.origin(entry.name),
            entry.description,
        )
    _console().print(table)
    return 0


def cmd_report(args: argparse.Namespace, plugins: Plugins) -> int:
    results = load_results(args.results)
    reporter = plugins.reporters.get(args.format).reporter
    if args.output:
        write_atomic(Path(args.output), reporter.render(results))
    elif args.format == "rich":
        reporter.show(results, _console())
    else:
        sys.stdout.write(reporter.render(results))
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
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a spec and resolve its names; computes nothing")
    validate.add_argument("spec")
    validate.set_defaults(func=cmd_validate)

    plugins = sub.add_parser("plugins", help="list plugins, their versions and what they register")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    models = sub.add_parser("models", help="list registered backbones")
    models.set_defaults(func=cmd_models)

    report = sub.add_parser("report", help="render a results.json (or its run directory)")
    report.add_argument("results")
    report.add_argument("--format", default="rich", help="a registered reporter: rich, md, csv, json, …")
    report.add_argument("--output", "-o", help="write to this file instead of stdout")
    report.set_defaults(func=cmd_report)
    return parser


def _version() -> str:
    from sslbench.results import sslbench_version

    return f"sslbench {sslbench_version()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, get_plugins()))
    except SSLBenchError as exc:
        print(f"sslbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sslbench: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is a bug: show where, exit 1
        traceback.print_exc()
        print("sslbench: internal error (a bug in sslbench or a plugin); traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
