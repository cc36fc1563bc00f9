"""The example third-party plugin (examples/sslbench-example), in-process and installed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import sslbench
from sslbench import evaluate_features, load_plugins
from sslbench.plugins import ENTRY_POINT_GROUP

from conftest import REPO, blobs, run_cli

EXAMPLE = REPO / "examples" / "sslbench-example"
EXAMPLE_MODULE = EXAMPLE / "sslbench_example" / "__init__.py"
EXAMPLE_BACKBONES = ["pooled_pixels", "resnet18.example_tv_in1k", "test_vit.example_moco", "test_vit.example_package"]


def _installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "example" for ep in entry_points(group=ENTRY_POINT_GROUP))


def test_example_plugin_in_process():
    """Registered as an object (how a paper's eval suite adds a metric without packaging it)."""
    spec = importlib.util.spec_from_file_location("sslbench_example_local", EXAMPLE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    builtins = [
        (name, importlib.import_module(f"sslbench_plugins.{mod}"))
        for name, mod in (("metrics", "metrics"), ("reference", "reference_backend"))
    ]
    plugins = load_plugins(entry_points=False, extra=[*builtins, ("example_local", module)])
    assert plugins.backbones.names() == EXAMPLE_BACKBONES
    x, y = blobs(40, 4, 6, seed=5)
    results = evaluate_features(
        x[:120], y[:120], x[120:], y[120:], seeds=1, epochs=2, backend="reference", plugins=plugins
    )
    assert 0.0 < results.runs[0].metrics["purity"] <= 1.0


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed() and os.environ.get("SSLBENCH_REQUIRE_EXAMPLE_PLUGIN") != "1",
    reason="pip install examples/sslbench-example to run (CI does)",
)
def test_installed_example_plugin_through_entry_points(tmp_path):
    proc = run_cli("plugins", "--json", cwd=tmp_path)
    listed = {p["name"]: p for p in json.loads(proc.stdout)}
    assert listed["example"]["distribution"] == "sslbench-example"
    assert listed["example"]["registered"] == {
        "backbone": EXAMPLE_BACKBONES,
        "metric": ["purity"],
    }

    proc = run_cli("run", str(EXAMPLE / "spec.yaml"), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"pooled_pixels", "raw"}
    assert all(0.0 < r["metrics"]["purity"] <= 1.0 for r in runs)
    dists = {
        p["distribution"] for p in json.loads((tmp_path / "out" / "results.json").read_text())["environment"]["plugins"]
    }
    assert "sslbench-example" in dists


def test_a_plugins_card_builds_and_loads_the_official_file_layout(tmp_path):
    """The example's card goes through sslbench's own card loader: a torchvision-layout ResNet-18 file
    loads with every tensor equal, a wrong layout fails naming keys, a bad card is one line."""
    import torch
    import torchvision

    from sslbench.errors import SSLBenchError
    from sslbench_plugins.pytorch_zoo import CardOptions, card_backbones

    spec = importlib.util.spec_from_file_location("sslbench_example_cards", EXAMPLE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (entry,) = card_backbones(module.EXAMPLE_CARDS)
    assert entry.name == "resnet18.example_tv_in1k" and entry.feature_dim == 512 and entry.card is not None
    torch.manual_seed(0)
    official = torchvision.models.resnet18().state_dict()  # torchvision's own key names
    path = tmp_path / "resnet18.pth"
    torch.save(official, path)
    with pytest.raises(SSLBenchError, match=r"does not match resnet18\.example_tv_in1k's sha256-prefix f37072fd"):
        entry.factory(CardOptions(weights=str(path), crop=64))  # not the published file
    (entry,) = card_backbones([{**module.EXAMPLE_CARDS[0], "hash": {"kind": "none"}}])
    backbone = entry.factory(CardOptions(weights=str(path), crop=64))
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in official.items())
    torch.save({f"module.{k}": v for k, v in official.items()}, tmp_path / "wrapped.pth")
    with pytest.raises(SSLBenchError, match="missing from the file"):
        entry.factory(CardOptions(weights=str(tmp_path / "wrapped.pth"), crop=64))
    with pytest.raises(SSLBenchError, match=r"mine\[0\]: feature"):
        card_backbones([{**module.EXAMPLE_CARDS[0], "feature": {}}], where="mine")


def test_a_folder_of_card_files_registers_the_same_backbones(tmp_path):
    import yaml

    from sslbench.errors import SSLBenchError
    from sslbench_plugins.pytorch_zoo import card_backbones

    spec = importlib.util.spec_from_file_location("sslbench_example_folder", EXAMPLE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "example.yaml").write_text(yaml.safe_dump({"family": "example", "cards": module.EXAMPLE_CARDS}))
    (entry,) = card_backbones(tmp_path)
    assert entry.card == card_backbones(module.EXAMPLE_CARDS)[0].card
    with pytest.raises(SSLBenchError, match="card folder not found"):
        card_backbones(tmp_path / "missing")


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_example_wheel_carries_its_cards_and_weights(tmp_path):
    """The example built as a wheel and installed in a fresh virtual environment (seeing this environment's
    packages, the sslbench under test included, behind its own): its cards and their weights are package
    data, so `sslbench models` lists the cards and a run from another folder loads both weights files."""
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--wheel-dir", tmp_path / "dist", source,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("sslbench_example-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {f"sslbench_example/{name}" for name in ("cards/example.yaml", "cards/test_vit_moco.pth")} <= shipped
    assert "sslbench_example/weights/test_vit.pth" in shipped

    venv.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # `import` lines of a .pth file run at start-up: addsitedir also reads this environment's own .pth files.
    parents = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    (purelib / "_parent_environment.pth").write_text(parents)
    installed = _run(
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target", purelib, wheel
    )
    assert installed.returncode == 0, installed.stderr
    where = _run(python, "-c", "import sslbench, sslbench_example; print(sslbench.__file__, sslbench_example.__file__)")
    assert where.stdout.split() == [sslbench.__file__, str(purelib / "sslbench_example" / "__init__.py")]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = _run(python, "-m", "sslbench", "models", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert "test_vit.example_moco" in listed.stdout and "test_vit.example_package" in listed.stdout
    spec = {
        "name": "wheel",
        "models": [
            {"id": name, "options": {"crop": 16}} for name in ("test_vit.example_moco", "test_vit.example_package")
        ],
        "datasets": [{"id": "digits"}],
        "protocol": {"seeds": 1, "epochs": 1},
        "device": "cpu",
    }
    (elsewhere / "spec.yaml").write_text(json.dumps(spec))
    ran = _run(python, "-m", "sslbench", "run", "spec.yaml", "--out", "out", cwd=elsewhere)
    assert ran.returncode == 0, ran.stderr
    runs = json.loads((elsewhere / "out" / "results.json").read_text())["runs"]
    assert {run["model"] for run in runs} == {"test_vit.example_moco", "test_vit.example_package"}
