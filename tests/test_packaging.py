"""The installed distribution carries its plugins and registry data (CI installs the built wheel)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

import sslbench
import sslbench_plugins
from sslbench.bundled import bundled_specs, find_spec, registry_root

from conftest import REPO


def test_registry_data_is_installed():
    assert (registry_root() / "specs" / "quickstart.yaml").is_file()
    assert "quickstart" in bundled_specs()
    assert find_spec("quickstart") == bundled_specs()["quickstart"]
    assert find_spec("my.yaml") == Path("my.yaml")  # a path-looking argument stays a path


def test_builtin_plugins_are_entry_points_of_the_distribution():
    dist = importlib.metadata.distribution("sslbench")
    names = {ep.name: ep.value for ep in dist.entry_points if ep.group == "sslbench"}
    assert names == {
        "basic_backbones": "sslbench_plugins.basic_backbones",
        "pytorch_zoo": "sslbench_plugins.pytorch_zoo",
        "generic_backbones": "sslbench_plugins.generic_backbones",
        "simclrv2": "sslbench_plugins.simclrv2",
        "bigbigan": "sslbench_plugins.bigbigan",
        "datasets": "sslbench_plugins.datasets",
        "image_datasets": "sslbench_plugins.image_datasets",
        "metrics": "sslbench_plugins.metrics",
        "reference": "sslbench_plugins.reference_backend",
        "reporters": "sslbench_plugins.reporters",
        "torch": "sslbench_plugins.torch_backend",
        "faiss": "sslbench_plugins.faiss_backend",
        "cuml": "sslbench_plugins.cuml_backend",
        "knn": "sslbench_plugins.knn_probe",
        "label_free": "sslbench_plugins.label_free",
        "linear": "sslbench_plugins.linear_probe",
    }
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"sslbench": "sslbench.cli:main"}


@pytest.mark.skipif(os.environ.get("SSLBENCH_REQUIRE_WHEEL") != "1", reason="CI checks the wheel install")
def test_ci_tests_the_installed_wheel_not_the_checkout():
    for module in (sslbench, sslbench_plugins):
        path = Path(module.__file__).resolve()
        assert REPO not in path.parents, f"{module.__name__} imported from the checkout: {path}"
        assert "site-packages" in path.parts
    assert REPO not in registry_root().resolve().parents
