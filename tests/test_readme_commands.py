"""README.md and CONTRIBUTING.md say only what runs.

* Every command line in README.md's shell blocks is run here as written, or run as written by the test
  named in RUN_ELSEWHERE, or ends with a ``# needs: …`` comment (the network, a dataset, a GPU).
* Every command of README's command table exists, with every option it shows, and runs here on small
  data; every command of the CLI is in the table.
* README's spec and Python API blocks run; no vague time claim ("about a minute") is left.
* The plugin guide of CONTRIBUTING.md (the blocks marked ``<!-- test: plugin-guide file=PATH -->``) is
  written to a folder, installed as a distribution would be (an entry point), and run.

Commands run in-process through :func:`sslbench.cli.main` (one start-up for all of them), from a
temporary directory with a private feature cache; ``sslbench --help`` also runs as a real process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sslbench import cli, evaluate_features

from conftest import REPO, blobs, install_wheel_in_fresh_venv, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")
CONTRIBUTING = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")

NEEDS = re.compile(r"#\s*needs:\s*\S")

#: README commands whose test is elsewhere: command → (test file, text that runs it there).
RUN_ELSEWHERE = {
    "sslbench run quickstart": ("tests/test_cli.py", 'run_cli("run", "quickstart"'),
}


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """``(marker comment above it, info string, body)`` of every fenced code block."""
    pattern = re.compile(r"(?:<!--\s*(?P<marker>[^>]*?)\s*-->\n)?^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.M | re.S)
    return [(m["marker"] or "", m["info"].strip(), m["body"]) for m in pattern.finditer(text)]


def shell_commands(text: str) -> list[str]:
    """The command lines of the shell blocks (continuation lines joined; comment lines dropped)."""
    commands = []
    for _, info, body in fenced_blocks(text):
        if info not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def without_comment(command: str) -> str:
    return " ".join(shlex.split(command, comments=True))


def table_commands(text: str) -> list[str]:
    """The synopses of the first column of README's command table."""
    section = text.split("## The command line", 1)[1].split("\n## ", 1)[0]
    synopses = []
    for row in section.splitlines():
        if row.startswith("| `sslbench"):
            first = row.split(" | ", 1)[0]
            synopses += re.findall(r"`(sslbench [^`]+)`", first)
    return synopses


def run_here(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``sslbench …`` in this process, as written; return its stdout."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "sslbench", command
    try:
        status = cli.main(argv[1:])
    except SystemExit as exc:  # argparse's --help
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert status == 0, f"{command}: exit {status}\n{err[-2000:]}"
    return out


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


# ------------------------------------------------------------------------------------------------
# README: every command is run or marked


def test_every_readme_shell_command_is_run_or_marked():
    commands = shell_commands(README)
    assert len(commands) >= 5
    unmarked = [c for c in commands if not NEEDS.search(c)]
    for command in unmarked:
        command = without_comment(command)
        if command in RUN_ELSEWHERE:
            path, snippet = RUN_ELSEWHERE[command]
            assert snippet in (REPO / path).read_text(encoding="utf-8"), f"{path} no longer runs `{command}`"
        else:
            assert command.startswith("sslbench "), (
                f"README command `{command}` is neither run by tests/test_readme_commands.py nor marked `# needs: …`"
            )
    assert NEEDS.search(README), "the marker convention is used"


def test_readme_first_commands_run_as_written(workdir, capsys):
    # The results file the README's report command reads, made here without the 2-minute run.
    x, y = blobs(30, 4, 6, seed=0)
    evaluate_features(x[:80], y[:80], x[80:], y[80:], seeds=2, epochs=3).write("runs/quickstart/results.json")
    outputs = {}
    for command in shell_commands(README):
        if NEEDS.search(command) or without_comment(command) in RUN_ELSEWHERE:
            continue
        outputs[without_comment(command)] = run_here(command, capsys)
    assert "usage: sslbench" in outputs["sslbench --help"]
    assert "basic_backbones" in outputs["sslbench plugins"]
    assert "random_cnn" in outputs["sslbench models"]
    assert "ok:" in outputs["sslbench validate quickstart"]
    assert "| Method |" in outputs["sslbench report runs/quickstart/results.json --format md"]
    assert "feature cache" in outputs["sslbench cache ls"]


def test_help_runs_as_a_real_process(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "usage: sslbench" in proc.stdout


def test_readme_command_table_matches_the_parser():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = subparsers.choices
    documented = set()
    for synopsis in table_commands(README):
        words = synopsis.split()
        name = words[1]
        assert name in commands, f"README's table shows `{synopsis}`: no command {name}"
        sub = commands[name]
        if name == "cache":  # `sslbench cache ls` / `sslbench cache rm PATTERN…`
            sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[words[2]]
            options = {o for a in commands[name]._actions for o in a.option_strings}
        else:
            options = set()
        options |= {o for a in sub._actions for o in a.option_strings}
        for option in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", synopsis):
            assert option in options, f"README's table shows `{synopsis}`: {name} has no option {option}"
        documented.add(name)
    for name in commands:
        assert name in documented, f"`sslbench {name}` is not in README's command table"
    # the options the table's prose names
    assert {"--dir"} <= {o for a in commands["cache"]._actions for o in a.option_strings}
    assert {"--grid-count", "--grid-columns", "--grid-cell"} <= {
        o for a in commands["clusters"]._actions for o in a.option_strings
    }


TINY_SPEC = """\
name: tiny
models:
  - id: raw
  - id: random_cnn
    options: {image_size: 8, width: 2}
datasets:
  - id: digits
protocol:
  overcluster: [1.0, 1.5]
  epochs: 3
  seeds: 2
extraction:
  workers: 0
device: cpu
"""


def _fake_imagenet_val(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    val = root / "val"
    val.mkdir()
    lines = []
    for i, wnid in enumerate(("n01440764", "n01443537")):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        Image.new("RGB", (4, 4)).save(val / f"{name}.JPEG")
        lines.append(f"{name}.JPEG {wnid}")
    labels = root / "labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    return val, labels


def test_every_table_command_runs(workdir, capsys):
    """Each command of README's table, with its options, on small data (test_cli checks the outputs)."""
    Path("tiny.yaml").write_text(TINY_SPEC)
    val, labels = _fake_imagenet_val(workdir)
    ran = set()

    def run(command: str) -> str:
        ran.add(command.split()[1])
        return run_here(command, capsys)

    assert "ok:" in run("sslbench validate tiny.yaml")
    run("sslbench extract tiny.yaml")
    assert "random_cnn" in run("sslbench cache ls")
    run("sslbench run tiny.yaml --out run --save-predictions")
    assert sorted(p.name for p in Path("run").iterdir())[:4] == [
        "predictions",
        "results.csv",
        "results.json",
        "results.md",
    ]
    for fmt, suffix in (("rich", "txt"), ("md", "md"), ("csv", "csv"), ("json", "json"), ("latex", "tex")):
        run(f"sslbench report run/results.json --format {fmt} -o report.{suffix}")
        assert Path(f"report.{suffix}").stat().st_size > 0, fmt
    run("sslbench report run --format html -o report.html")
    assert "<html" in Path("report.html").read_text().lower()
    out = run("sslbench clusters run --model raw --clusters 15 --grid 0 --grid-out grid.png")
    assert "purity" in out.lower() and Path("grid.png").is_file()
    pytest.importorskip("matplotlib")
    run("sslbench plot run --out figs --formats png,svg --width 4 --height 3 --dpi 40")
    run(f"sslbench prepare-imagenet-val {val} {labels}")
    assert (val / "n01440764" / "ILSVRC2012_val_00000001.JPEG").is_file()
    assert "removed" in run("sslbench cache rm '*random_cnn__digits__val__*'")
    run("sslbench plugins --json")
    run("sslbench models")
    assert ran >= {name for name in (s.split()[1] for s in table_commands(README))}


# ------------------------------------------------------------------------------------------------
# README: the spec and the Python API blocks run; no vague claims


def test_readme_spec_block_validates(workdir, capsys):
    spec = next(body for _, info, body in fenced_blocks(README) if info == "yaml" and "models:" in body)
    Path("spec.yaml").write_text(spec)
    assert "ok:" in run_here("sslbench validate spec.yaml", capsys)


def test_readme_python_api_block_runs(workdir):
    code = next(body for _, info, body in fenced_blocks(README) if info == "python" and "evaluate_features" in body)
    x, y = blobs(40, 4, 6, seed=1)
    names = {"train_features": x[:100], "train_labels": y[:100], "eval_features": x[100:], "eval_labels": y[100:]}
    exec(compile(code, "README.md (Python API)", "exec"), names)
    assert json.loads(Path("results.json").read_text())["spec"]["api"] == "evaluate_features"


def test_no_vague_time_or_status_claims():
    for name, text in (("README.md", README), ("CONTRIBUTING.md", CONTRIBUTING)):
        for phrase in (r"(about|under|less than|within) (a|one) (minute|second)", r"\bin seconds\b"):
            found = re.search(phrase, text, re.I)
            assert found is None, f"{name}: unmeasured time claim {found.group(0)!r}: say what was measured where"
    for phrase in ("not in yet", "not yet implemented", "planned", "TODO", "coming soon"):
        assert phrase.lower() not in README.lower(), phrase


# ------------------------------------------------------------------------------------------------
# CONTRIBUTING: the plugin guide works as written


def guide_files() -> dict[str, str]:
    files = {}
    for marker, _, body in fenced_blocks(CONTRIBUTING):
        match = re.fullmatch(r"test: plugin-guide file=(\S+)", marker)
        if match:
            files[match.group(1)] = body
    return files


def test_every_python_block_of_contributing_is_complete_or_marked():
    for marker, info, body in fenced_blocks(CONTRIBUTING):
        if info == "python":
            assert marker.startswith("test: plugin-guide file=") or marker == "test: fragment", body[:200]
    assert set(guide_files()) == {
        "pyproject.toml",
        "my_plugin/__init__.py",
        "my_plugin/backbone.py",
        "my_plugin/dataset.py",
        "my_plugin/metric.py",
        "my_plugin/probe.py",
        "try_it.py",
        "spec.yaml",
    }


def _digit_images(root: Path) -> None:
    """``my-images/``: 8×8 digits as PNG files listed in train.csv and val.csv."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, rows in (("train", range(0, 240)), ("val", range(240, 320))):
        (root / split).mkdir(parents=True)
        lines = ["file,label"]
        for i in rows:
            name = f"{split}/{i}.png"
            Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).save(root / name)
            lines.append(f"{name},digit-{digits.target[i]}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")


def _install_as_distribution(folder: Path, pyproject: str) -> None:
    """What ``pip install`` leaves that sslbench reads: the distribution's metadata and entry points."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(pyproject)["project"]
    info = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    points = "".join(f"{name} = {target}\n" for name, target in project["entry-points"]["sslbench"].items())
    (info / "entry_points.txt").write_text(f"[sslbench]\n{points}")


def test_contributing_plugin_guide_runs(workdir, capsys, monkeypatch):
    files = guide_files()
    for name, text in files.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    _digit_images(workdir / "my-images")
    monkeypatch.syspath_prepend(str(workdir))
    try:
        # Before installing: the guide's script calls the pieces by hand.
        runpy.run_path(str(workdir / "try_it.py"), run_name="__main__")
        printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])  # the metrics it prints
        assert 0.0 < printed["largest_cluster"] <= 1.0 and 0.0 < printed["acc"] <= 1.0

        from my_plugin.dataset import CSVImagesOptions, load_csv_images

        dataset = load_csv_images(CSVImagesOptions(root="my-images"))
        train = dataset.splits["train"]
        assert train.labels.dtype == np.int64 and len(train) == 240 and dataset.num_classes == 10
        assert train.describe(3).endswith("my-images/train/3.png")
        assert train.fingerprint() == load_csv_images(CSVImagesOptions(root="my-images")).splits["train"].fingerprint()
    finally:
        for module in [m for m in sys.modules if m == "my_plugin" or m.startswith("my_plugin.")]:
            del sys.modules[module]

    # Installed: the real command line finds it through its entry point and runs the guide's spec.
    _install_as_distribution(workdir, files["pyproject.toml"])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(workdir), os.environ.get("PYTHONPATH")) if p)}
    proc = run_cli("run", "spec.yaml", cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "runs" / "my-first-run" / "results.json").read_text())
    assert {r["model"] for r in results["runs"]} == {"tiny_cnn"} and len(results["runs"]) == 4
    assert all(0.0 < r["metrics"]["largest_cluster"] <= 1.0 for r in results["runs"])
    # The guide's probe and a built-in one, stored once each, with their columns in the reports.
    probes = {p["probe"]: p for p in results["probes"]}
    assert set(probes) == {"nearest_mean", "knn"} and probes["nearest_mean"]["n_eval"] == 80
    assert 0.0 < probes["nearest_mean"]["metrics"]["nearest_mean_top1"] <= 1.0
    assert "| NCM |" in (workdir / "runs" / "my-first-run" / "results.md").read_text()
    plugins = {p["name"]: p["distribution"] for p in results["environment"]["plugins"]}
    assert plugins["my_plugin"] == "my-sslbench-plugin"


@pytest.mark.slow
def test_contributing_plugin_guide_builds_as_a_wheel_and_runs(workdir):
    """The guide's package, built by its own pyproject.toml as a wheel and installed in a fresh virtual
    environment, runs the guide's spec: the entry point and the package are in the wheel."""
    package = workdir / "my-sslbench-plugin"
    for name, text in guide_files().items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    python = install_wheel_in_fresh_venv(package, workdir / "install")
    _digit_images(workdir / "my-images")
    shutil.copy(package / "spec.yaml", workdir / "spec.yaml")
    proc = subprocess.run(
        [python, "-m", "sslbench", "run", "spec.yaml"], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((workdir / "runs" / "my-first-run" / "results.json").read_text())
    assert all(0.0 < r["metrics"]["largest_cluster"] <= 1.0 for r in results["runs"])
    distribution = next(p["distribution"] for p in results["environment"]["plugins"] if p["name"] == "my_plugin")
    assert distribution == "my-sslbench-plugin"


def test_guide_fingerprint_follows_the_weights_file(workdir, monkeypatch):
    """The guide's advice on fingerprint(): the weights' content is in it, their path is not."""
    import torch

    (workdir / "my_plugin").mkdir()
    for name, text in guide_files().items():
        if name.startswith("my_plugin/"):
            (workdir / name).write_text(text)
    monkeypatch.syspath_prepend(str(workdir))
    try:
        from my_plugin.backbone import TinyCNN, TinyCNNOptions

        random_init = TinyCNN(TinyCNNOptions(width=4))
        torch.save(random_init.net.state_dict(), workdir / "a.pt")
        shutil.copy(workdir / "a.pt", workdir / "b.pt")  # same content, another path
        a, b = (TinyCNN(TinyCNNOptions(width=4, weights=str(workdir / f))) for f in ("a.pt", "b.pt"))
        assert a.fingerprint() == b.fingerprint() != random_init.fingerprint()
        json.dumps(a.fingerprint())
        sample = np.zeros((8, 8), dtype=np.uint8)
        assert tuple(a.preprocess(sample).shape) == (3, 32, 32)
        assert a.embed(a.preprocess(sample)[None]).shape == (1, 16) and a.feature_dim == 16
    finally:
        for module in [m for m in sys.modules if m == "my_plugin" or m.startswith("my_plugin.")]:
            del sys.modules[module]


def test_marker_convention_is_documented():
    assert "`# needs: …`" in README
    assert "<!-- test: plugin-guide file=" in CONTRIBUTING
