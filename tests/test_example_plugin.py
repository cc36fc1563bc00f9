"""The example third-party plugin (examples/sslbench-example), in-process and installed."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import pytest

from sslbench import evaluate_features, load_plugins
from sslbench.plugins import ENTRY_POINT_GROUP

from conftest import REPO, blobs, run_cli

EXAMPLE = REPO / "examples" / "sslbench-example"


def _installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "example" for ep in entry_points(group=ENTRY_POINT_GROUP))


def test_example_plugin_in_process():
    """Registered as an object (how a paper's eval suite adds a metric without packaging it)."""
    spec = importlib.util.spec_from_file_location("sslbench_example_local", EXAMPLE / "sslbench_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    builtins = [
        (name, importlib.import_module(f"sslbench_plugins.{mod}"))
        for name, mod in (("metrics", "metrics"), ("reference", "reference_backend"))
    ]
    plugins = load_plugins(entry_points=False, extra=[*builtins, ("example_local", module)])
    assert plugins.backbones.names() == ["pooled_pixels"]
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
    assert listed["example"]["registered"] == {"backbone": ["pooled_pixels"], "metric": ["purity"]}

    proc = run_cli("run", str(EXAMPLE / "spec.yaml"), "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {r["model"] for r in runs} == {"pooled_pixels", "raw"}
    assert all(0.0 < r["metrics"]["purity"] <= 1.0 for r in runs)
    dists = {
        p["distribution"] for p in json.loads((tmp_path / "out" / "results.json").read_text())["environment"]["plugins"]
    }
    assert "sslbench-example" in dists
