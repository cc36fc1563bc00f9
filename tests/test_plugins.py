"""Plugin loading: entry points, duplicate names, misspelled hooks, broken imports."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

import sslbench.plugins as plugins_module
from sslbench import BackboneEntry, MetricEntry, hookimpl
from sslbench.errors import PluginError, SSLBenchError
from sslbench.plugins import load_plugins

from conftest import PAPER_METRICS

BUILTINS = {
    "basic_backbones",
    "cuml",
    "datasets",
    "faiss",
    "image_datasets",
    "metrics",
    "pytorch_zoo",
    "reference",
    "reporters",
    "torch",
}


def test_builtins_load_through_entry_points(plugins):
    by_name = {p.name: p for p in plugins.plugins}
    assert set(by_name) >= BUILTINS
    for name in BUILTINS:
        assert by_name[name].distribution == "sslbench"
        assert by_name[name].error is None
    assert by_name["reference"].registered == {"reducer": ["reference"], "clusterer": ["reference"]}
    assert sorted(plugins.backend_names()) == ["cuml", "faiss", "reference", "torch"]
    assert set(plugins.metrics.names()) >= PAPER_METRICS
    assert plugins.backbones.origin("raw") == "basic_backbones"


def _metric_plugin(name: str) -> types.SimpleNamespace:
    @hookimpl
    def sslbench_register_metrics(register):
        register(MetricEntry(name, lambda ctx: 0.0, name, "test metric"))

    return types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)


def test_extra_plugin_registers_and_is_attributed():
    loaded = load_plugins(extra=[("mine", _metric_plugin("zero"))])
    assert "zero" in loaded.metrics
    assert loaded.metrics.origin("zero") == "mine"
    assert [p.registered for p in loaded.plugins if p.name == "mine"] == [{"metric": ["zero"]}]


def test_duplicate_name_names_both_plugins():
    with pytest.raises(PluginError, match="metric 'acc' is registered twice: by plugin 'metrics' and by plugin 'mine'"):
        load_plugins(extra=[("mine", _metric_plugin("acc"))])


def test_misspelled_hook_fails_at_start_up():
    @hookimpl
    def sslbench_register_backbone(register):  # missing the final "s"
        pass

    plugin = types.SimpleNamespace(sslbench_register_backbone=sslbench_register_backbone)
    with pytest.raises(PluginError) as info:
        load_plugins(extra=[("typo", plugin)])
    assert str(info.value) == (
        "plugin 'typo' implements unknown hook 'sslbench_register_backbone' "
        "(did you mean 'sslbench_register_backbones'?)"
    )


def test_wrong_entry_type_is_rejected():
    @hookimpl
    def sslbench_register_backbones(register):
        register(MetricEntry("m", lambda ctx: 0.0, "m", "not a backbone"))

    plugin = types.SimpleNamespace(sslbench_register_backbones=sslbench_register_backbones)
    with pytest.raises(PluginError, match="plugin 'bad' registered a MetricEntry as a backbone"):
        load_plugins(extra=[("bad", plugin)])


def test_plugin_that_fails_to_import_is_reported_in_one_line(monkeypatch):
    broken = importlib.metadata.EntryPoint("broken", "sslbench_no_such_module_xyz", "sslbench")
    real = plugins_module._entry_points()
    monkeypatch.setattr(plugins_module, "_entry_points", lambda: [*real, broken])
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'broken' (unknown distribution) failed to import: "
        "ModuleNotFoundError: No module named 'sslbench_no_such_module_xyz'"
    ]
    assert [p.name for p in loaded.failures] == ["broken"]
    assert "raw" in loaded.backbones  # the other plugins still load


def test_disable_env_skips_a_plugin(monkeypatch):
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "basic_backbones, reporters")
    loaded = load_plugins()
    assert "raw" not in loaded.backbones
    assert len(loaded.reporters) == 0
    assert "digits" in loaded.datasets


def test_unknown_name_lists_known_ones(plugins):
    with pytest.raises(SSLBenchError, match="unknown backbone 'random_cn' \\(did you mean 'random_cnn'\\?\\); known: "):
        plugins.backbones.get("random_cn")


def test_backbone_entries_build_and_match_declared_dims(plugins):
    """Every registered backbone without a model card builds and yields features of its declared
    dimension (card backbones: tests/test_zoo.py, with random weights)."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    for entry in plugins.backbones:
        if entry.card is not None:
            continue
        backbone = entry.factory(entry.options())
        batch = torch.stack([backbone.preprocess(image), backbone.preprocess(image)])
        features = backbone.embed(batch)
        assert features.shape[0] == 2
        if entry.feature_dim is not None:
            assert features.shape[1] == entry.feature_dim == backbone.feature_dim, entry.name
        assert isinstance(entry, BackboneEntry)
