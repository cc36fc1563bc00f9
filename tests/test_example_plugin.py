"""The example third-party plugin (examples/sslbench-example), in-process and installed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

import sslbench
from sslbench import evaluate_features, load_plugins
from sslbench.plugins import ENTRY_POINT_GROUP

from conftest import REPO, blobs, install_wheel_in_fresh_venv, run_cli

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
    """The example built as a wheel and installed in a fresh virtual environment: its cards and their
    weights are package data, so `sslbench models` lists the cards and a run from another folder loads
    both weights files (a missing one, or one failing its sha256, would stop the run)."""
    python = install_wheel_in_fresh_venv(EXAMPLE, tmp_path)
    (wheel,) = (tmp_path / "dist").glob("sslbench_example-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for name in ("cards/example.yaml", "cards/test_vit_moco.pth", "weights/test_vit.pth"):
        assert f"sslbench_example/{name}" in shipped, name
    where = _run(
        python,
        "-c",
        "import sslbench, sslbench_example; print(sslbench.__file__, sslbench_example.__file__)",
        cwd=tmp_path,
    )
    installed, example = where.stdout.split()
    assert installed == sslbench.__file__ and Path(example).is_relative_to(tmp_path / "venv")

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
