"""Figures (sslbench plot): which are drawn from which results, their pixel size and formats."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from sslbench.plots import FigureSize, linear_point, linear_top1, outliers, plan_figures, plot_results, svg_figures
from sslbench.results import MetricInfo, ProbeRecord, Run, RunProtocol, Timings, build_results, environment

from conftest import run_cli

CARDS = {  # backbone id → (ACC, ARI) of a fictitious results file; linear top-1s come from the cards
    "resnet50.mocov2_pycontrast_200ep": (0.23, 0.10),
    "resnet50.swav_800ep": (0.13, 0.05),
    "resnet50.infomin_800ep": (0.33, 0.13),
    "resnext152_32x8d.infomin_200ep": (0.38, 0.16),
}


def _protocol(dims: int, clusters: int) -> RunProtocol:
    return RunProtocol(
        fit_split="train", eval_split="val", n_classes=1000, k=1000, overcluster=clusters / 1000,
        n_clusters=clusters, pca_dims=dims, whiten=False, epochs=60, batch_size=2048, backend="torch",
    )  # fmt: skip


def _results(plugins, measured=None):
    """``measured``: backbone → the linear top-1 its linear probe recorded (a fraction)."""
    runs = []
    for backbone, (acc, ari) in CARDS.items():
        for dims in (256, 512, 2048):
            for seed in range(3):
                runs.append(
                    Run(
                        model=backbone.split(".")[1], backbone=backbone, dataset="ImageNet",
                        protocol=_protocol(dims, 1000), seed=seed, n_train=10, n_eval=10,
                        metrics={"acc": acc - 0.01 * (dims == 256) + 0.002 * seed, "ari": ari + 0.001 * seed},
                        timings=Timings(extract_s=0, pca_s=0, kmeans_s=0, eval_s=0),
                    )
                )  # fmt: skip
    probes = [
        ProbeRecord(
            model=backbone.split(".")[1],
            backbone=backbone,
            dataset="ImageNet",
            probe="linear",
            options={},
            fit_split="train",
            eval_split="val",
            n_classes=1000,
            n_train=10,
            n_eval=10,
            metrics={"linear_top1": top1, "linear_top5": 0.9},
            seconds=1.0,
        )
        for backbone, top1 in (measured or {}).items()
    ]
    described = {name: MetricInfo(label=name) for name in ("acc", "ari", "linear_top1", "linear_top5")}
    return build_results(runs, spec=None, env=environment("cpu", plugins), wall_s=1.0, probes=probes, metrics=described)


def test_linear_top1_comes_from_the_cards(plugins):
    rows = {row.backbone: row for row in _results(plugins).summary}
    assert (
        linear_top1(rows["resnet50.swav_800ep"], plugins)
        == plugins.backbones.get("resnet50.swav_800ep").card.linear_top1.value
    )


def test_figure_1a_places_models_at_their_measured_linear_top1(plugins):
    """With the linear probe in the results, Fig. 1a's x is the measured top-1 (the card's for the
    others), and the legend and the note say which is which."""
    measured = {"resnet50.swav_800ep": 0.5, "resnet50.infomin_800ep": 0.6}
    results = _results(plugins, measured)
    rows = {row.backbone: row for row in results.summary if row.protocol.pca_dims == 2048}
    assert linear_point(rows["resnet50.swav_800ep"], plugins) == (50.0, "measured")
    card = plugins.backbones.get("resnet50.mocov2_pycontrast_200ep").card
    assert linear_point(rows["resnet50.mocov2_pycontrast_200ep"], plugins) == (card.linear_top1.value, "published")
    (fig1a, *_), _ = plan_figures(results, plugins=plugins)
    assert fig1a.stem == "fig1_acc_vs_linear"
    assert (
        fig1a.note
        == "Linear top-1 measured by the run's linear probe for swav_800ep, infomin_800ep; published (model card) for the others."
    )
    drawn, _ = svg_figures(results, plugins=plugins)
    svg = dict((plan.stem, text) for plan, text in drawn)["fig1_acc_vs_linear"]
    assert "linear top-1 measured (linear probe)" in svg and "linear top-1 published (model card)" in svg
    from sslbench.interfaces import ReportContext

    page = plugins.reporters.get("html").reporter.render_with_context(results, ReportContext(plugins=plugins))
    assert "probe for swav_800ep, infomin_800ep; published (model card) for the others." in page
    everyone = _results(plugins, dict.fromkeys(CARDS, 0.4))
    assert plan_figures(everyone, plugins=plugins)[0][0].note.startswith(
        "Linear top-1 measured by the run's linear probe for every model"
    )
    none = plan_figures(_results(plugins), plugins=plugins)[0][0]
    assert none.note.startswith("Linear top-1 published (model cards)")


def test_outliers_are_points_far_from_the_line():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = 2 * x
    y[3] += 5.0
    assert outliers(x, y).tolist() == [False, False, False, True, False, False]
    assert outliers(x[:3], y[:3]).all()  # too few points to call any an outlier: all labelled


def test_every_figure_is_written_at_the_asked_size(plugins, tmp_path):
    outcome = plot_results(_results(plugins), tmp_path, plugins=plugins, size=FigureSize(5.0, 3.0, 80))
    stems = sorted({p.stem for p in outcome.written})
    assert stems == ["fig1_acc_vs_linear", "fig1_ari_vs_acc", "fig2_dims"]
    assert outcome.skipped == ["fig2_clusters: no sweep over clusters in the results"]
    for stem in stems:
        with Image.open(tmp_path / f"{stem}.png") as png:
            png.verify()
            assert png.size == (400, 240)
        root = ET.parse(tmp_path / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg") and root.attrib["width"] == "360pt"  # 5 in × 72 pt


@pytest.mark.slow
def test_plot_command_merges_files_and_rejects_unknown_formats(plugins, tmp_path):
    results = _results(plugins)
    half = len(results.runs) // 2
    for name, runs in (("a.json", results.runs[:half]), ("b.json", results.runs[half:])):
        build_results(runs, spec=None, env=results.environment, wall_s=1.0).write(tmp_path / name)
    proc = run_cli("plot", "a.json", "b.json", "--out", "figs", "--formats", "png", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "fig1_acc_vs_linear.png", "fig1_ari_vs_acc.png", "fig2_dims.png"
    ]  # fmt: skip
    bad = run_cli("plot", "a.json", "--formats", "pdf", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown figure format 'pdf'" in bad.stderr


@pytest.mark.parametrize("missing", ["nothing.json"])
def test_plot_of_a_missing_file(tmp_path, missing):
    proc = run_cli("plot", missing, cwd=tmp_path)
    assert proc.returncode == 2 and "results file not found" in proc.stderr
