"""Plugin loading: entry points, pluggy call semantics, duplicate names, misspelled hooks, broken plugins."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import sslbench.plugins as plugins_module
from sslbench import Backbone, BackboneEntry, MetricEntry, Split, hookimpl
from sslbench.errors import PluginError, SSLBenchError, exception_line
from sslbench.extract import usable_cores
from sslbench.hookspecs import PLUGIN_KINDS
from sslbench.plugins import load_plugins

from conftest import PAPER_METRICS, run_cli

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
    assert by_name["reference"].registered == {"backend": ["reference"]}
    assert by_name["reference"].hooks == ["sslbench_register_backends"]
    assert sorted(plugins.backends.names()) == ["cuml", "faiss", "reference", "torch"]
    assert plugins.plugin_of(plugins.backends, "torch").distribution == "sslbench"
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
    version = importlib.metadata.version("sslbench")
    with pytest.raises(PluginError) as info:
        load_plugins(extra=[("mine", _metric_plugin("acc"))])
    assert str(info.value) == (
        f"metric 'acc' is registered twice: by plugin 'metrics' (distribution sslbench {version}) "
        "and by plugin 'mine'; disable one with SSLBENCH_DISABLE_PLUGINS=sslbench:metrics"
    )


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
        "ModuleNotFoundError: No module named 'sslbench_no_such_module_xyz'; "
        "disable it with SSLBENCH_DISABLE_PLUGINS=broken"
    ]
    assert [p.name for p in loaded.failures] == ["broken"]
    assert "raw" in loaded.backbones  # the other plugins still load


def test_disable_env_skips_a_plugin(monkeypatch):
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "basic_backbones, reporters")
    loaded = load_plugins()
    assert "raw" not in loaded.backbones
    assert not [
        name for name in loaded.reporters.names() if loaded.plugin_of(loaded.reporters, name).name == "reporters"
    ]
    assert "rich" not in loaded.reporters and "digits" in loaded.datasets


def test_unknown_name_lists_known_ones(plugins):
    with pytest.raises(SSLBenchError, match="unknown backbone 'random_cn' \\(did you mean 'random_cnn'\\?\\); known: "):
        plugins.backbones.get("random_cn")


def test_backbone_entries_build_and_match_declared_dims(plugins):
    """Every registered backbone that builds with its default options and has no model card yields
    features of its declared dimension (card backbones: tests/test_zoo.py, with random weights; the
    generic timm/hub/python backbones, which need a model named: tests/test_generic_backbones.py)."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    built = 0
    for entry in plugins.backbones:
        if entry.card is not None or any(field.is_required() for field in entry.options.model_fields.values()):
            continue
        built += 1
        backbone = entry.factory(entry.options())
        batch = torch.stack([backbone.preprocess(image), backbone.preprocess(image)])
        features = backbone.embed(batch)
        assert features.shape[0] == 2
        if entry.feature_dim is not None:
            assert features.shape[1] == entry.feature_dim == backbone.feature_dim, entry.name
        assert isinstance(entry, BackboneEntry)
    assert built >= 2  # raw and random_cnn at least


# ------------------------------------------------------------------------------------------------
# Hooks are called through pluggy: wrappers run, tryfirst/trylast order the plugins.


def test_wrapper_implementation_runs_around_its_plugins_hook():
    calls: list[str] = []

    @hookimpl
    def sslbench_register_metrics(register):
        calls.append("impl")
        register(MetricEntry("inner", lambda ctx: 0.0, "inner", "test metric"))

    @hookimpl(wrapper=True, specname="sslbench_register_metrics")
    def wrap_metrics(register):
        calls.append("before")
        register(MetricEntry("from_wrapper", lambda ctx: 0.0, "from_wrapper", "test metric"))
        result = yield
        calls.append("after")
        return result

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics, wrap_metrics=wrap_metrics)
    loaded = load_plugins(entry_points=False, extra=[("wrapped", plugin), ("other", _metric_plugin("zero"))])
    assert calls == ["before", "impl", "after"]
    assert loaded.metrics.names() == ["from_wrapper", "inner", "zero"]
    assert loaded.metrics.origin("from_wrapper") == "wrapped"
    assert loaded.metrics.origin("zero") == "other"


def test_old_style_hookwrapper_runs_and_sees_the_outcome():
    outcomes: list[object] = []

    @hookimpl
    def sslbench_register_metrics(register):
        register(MetricEntry("inner", lambda ctx: 0.0, "inner", "test metric"))

    @hookimpl(hookwrapper=True, specname="sslbench_register_metrics")
    def watch(register):
        outcome = yield
        outcomes.append(outcome.exception)

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics, watch=watch)
    loaded = load_plugins(entry_points=False, extra=[("watched", plugin)])
    assert outcomes == [None]
    assert loaded.metrics.names() == ["inner"]


def _ordered_plugin(name: str, calls: list[str], **opts: bool) -> types.SimpleNamespace:
    @hookimpl(**opts)
    def sslbench_register_metrics(register):
        calls.append(name)
        register(MetricEntry(name, lambda ctx: 0.0, name, "test metric"))

    return types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)


def test_tryfirst_and_trylast_order_the_plugins():
    calls: list[str] = []
    loaded = load_plugins(
        entry_points=False,
        extra=[
            ("last", _ordered_plugin("last", calls, trylast=True)),
            ("plain_a", _ordered_plugin("plain_a", calls)),
            ("first", _ordered_plugin("first", calls, tryfirst=True)),
            ("plain_b", _ordered_plugin("plain_b", calls)),
        ],
    )
    assert calls == ["first", "plain_a", "plain_b", "last"]
    assert loaded.metrics.names() == calls


def test_plugins_without_order_marks_register_in_load_order():
    calls: list[str] = []
    names = ["zeta", "alpha", "mu"]
    loaded = load_plugins(entry_points=False, extra=[(n, _ordered_plugin(n, calls)) for n in names])
    assert calls == names
    assert loaded.metrics.names() == names


def test_trace_receives_pluggy_hook_calls():
    lines: list[str] = []
    load_plugins(entry_points=False, extra=[("mine", _metric_plugin("zero"))], trace=lines.append)
    assert any("sslbench_register_metrics" in line for line in lines)
    assert any("finish" in line for line in lines)


# ------------------------------------------------------------------------------------------------
# One-line errors for broken hook implementations.


@given(st.text())
def test_an_exception_is_told_in_one_line_with_its_whole_message(message):
    line = exception_line(ValueError(message))
    assert len(line.splitlines()) == 1  # as the CLI prints it: nothing past a line break is lost
    # Every visible character of the message is kept, in order (only line breaks and the spaces
    # around them give way to " / ").
    visible = [ch for ch in message if not ch.isspace()]
    assert [ch for ch in line.removeprefix("ValueError").removeprefix(": ") if not ch.isspace() and ch != "/"] == [
        ch for ch in visible if ch != "/"
    ]


def test_misspelled_hook_argument_is_a_one_line_error():
    @hookimpl
    def sslbench_register_backbones(regster):
        pass

    plugin = types.SimpleNamespace(sslbench_register_backbones=sslbench_register_backbones)
    with pytest.raises(PluginError) as info:
        load_plugins(entry_points=False, extra=[("typo", plugin)])
    assert str(info.value) == (
        "plugin 'typo' implements hook 'sslbench_register_backbones' with unknown argument 'regster' "
        "(did you mean 'register'?); the hook's arguments are: register"
    )


def test_wrapper_that_is_not_a_generator_is_a_one_line_error():
    @hookimpl(wrapper=True)
    def sslbench_register_metrics(register):
        pass

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)
    with pytest.raises(PluginError, match=r"^plugin 'nogen' has an invalid hook implementation: .*generator") as info:
        load_plugins(entry_points=False, extra=[("nogen", plugin)])
    assert "\n" not in str(info.value)


def test_exception_in_a_hook_is_a_one_line_error():
    @hookimpl
    def sslbench_register_metrics(register):
        raise RuntimeError("metric table missing\nsecond line of detail")

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)
    with pytest.raises(PluginError) as info:
        load_plugins(entry_points=False, extra=[("raiser", plugin)])
    # The message kept whole, its lines joined.
    assert str(info.value) == (
        "plugin 'raiser' raised an exception in hook 'sslbench_register_metrics': "
        "RuntimeError: metric table missing / second line of detail"
    )
    assert isinstance(info.value.__cause__, RuntimeError)


def test_duplicate_swallowed_by_the_plugin_still_fails():
    @hookimpl
    def sslbench_register_metrics(register):
        with contextlib.suppress(PluginError):
            register(MetricEntry("zero", lambda ctx: 0.0, "zero", "test metric"))

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)
    with pytest.raises(PluginError, match="metric 'zero' is registered twice: by plugin 'first' and by plugin 'sly'"):
        load_plugins(entry_points=False, extra=[("first", _metric_plugin("zero")), ("sly", plugin)])


def test_register_after_the_hook_returned_is_an_error():
    kept: list[object] = []

    @hookimpl
    def sslbench_register_metrics(register):
        kept.append(register)

    plugin = types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics)
    loaded = load_plugins(entry_points=False, extra=[("late", plugin)])
    with pytest.raises(PluginError, match="plugin 'late' called register after its hook"):
        kept[0](MetricEntry("zero", lambda ctx: 0.0, "zero", "test metric"))  # type: ignore[operator]
    assert "zero" not in loaded.metrics


def test_extra_plugin_name_taken_by_an_entry_point_is_an_error():
    version = importlib.metadata.version("sslbench")
    with pytest.raises(PluginError) as info:
        load_plugins(extra=[("metrics", _metric_plugin("zero"))])
    assert str(info.value) == (
        "plugin name 'metrics' of a plugin passed to load_plugins(extra=...) is already taken by "
        f"plugin 'metrics' (distribution sslbench {version}); rename it, or disable that one with "
        "SSLBENCH_DISABLE_PLUGINS=sslbench:metrics"
    )


# ------------------------------------------------------------------------------------------------
# Installed distributions: fake ones are written as <name>-<version>.dist-info folders on sys.path,
# where importlib.metadata finds their entry points exactly as it finds a pip-installed plugin's.


@pytest.fixture()
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """``install(dist, version, {entry point: module}, {module: source})`` for the test's duration; it
    returns the folder on sys.path that holds the modules and ``.dist-info`` folders."""
    site = tmp_path / "site"
    site.mkdir()
    modules: list[str] = []

    def install_(dist: str, version: str, entry_points: dict[str, str], sources: dict[str, str]) -> Path:
        dist_info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        declared = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (dist_info / "entry_points.txt").write_text(f"[sslbench]\n{declared}")
        for module, source in sources.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            modules.append(module)
        return site

    monkeypatch.syspath_prepend(str(site))
    yield install_
    for module in modules:
        sys.modules.pop(module, None)


_BACKBONE_PLUGIN = """
    from sslbench import BackboneEntry, hookimpl

    IMPORTED = True

    @hookimpl
    def sslbench_register_backbones(register):
        register(BackboneEntry(name="shared_net", factory=lambda options: None, family="test", description="fake"))
"""


def test_same_entry_point_name_in_two_distributions_names_both(install):
    install("alpha-plugins", "1.0", {"shared": "alpha_shared_mod"}, {"alpha_shared_mod": _BACKBONE_PLUGIN})
    install("beta-plugins", "2.5", {"shared": "beta_shared_mod"}, {"beta_shared_mod": _BACKBONE_PLUGIN})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    message = (
        "plugin name 'shared' is declared by 2 entry points of group 'sslbench': "
        "alpha-plugins 1.0 (alpha_shared_mod) and beta-plugins 2.5 (beta_shared_mod); rename the entry point "
        "of one (in its pyproject's [project.entry-points.sslbench], e.g. after its package), or uninstall one, "
        "or disable one with SSLBENCH_DISABLE_PLUGINS=alpha-plugins:shared or SSLBENCH_DISABLE_PLUGINS=beta-plugins:shared"
    )
    # Which of the two is meant is not the loader's to guess: both are left out, the rest loads.
    assert lines == [
        f"plugin 'shared' (distribution alpha-plugins 1.0) is left out: {message}",
        f"plugin 'shared' (distribution beta-plugins 2.5) is left out: {message}",
    ]
    assert [(p.distribution, p.failure) for p in loaded.failures] == [
        ("alpha-plugins", f"left out: {message}"),
        ("beta-plugins", f"left out: {message}"),
    ]
    assert "raw" in loaded.backbones and "acc" in loaded.metrics
    # Rejected before anything was imported: neither plugin ran any code.
    assert "alpha_shared_mod" not in sys.modules
    assert "beta_shared_mod" not in sys.modules


def test_disabling_one_distributions_entry_point_keeps_the_other(install, monkeypatch):
    install("alpha-plugins", "1.0", {"shared": "alpha_keep_mod"}, {"alpha_keep_mod": _BACKBONE_PLUGIN})
    install("beta-plugins", "2.5", {"shared": "beta_drop_mod"}, {"beta_drop_mod": _BACKBONE_PLUGIN})
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "Beta_Plugins:shared")  # compared as pip compares names
    loaded = load_plugins()
    assert loaded.plugin_of(loaded.backbones, "shared_net").distribution == "alpha-plugins"
    assert "beta_drop_mod" not in sys.modules


def test_third_party_entry_point_named_like_a_builtin_is_left_out(install, monkeypatch):
    install("evil-metrics", "6.6.6", {"metrics": "evil_metrics_mod"}, {"evil_metrics_mod": _BACKBONE_PLUGIN})
    version = importlib.metadata.version("sslbench")
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    message = (
        "plugin name 'metrics' is declared by 2 entry points of group 'sslbench': "
        f"evil-metrics 6.6.6 (evil_metrics_mod) and sslbench {version} (sslbench_plugins.metrics); "
        "'metrics' is a built-in plugin's name: rename the entry point of evil-metrics 6.6.6 (in its pyproject's "
        "[project.entry-points.sslbench], e.g. after its package), "
        "or disable it with SSLBENCH_DISABLE_PLUGINS=evil-metrics:metrics"
    )
    assert lines == [f"plugin 'metrics' (distribution evil-metrics 6.6.6) is left out: {message}"]
    [failure] = loaded.failures
    assert (failure.distribution, failure.failure) == ("evil-metrics", f"left out: {message}")
    # The built-in keeps its name and everything it registers, attributed to it.
    assert "acc" in loaded.metrics and loaded.plugin_of(loaded.metrics, "acc").distribution == "sslbench"
    assert "evil_metrics_mod" not in sys.modules

    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "evil-metrics:metrics")
    loaded = load_plugins()
    assert loaded.plugin_of(loaded.metrics, "acc").distribution == "sslbench"
    assert "shared_net" not in loaded.backbones


def test_plain_name_disables_every_distributions_entry_point(install, monkeypatch):
    install("evil-metrics", "6.6.6", {"metrics": "evil_plain_mod"}, {"evil_plain_mod": _BACKBONE_PLUGIN})
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "metrics")
    loaded = load_plugins()
    assert "metrics" not in {p.name for p in loaded.plugins}
    assert not PAPER_METRICS & set(loaded.metrics.names())
    assert "shared_net" not in loaded.backbones


def test_distribution_wildcard_disables_all_its_entry_points(install, monkeypatch):
    install(
        "many-plugins",
        "0.3",
        {"many_a": "many_a_mod", "many_b": "many_b_mod"},
        {"many_a_mod": _BACKBONE_PLUGIN, "many_b_mod": "raise ImportError('must not be imported')"},
    )
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "many-plugins:*")
    loaded = load_plugins(warn=pytest.fail)
    assert not {"many_a", "many_b"} & {p.name for p in loaded.plugins}
    assert "raw" in loaded.backbones


@pytest.mark.parametrize("item", [":metrics", "sslbench:", "a:b:c"])
def test_malformed_disable_item_is_an_error(monkeypatch, item):
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", f"reporters,{item}")
    with pytest.raises(PluginError, match=f"SSLBENCH_DISABLE_PLUGINS: cannot read '{item}'; expected NAME"):
        load_plugins()


def test_duplicate_registration_across_distributions_names_both(install):
    install("alpha-nets", "1.0", {"alpha_nets": "alpha_nets_mod"}, {"alpha_nets_mod": _BACKBONE_PLUGIN})
    install("beta-nets", "2.0", {"beta_nets": "beta_nets_mod"}, {"beta_nets_mod": _BACKBONE_PLUGIN})
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert str(info.value) == (
        "backbone 'shared_net' is registered twice: by plugin 'alpha_nets' (distribution alpha-nets 1.0) "
        "and by plugin 'beta_nets' (distribution beta-nets 2.0); disable one with "
        "SSLBENCH_DISABLE_PLUGINS=alpha-nets:alpha_nets or SSLBENCH_DISABLE_PLUGINS=beta-nets:beta_nets"
    )


def test_misspelled_hook_argument_names_the_distribution(install):
    source = """
        from sslbench import hookimpl

        @hookimpl
        def sslbench_register_datasets(regster):
            pass
    """
    install("typo-plugin", "0.1", {"typo": "typo_arg_mod"}, {"typo_arg_mod": source})
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert str(info.value) == (
        "plugin 'typo' (distribution typo-plugin 0.1) implements hook 'sslbench_register_datasets' with unknown "
        "argument 'regster' (did you mean 'register'?); the hook's arguments are: register; "
        "disable it with SSLBENCH_DISABLE_PLUGINS=typo-plugin:typo"
    )


def test_misspelled_hook_name_names_the_distribution(install):
    source = """
        from sslbench import hookimpl

        @hookimpl
        def sslbench_register_dataset(register):
            pass
    """
    install("typo-plugin", "0.2", {"typo": "typo_name_mod"}, {"typo_name_mod": source})
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert str(info.value) == (
        "plugin 'typo' (distribution typo-plugin 0.2) implements unknown hook 'sslbench_register_dataset' "
        "(did you mean 'sslbench_register_datasets'?); disable it with SSLBENCH_DISABLE_PLUGINS=typo-plugin:typo"
    )


def test_exception_in_an_installed_plugins_hook_disables_it_with_one_warning(install, monkeypatch):
    source = """
        from sslbench import hookimpl

        @hookimpl
        def sslbench_register_metrics(register):
            raise KeyError("no such table")
    """
    install("flaky-metrics", "3.1", {"flaky": "flaky_hook_mod"}, {"flaky_hook_mod": source})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'flaky' (distribution flaky-metrics 3.1) failed to load: hook 'sslbench_register_metrics' "
        "raised KeyError: 'no such table'; disable it with SSLBENCH_DISABLE_PLUGINS=flaky-metrics:flaky"
    ]
    [failure] = loaded.failures
    assert (failure.name, failure.stage, failure.error) == (
        "flaky",
        "registration",
        "hook 'sslbench_register_metrics' raised KeyError: 'no such table'",
    )
    # Everything else is exactly what it is without the plugin.
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "flaky-metrics:flaky")
    without = load_plugins(warn=pytest.fail)
    for kind in (k.attribute for k in PLUGIN_KINDS):
        assert getattr(loaded, kind).names() == getattr(without, kind).names(), kind


def test_builtin_whose_hook_raises_is_an_error(monkeypatch):
    """A built-in is never disabled quietly: its failure is an error, as a failed import is."""
    real_load = plugins_module._load_entry_point

    @hookimpl
    def sslbench_register_reporters(register):
        raise RuntimeError("template folder missing")

    def load(ep: importlib.metadata.EntryPoint) -> object:
        if ep.name == "reporters" and ep.dist is not None and ep.dist.name == "sslbench":
            return types.SimpleNamespace(sslbench_register_reporters=sslbench_register_reporters)
        return real_load(ep)

    monkeypatch.setattr(plugins_module, "_load_entry_point", load)
    version = importlib.metadata.version("sslbench")
    with pytest.raises(PluginError) as info:
        load_plugins(warn=pytest.fail)
    assert str(info.value) == (
        f"plugin 'reporters' (distribution sslbench {version}) raised an exception in hook "
        "'sslbench_register_reporters': RuntimeError: template folder missing; "
        "disable it with SSLBENCH_DISABLE_PLUGINS=sslbench:reporters"
    )


_HALF_PLUGIN = """
    from sslbench import Backbone, BackboneEntry, MetricEntry, Split, hookimpl

    @hookimpl
    def sslbench_register_backbones(register):
        for name in ("half_net_a", "half_net_b"):
            register(BackboneEntry(name=name, factory=lambda options: None, family="test", description="fake"))

    @hookimpl
    def sslbench_register_metrics(register):
        register(MetricEntry("half_metric", lambda ctx: 0.0, "half", "registered before the failure"))
        raise OSError("metric table not found\\nlooked in /nowhere")
"""


def test_a_plugin_failing_in_a_later_hook_is_withdrawn_from_every_registry(install, monkeypatch):
    install("half-plugin", "1.0", {"half": "half_plugin_mod"}, {"half_plugin_mod": _HALF_PLUGIN})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert len(lines) == 1
    reason = "hook 'sslbench_register_metrics' raised OSError: metric table not found / looked in /nowhere"
    [failure] = loaded.failures
    assert failure.error == reason
    assert failure.registered == {}
    assert failure.would_register == {"backbone": ["half_net_a", "half_net_b"], "metric": ["half_metric"]}
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "half")
    without = load_plugins(warn=pytest.fail)
    for kind in (k.attribute for k in PLUGIN_KINDS):
        assert getattr(loaded, kind).names() == getattr(without, kind).names(), kind

    provider = "plugin 'half' (distribution half-plugin 1.0)"
    with pytest.raises(SSLBenchError) as info:
        loaded.backbones.get("half_net_b")
    assert str(info.value) == f"backbone 'half_net_b' is provided by {provider}, which failed to load: {reason}"
    with pytest.raises(SSLBenchError) as info:
        loaded.metrics.get("half_metric")
    assert str(info.value) == f"metric 'half_metric' is provided by {provider}, which failed to load: {reason}"
    # A name nobody provides still tells of the failure: it may be the reason.
    with pytest.raises(SSLBenchError) as info:
        loaded.datasets.get("half_data")
    assert str(info.value).startswith(
        f"unknown dataset 'half_data'; note: {provider} failed to load: {reason}; known: "
    )


def test_an_optional_model_of_a_failed_plugin_is_skipped_with_the_reason(install, tmp_path):
    from sslbench.progress import NullProgress
    from sslbench.runner import model_features, plan_run
    from sslbench.spec import parse_spec, resolve_spec

    install("half-plugin", "1.0", {"half": "half_optional_mod"}, {"half_optional_mod": _HALF_PLUGIN})
    loaded = load_plugins(warn=lambda line: None)
    spec = parse_spec(
        "models:\n  - id: half_net_a\n    optional: true\ndatasets:\n  - id: digits\ndevice: cpu\n", "opt.yaml"
    )
    plan = plan_run(resolve_spec(spec, loaded), loaded, "cpu")
    notes: list[str] = []
    features = model_features(
        plan, use_cache=False, scratch=tmp_path, progress=NullProgress(), emit=lambda event: notes.append(event.text)
    )
    assert list(features) == []
    assert notes[-1] == (
        "optional model half_net_a skipped: backbone 'half_net_a' is provided by plugin 'half' (distribution "
        "half-plugin 1.0), which failed to load: hook 'sslbench_register_metrics' raised OSError: "
        "metric table not found / looked in /nowhere"
    )


def test_an_unusable_entry_disables_an_installed_plugin(install):
    source = """
        from sslbench import MetricEntry, hookimpl

        @hookimpl
        def sslbench_register_backbones(register):
            register(MetricEntry("m", lambda ctx: 0.0, "m", "not a backbone"))
    """
    install("mixed-up", "1.1", {"mixed": "mixed_type_mod"}, {"mixed_type_mod": source})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'mixed' (distribution mixed-up 1.1) failed to load: hook 'sslbench_register_backbones' "
        "registered a MetricEntry as a backbone; expected BackboneEntry; "
        "disable it with SSLBENCH_DISABLE_PLUGINS=mixed-up:mixed"
    ]
    assert [p.name for p in loaded.failures] == ["mixed"]
    assert "m" not in loaded.metrics


def test_a_plugin_registering_one_name_twice_is_disabled(install):
    source = """
        from sslbench import MetricEntry, hookimpl

        @hookimpl
        def sslbench_register_metrics(register):
            for _ in range(2):
                register(MetricEntry("twice", lambda ctx: 0.0, "twice", "registered twice"))
    """
    install("stutter", "0.1", {"stutter": "stutter_mod"}, {"stutter_mod": source})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'stutter' (distribution stutter 0.1) failed to load: hook 'sslbench_register_metrics' "
        "registered metric 'twice' twice; disable it with SSLBENCH_DISABLE_PLUGINS=stutter:stutter"
    ]
    assert "twice" not in loaded.metrics


def test_a_name_clash_between_two_third_party_plugins_is_still_an_error(install):
    """Which of two third-party plugins a spec means is not the loader's to guess: a clash is not a failure of one."""
    source = """
        from sslbench import BackboneEntry, hookimpl

        @hookimpl
        def sslbench_register_backbones(register):
            register(BackboneEntry(name="mine", factory=lambda options: None, family="test", description="clash"))
    """
    install("clashing-a", "1.0", {"clashing_a": "clashing_a_mod"}, {"clashing_a_mod": source})
    install("clashing-b", "1.0", {"clashing_b": "clashing_b_mod"}, {"clashing_b_mod": source})
    with pytest.raises(PluginError, match="backbone 'mine' is registered twice: by plugin 'clashing_a'"):
        load_plugins(warn=pytest.fail)


@pytest.mark.parametrize("entry_point", ["aaa_first", "zzz_last"])
def test_a_third_party_plugin_registering_a_builtin_name_is_disabled(install, entry_point):
    """A built-in's name is taken for good, whichever registers first (entry points load sorted by name):
    the third party is disabled as a whole, with one warning, and the built-in's entry stays."""
    source = """
        from sslbench import BackboneEntry, MetricEntry, hookimpl

        @hookimpl
        def sslbench_register_backbones(register):
            register(BackboneEntry(name="mine", factory=lambda options: None, family="test", description="own"))

        @hookimpl
        def sslbench_register_metrics(register):
            register(MetricEntry("acc", lambda ctx: 0.0, "ACC", "a clash"))
    """
    install("clashing", "1.0", {entry_point: "clashing_mod"}, {"clashing_mod": source})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    [line] = lines
    assert line.startswith(f"plugin '{entry_point}' (distribution clashing 1.0) failed to load: ")
    assert "registered metric 'acc', which built-in plugin 'metrics' (distribution sslbench" in line
    assert line.endswith(f"; rename it; disable it with SSLBENCH_DISABLE_PLUGINS=clashing:{entry_point}")
    assert loaded.plugin_of(loaded.metrics, "acc").name == "metrics"
    assert "mine" not in loaded.backbones  # withdrawn with the rest of the plugin
    [failure] = loaded.failures
    assert failure.would_register["backbone"] == ["mine"]


def test_third_party_import_failure_warns_naming_the_distribution(install):
    install("broken-dist", "0.9", {"broken": "broken_import_mod"}, {"broken_import_mod": "import sslbench_nope_xyz\n"})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'broken' (distribution broken-dist 0.9) failed to import: "
        "ModuleNotFoundError: No module named 'sslbench_nope_xyz'; "
        "disable it with SSLBENCH_DISABLE_PLUGINS=broken-dist:broken"
    ]
    [failure] = loaded.failures
    assert (failure.name, failure.distribution, failure.version) == ("broken", "broken-dist", "0.9")
    assert failure.error == "ModuleNotFoundError: No module named 'sslbench_nope_xyz'"
    assert "acc" in loaded.metrics
    # What it would have provided is unknown: every unknown name mentions it.
    with pytest.raises(SSLBenchError) as info:
        loaded.metrics.get("broken_metric")
    assert str(info.value).startswith(
        "unknown metric 'broken_metric'; note: plugin 'broken' (distribution broken-dist 0.9) failed to import: "
        "ModuleNotFoundError: No module named 'sslbench_nope_xyz'; known: "
    )


def test_builtin_that_fails_to_import_is_an_error(monkeypatch):
    real_load = plugins_module._load_entry_point

    def load(ep: importlib.metadata.EntryPoint) -> object:
        if ep.name == "torch" and ep.dist is not None and ep.dist.name == "sslbench":
            raise ImportError("cannot import name 'BackendEntry' from 'sslbench.interfaces'")
        return real_load(ep)

    monkeypatch.setattr(plugins_module, "_load_entry_point", load)
    version = importlib.metadata.version("sslbench")
    lines: list[str] = []
    with pytest.raises(PluginError) as info:
        load_plugins(warn=lines.append)
    assert str(info.value) == (
        f"built-in plugin 'torch' (distribution sslbench {version}) failed to import: "
        "ImportError: cannot import name 'BackendEntry' from 'sslbench.interfaces'; "
        "reinstall sslbench to repair it, or disable it with SSLBENCH_DISABLE_PLUGINS=sslbench:torch"
    )
    assert lines == []

    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "sslbench:torch")
    assert "torch" not in load_plugins().backends


# ------------------------------------------------------------------------------------------------
# A plugin shipping model cards, one of them malformed.

_GOOD_CARD = """\
  - id: resnet18.tiny_good
    family: tiny
    description: a good card
    architecture: {source: timm, name: resnet18}
    weights: [{kind: url, url: "https://example.invalid/w.pth"}]
    hash: {kind: none}
    feature: {dim: 512}
    preprocessing: {resize: 256, crop: 224, interpolation: bilinear, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    license: MIT
"""

_BAD_CARD = """\
  - id: resnet18.tiny_bad
    family: tiny
    description: a card with three mistakes
    architecture:
      source: timm
      nmae: resnet18
    weights: [{kind: url, url: "https://example.invalid/w.pth"}]
    hash: {kind: none}
    feature: {dim: 0}
    preprocesing: {resize: 256, crop: 224, interpolation: bilinear, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}
    license: MIT
"""

_CARD_PLUGIN = """
    from pathlib import Path

    from sslbench import hookimpl

    @hookimpl
    def sslbench_register_backbones(register):
        from sslbench_plugins.pytorch_zoo import card_backbones

        for entry in card_backbones(Path(__file__).parent / "tiny_cards"):
            register(entry)
"""


def _card_folder(site: Path) -> Path:
    """``tiny_cards/``: a valid file of one card, and a file of a valid card and one with four mistakes."""
    folder = site / "tiny_cards"
    folder.mkdir()
    (folder / "a.yaml").write_text("family: tiny\ncards:\n" + _GOOD_CARD.replace("tiny_good", "tiny_other"))
    (folder / "b.yaml").write_text("family: tiny\ncards:\n" + _GOOD_CARD + _BAD_CARD)
    return folder


def _line_of(path: Path, text: str, after: int = 0) -> int:
    """The first 1-based line past ``after`` of ``path`` that holds ``text`` (read as text, not YAML)."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if n > after and text in line)


def test_every_card_schema_error_is_listed_with_its_line_and_did_you_mean(tmp_path):
    """Every error once: a misspelled key is its did-you-mean alone, not also the required key it was meant to be."""
    from sslbench.cards import cards_from
    from sslbench.errors import CardError

    folder = _card_folder(tmp_path)
    b = folder / "b.yaml"
    with pytest.raises(CardError) as info:
        cards_from(folder)
    card_fields = "id, family, loader, version, description, architecture, weights, hash, layout, feature, "
    card_fields += "preprocessing, linear_top1, knn_top1, paper, license, notes"
    assert str(info.value) == (
        f"{b}:{_line_of(b, 'nmae')}: cards[1].architecture.nmae: unknown key (did you mean 'name'?); "
        "allowed: source, name, args, num_classes; "
        f"{b}:{_line_of(b, 'dim: 0')}: cards[1].feature.dim: Input should be greater than or equal to 1 (got 0); "
        f"{b}:{_line_of(b, 'preprocesing')}: cards[1].preprocesing: unknown key (did you mean 'preprocessing'?); "
        f"allowed: {card_fields}"
    )
    # The ids of the whole folder, read from the files: the cards that will be missing.
    assert info.value.card_ids == ("resnet18.tiny_good", "resnet18.tiny_bad", "resnet18.tiny_other")


def test_card_mappings_in_code_list_every_error_of_every_card():
    from sslbench.cards import cards_from
    from sslbench.errors import CardError

    good = yaml.safe_load(_GOOD_CARD)[0]
    typo = {**good, "id": "resnet18.typo", "licence": "MIT"}
    del typo["license"]
    wide = {**good, "id": "resnet18.wide", "feature": {"dim": -1}}
    with pytest.raises(CardError) as info:
        cards_from([good, typo, wide], where="my_cards")
    assert str(info.value) == (
        "my_cards[1]: licence: unknown key (did you mean 'license'?); allowed: id, family, loader, version, "
        "description, architecture, weights, hash, layout, feature, preprocessing, linear_top1, knn_top1, paper, "
        "license, notes; "
        "my_cards[2]: feature.dim: Input should be greater than or equal to 1 (got -1)"
    )
    assert info.value.card_ids == ("resnet18.tiny_good", "resnet18.typo", "resnet18.wide")


def test_a_card_plugin_with_a_malformed_card_is_disabled_and_its_ids_named(install):
    site = install("tiny-cards", "2.0", {"tiny": "tiny_cards_mod"}, {"tiny_cards_mod": _CARD_PLUGIN})
    _card_folder(site)
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    [line] = lines
    assert line.startswith(
        "plugin 'tiny' (distribution tiny-cards 2.0) failed to load: hook 'sslbench_register_backbones' "
        f"raised CardError: {site / 'tiny_cards' / 'b.yaml'}:"
    )
    assert line.endswith("; disable it with SSLBENCH_DISABLE_PLUGINS=tiny-cards:tiny")
    [failure] = loaded.failures
    assert failure.would_register == {"backbone": ["resnet18.tiny_good", "resnet18.tiny_bad", "resnet18.tiny_other"]}
    assert not {"resnet18.tiny_good", "resnet18.tiny_other"} & set(loaded.backbones.names())
    with pytest.raises(SSLBenchError) as info:
        loaded.backbones.get("resnet18.tiny_other")  # in the valid file, but the plugin registered nothing
    assert str(info.value).startswith(
        "backbone 'resnet18.tiny_other' is provided by plugin 'tiny' (distribution tiny-cards 2.0), "
        "which failed to load: hook 'sslbench_register_backbones' raised CardError: "
    )


# ------------------------------------------------------------------------------------------------
# A function named like a hook without @hookimpl.


def test_a_hook_function_without_hookimpl_is_warned_about(install):
    source = """
        from sslbench import BackboneEntry, hookimpl

        def sslbench_register_backbones(register):  # the marker forgotten
            register(BackboneEntry(name="never_seen", factory=lambda options: None, family="t", description="x"))

        def sslbench_register_metric(register):  # misspelled, and no marker either
            pass

        @hookimpl
        def sslbench_register_datasets(register):
            pass

        def helper():
            pass
    """
    install("forgetful", "0.5", {"forgetful": "forgetful_mod"}, {"forgetful_mod": source})
    lines: list[str] = []
    loaded = load_plugins(warn=lines.append)
    label = "plugin 'forgetful' (distribution forgetful 0.5)"
    assert lines == [
        f"{label} defines sslbench_register_backbones() without @hookimpl, so sslbench never calls it; "
        "decorate it: `from sslbench import hookimpl`, then `@hookimpl` above `def sslbench_register_backbones`",
        f"{label} defines sslbench_register_metric() (did you mean 'sslbench_register_metrics'?) without "
        "@hookimpl, so sslbench never calls it; decorate it: `from sslbench import hookimpl`, then `@hookimpl` "
        "above `def sslbench_register_metric`",
    ]
    assert "never_seen" not in loaded.backbones
    assert [p.hooks for p in loaded.plugins if p.name == "forgetful"] == [["sslbench_register_datasets"]]


# ------------------------------------------------------------------------------------------------
# The CLI with a broken third-party plugin installed: real subprocesses, real exit statuses.


def _cli_env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))}


def test_cli_lists_a_broken_plugin_and_names_it_for_a_spec(install, tmp_path):
    site = install("tiny-cards", "2.0", {"tiny": "tiny_cards_cli_mod"}, {"tiny_cards_cli_mod": _CARD_PLUGIN})
    _card_folder(site)
    env = _cli_env(site)

    listed = run_cli("plugins", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    [warning] = listed.stderr.splitlines()
    assert warning.startswith("sslbench: warning: plugin 'tiny' (distribution tiny-cards 2.0) failed to load: ")
    by_name = {p["name"]: p for p in json.loads(listed.stdout)}
    assert by_name["tiny"]["stage"] == "registration"
    assert by_name["tiny"]["error"].startswith("hook 'sslbench_register_backbones' raised CardError: ")
    assert "feature.dim: Input should be greater than or equal to 1 (got 0)" in by_name["tiny"]["error"]
    assert "raw" in by_name["basic_backbones"]["registered"]["backbone"]  # the others loaded

    table = run_cli("plugins", cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    assert "failed to load: hook" in table.stdout
    assert "would register backbone: resnet18.tiny_good" in table.stdout

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - id: raw\n  - id: resnet18.tiny_bad\ndatasets:\n  - id: digits\ndevice: cpu\n")
    checked = run_cli("validate", str(spec), cwd=tmp_path, env=env)
    assert checked.returncode == 2
    last = checked.stderr.splitlines()[-1]
    assert last.startswith(
        f"sslbench: error: {spec}:3: models[1].id: backbone 'resnet18.tiny_bad' is provided by plugin 'tiny' "
        "(distribution tiny-cards 2.0), which failed to load: hook 'sslbench_register_backbones' raised CardError: "
    )
    assert "Traceback" not in checked.stderr

    spec.write_text("models:\n  - id: resnet18.tiny_nowhere\ndatasets:\n  - id: digits\ndevice: cpu\n")
    checked = run_cli("validate", str(spec), cwd=tmp_path, env=env)
    assert checked.returncode == 2
    assert checked.stderr.splitlines()[-1].startswith(
        f"sslbench: error: {spec}:2: models[0].id: unknown backbone 'resnet18.tiny_nowhere'; note: plugin 'tiny' "
        "(distribution tiny-cards 2.0) failed to load: hook 'sslbench_register_backbones' raised CardError: "
    )


# ------------------------------------------------------------------------------------------------
# A backbone plugin whose code fails during extraction: the failure names its plugin and distribution.

_FAULTY_BACKBONE = """
    import numpy as np
    import torch
    from pydantic import BaseModel, ConfigDict

    from sslbench import Backbone, BackboneEntry, hookimpl


    class FaultOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        fault: str


    class Faulty(Backbone):
        feature_dim = 4

        def __init__(self, options):
            self.fault = options.fault

        def preprocess(self, sample):
            if self.fault == "preprocess":
                from torch.utils.data import get_worker_info

                worker = get_worker_info() is not None
                raise ValueError(f"cannot take this sample (in a worker: {worker})\\nits mode is 'L'")
            return torch.as_tensor(np.asarray(sample, dtype=np.float32)).flatten()[:4]

        def embed(self, batch):
            if self.fault == "dims":
                return torch.cat([batch, batch[:, :2]], dim=1)
            return batch


    @hookimpl
    def sslbench_register_backbones(register):
        register(BackboneEntry("faulty_net", Faulty, "test", "fails on purpose", options=FaultOptions, feature_dim=4))
"""


def _faulty_spec(tmp_path: Path, fault: str, workers: int) -> Path:
    spec = tmp_path / f"{fault}.yaml"
    spec.write_text(
        f"models:\n  - id: faulty_net\n    options: {{fault: {fault}}}\ndatasets:\n  - id: digits\n"
        f"extraction: {{workers: {workers}, batch_size: 64}}\ndevice: cpu\n"
    )
    return spec


_FAULTY_OWNER = "backbone 'faulty_net' (plugin 'faulty' from faulty-nets 0.3)"


@pytest.mark.slow
def test_cli_names_the_plugin_whose_backbone_returns_the_wrong_width(install, tmp_path):
    site = install("faulty-nets", "0.3", {"faulty": "faulty_dims_mod"}, {"faulty_dims_mod": _FAULTY_BACKBONE})
    proc = run_cli("extract", str(_faulty_spec(tmp_path, "dims", 0)), cwd=tmp_path, env=_cli_env(site))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"sslbench: error: a plugin failed (a bug in it; traceback above): {_FAULTY_OWNER}: "
        "embed() returned 6-d features; the backbone declares feature_dim 4"
    )


@pytest.mark.slow
@pytest.mark.skipif(usable_cores() < 2, reason="a CPU extraction keeps no decode worker on one core")
def test_cli_names_the_plugin_whose_preprocess_fails_in_a_worker(install, tmp_path):
    site = install("faulty-nets", "0.3", {"faulty": "faulty_pre_mod"}, {"faulty_pre_mod": _FAULTY_BACKBONE})
    proc = run_cli("extract", str(_faulty_spec(tmp_path, "preprocess", 2)), cwd=tmp_path, env=_cli_env(site))
    assert proc.returncode == 1, proc.stderr
    # The first line whole: the exception's type and its message, its lines joined.
    assert proc.stderr.splitlines()[-1] == (
        f"sslbench: error: a plugin failed (a bug in it; traceback above): {_FAULTY_OWNER}: preprocess() raised "
        "ValueError: cannot take this sample (in a worker: True) / its mode is 'L' (on sample 0)"
    )
    # The worker's traceback is printed above it, down to the plugin's line.
    assert "faulty_pre_mod.py" in proc.stderr and "raise ValueError" in proc.stderr


class _Returns(Backbone):
    """Returns ``output`` from embed, whatever the batch."""

    feature_dim = 2

    def __init__(self, output: object) -> None:
        self.output = output

    def preprocess(self, sample):
        return torch.zeros(2)

    def embed(self, batch):
        if isinstance(self.output, BaseException):
            raise self.output
        return self.output


class _Tiny(Split):
    @property
    def labels(self):
        return np.zeros(4, dtype=np.int64)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return index


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(4x2 and 3x3)"),
            "embed() raised RuntimeError: mat1 and mat2 shapes cannot be multiplied / (4x2 and 3x3)",
        ),
        (
            torch.ones(4, 2, dtype=torch.int64),
            "embed() returned a torch.int64 tensor; expected an (n, feature_dim) float tensor",
        ),
        (
            torch.ones(4, 2, dtype=torch.complex64),
            "embed() returned a torch.complex64 tensor; expected an (n, feature_dim) float tensor",
        ),
        (
            np.ones((4, 2), dtype=np.float32),
            "embed() returned a numpy.ndarray, not a torch.Tensor; expected an (n, feature_dim) float tensor",
        ),
        (torch.ones(4, 3), "embed() returned 3-d features; the backbone declares feature_dim 2"),
        (
            torch.ones(3, 2),
            "embed() returned features of shape (3, 2) for 4 samples; expected (samples, feature_dim)",
        ),
    ],
)
def test_what_embed_does_wrong_names_the_backbones_plugin(tmp_path, output, expected):
    from sslbench.cache import CacheKey, FeatureCache
    from sslbench.errors import PluginFailure
    from sslbench.extract import ExtractionSettings, extract_split

    owner = "backbone 'b' (plugin 'p' from d 1.0)"
    settings = ExtractionSettings(batch_size=4, workers=0, amp=False, owner=owner)
    entry = FeatureCache(tmp_path / "cache").entry(CacheKey("b", {}, {}, {}, "tiny", {}, "train", "fp"))
    with pytest.raises(PluginFailure) as info:
        extract_split(_Returns(output), _Tiny(), settings=settings, device="cpu", name="b", entry=entry)
    assert str(info.value) == f"{owner}: {expected}"


class _FailsInWorkers(_Returns):
    def preprocess(self, sample):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None:
            return torch.zeros(2)  # the pool's cost probe, in this process
        raise ValueError(f"sample {sample} in worker {info.id}\nsecond line")


@pytest.mark.skipif(usable_cores() < 2, reason="a CPU extraction keeps no decode worker on one core")
def test_preprocess_failing_in_a_worker_keeps_its_message_whole(tmp_path, monkeypatch):
    from sslbench import extract
    from sslbench.cache import CacheKey, FeatureCache
    from sslbench.errors import PluginFailure
    from sslbench.extract import ExtractionSettings, extract_split

    # The pool keeps a decode worker only where the measured costs call for one; this model's are both
    # microseconds, so the choice would follow the machine's load: equal costs make one worker the fastest.
    monkeypatch.setattr(extract, "measure_costs", lambda *args: (1.0, 1.0))

    owner = "backbone 'b' (plugin 'p' from d 1.0)"
    settings = ExtractionSettings(batch_size=4, workers=1, amp=False, owner=owner)
    entry = FeatureCache(tmp_path / "cache").entry(CacheKey("b", {}, {}, {}, "tiny", {}, "train", "fp"))
    backbone = _FailsInWorkers(torch.zeros(4, 2))
    with pytest.raises(PluginFailure) as info:
        extract_split(backbone, _Tiny(), settings=settings, device="cpu", name="b", entry=entry)
    first, *traceback_lines = str(info.value).splitlines()
    assert first == f"{owner}: preprocess() raised ValueError: sample 0 in worker 0 / second line (on sample 0)"
    assert traceback_lines[0] == "Traceback (most recent call last):"
    assert any("raise ValueError" in line for line in traceback_lines)


@pytest.mark.parametrize(
    ("returns", "message"),
    [
        (KeyError("no 'purity' / in ctx"), "its function raised KeyError: \"no 'purity' / in ctx\""),
        (None, "its function returned NoneType None, not a number"),
        ("0.5", "its function returned '0.5', not a number"),
        (True, "its function returned True, not a number"),
    ],
)
def test_a_metric_that_raises_or_returns_no_number_names_its_plugin(split_blobs, returns, message):
    """The run stops with the metric and the plugin that registered it named, not with an anonymous bug."""
    from sslbench import evaluate_features
    from sslbench.errors import PluginFailure

    def fn(ctx):
        if isinstance(returns, Exception):
            raise returns
        return returns

    @hookimpl
    def sslbench_register_metrics(register):
        register(MetricEntry("broken", fn, "Broken", "fails on purpose"))

    plugins = load_plugins(
        extra=[("faulty", types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics))]
    )
    with pytest.raises(PluginFailure) as info:
        evaluate_features(*split_blobs, seeds=1, epochs=1, plugins=plugins)
    assert str(info.value) == f"metric 'broken' (plugin 'faulty' from no distribution): {message}"


def test_a_metric_returning_a_numpy_or_torch_scalar_is_recorded_as_a_float(split_blobs):
    from sslbench import evaluate_features

    @hookimpl
    def sslbench_register_metrics(register):
        register(MetricEntry("np_half", lambda ctx: np.float32(0.5), "np", "numpy scalar"))
        register(MetricEntry("torch_quarter", lambda ctx: torch.tensor(0.25), "torch", "0-d tensor"))

    plugins = load_plugins(
        extra=[("scalars", types.SimpleNamespace(sslbench_register_metrics=sslbench_register_metrics))]
    )
    results = evaluate_features(*split_blobs, seeds=1, epochs=1, plugins=plugins)
    assert results.runs[0].metrics["np_half"] == 0.5 and results.runs[0].metrics["torch_quarter"] == 0.25
