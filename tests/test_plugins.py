"""Plugin loading: entry points, pluggy call semantics, duplicate names, misspelled hooks, broken plugins."""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

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
    assert len(loaded.reporters) == 0
    assert "digits" in loaded.datasets


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
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert str(info.value) == (
        "plugin name 'shared' is declared by 2 entry points of group 'sslbench': "
        "alpha-plugins 1.0 (alpha_shared_mod) and beta-plugins 2.5 (beta_shared_mod); rename the entry point "
        "of one (in its pyproject's [project.entry-points.sslbench], e.g. after its package), or uninstall one, "
        "or disable one with SSLBENCH_DISABLE_PLUGINS=alpha-plugins:shared or SSLBENCH_DISABLE_PLUGINS=beta-plugins:shared"
    )
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


def test_third_party_entry_point_named_like_a_builtin_is_an_error(install, monkeypatch):
    install("evil-metrics", "6.6.6", {"metrics": "evil_metrics_mod"}, {"evil_metrics_mod": _BACKBONE_PLUGIN})
    version = importlib.metadata.version("sslbench")
    with pytest.raises(PluginError) as info:
        load_plugins()
    assert str(info.value) == (
        "plugin name 'metrics' is declared by 2 entry points of group 'sslbench': "
        f"evil-metrics 6.6.6 (evil_metrics_mod) and sslbench {version} (sslbench_plugins.metrics); "
        "'metrics' is a built-in plugin's name: rename the entry point of evil-metrics 6.6.6 (in its pyproject's "
        "[project.entry-points.sslbench], e.g. after its package), "
        "or disable it with SSLBENCH_DISABLE_PLUGINS=evil-metrics:metrics"
    )

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
    for kind in ("backbones", "datasets", "backends", "metrics", "reporters"):
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
    from sslbench import BackboneEntry, MetricEntry, hookimpl

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
    for kind in ("backbones", "datasets", "backends", "metrics", "reporters"):
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
    assert str(info.value).startswith("unknown dataset 'half_data'; known: ")
    assert str(info.value).endswith(f"; note: {provider} failed to load: {reason}")


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


def test_a_name_clash_with_an_installed_plugin_is_still_an_error(install):
    """Which of two plugins a spec means is not the loader's to guess: a clash is not a failure of one."""
    source = """
        from sslbench import BackboneEntry, hookimpl

        @hookimpl
        def sslbench_register_backbones(register):
            register(BackboneEntry(name="raw", factory=lambda options: None, family="test", description="clash"))
    """
    install("clashing", "1.0", {"clashing": "clashing_mod"}, {"clashing_mod": source})
    with pytest.raises(PluginError, match="backbone 'raw' is registered twice: by plugin 'basic_backbones'"):
        load_plugins(warn=pytest.fail)


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
