"""Reports are renderings of results: the Table 1 layout, best and near-best marks, published values."""

from __future__ import annotations

import pytest

from sslbench.results import MetricSummary, Published, Results, RunProtocol, SummaryRow, environment
from sslbench.table import summary_tables

from conftest import run_cli


def _protocol(overcluster: float = 1.0) -> RunProtocol:
    return RunProtocol(
        fit_split="train",
        eval_split="val",
        n_classes=1000,
        k=1000,
        overcluster=overcluster,
        n_clusters=int(1000 * overcluster),
        pca_dims=2048,
        whiten=False,
        epochs=60,
        batch_size=2048,
        backend="torch",
    )


def _row(model: str, acc: float, std: float, published: Published | None = None) -> SummaryRow:
    metrics = {m: MetricSummary(mean=acc, std=std) for m in ("acc", "ari", "ami", "nmi")}
    return SummaryRow(
        model=model,
        dataset="ImageNet",
        protocol=_protocol(),
        n_seeds=5,
        seeds=[0, 1, 2, 3, 4],
        metrics=metrics,
        published=published,
    )


def _results(rows: list[SummaryRow], plugins) -> Results:
    return Results(
        sslbench_version="0",
        created="now",
        spec=None,
        environment=environment("cpu", plugins),
        wall_s=1.0,
        runs=[],
        summary=rows,
    )


def test_best_bold_within_std_marked_and_published_beside(plugins):
    moco = Published(
        source="paper Table 1: MoCo v2 (ResNet-50)",
        metrics={m: MetricSummary(mean=0.2309, std=0.0016) for m in ("acc", "ari", "ami", "nmi")},
    )
    rows = [_row("MoCo v2", 0.2300, 0.002, moco), _row("InfoMin", 0.3317, 0.0032), _row("SwAV", 0.3290, 0.001)]
    table = summary_tables(_results(rows, plugins))[0]
    cells = {row.label: row.cells["acc"] for row in table.rows}
    assert cells["InfoMin"].best and not cells["InfoMin"].within_std
    assert cells["SwAV"].within_std  # 32.90 ≥ 33.17 − 0.32
    assert not cells["MoCo v2"].within_std
    moco_row = next(row for row in table.rows if row.label == "MoCo v2")
    assert moco_row.published_text("acc") == "23.09 ± 0.16 (-0.09, within std)"
    assert next(r for r in table.rows if r.label == "InfoMin").published_text("acc") == ""

    md = plugins.reporters.get("md").reporter.render(_results(rows, plugins))
    assert "| InfoMin | **33.17 ± 0.32** |" in md
    assert "| SwAV | _32.90 ± 0.10_ |" in md
    assert "| ↳ published | 23.09 ± 0.16 (-0.09, within std) |" in md
    rich = plugins.reporters.get("rich").reporter.render(_results(rows, plugins))
    assert "↳ published" in rich and "33.17 ± 0.32" in rich


@pytest.mark.slow
def test_latex_export_of_merged_results_files(plugins, tmp_path):
    first = _results([_row("MoCo v2 (ResNet-50)", 0.2309, 0.0016), _row("SwAV_R50", 0.1504, 0.0077)], plugins)
    second = _results([_row("InfoMin (ResNeXt-152)", 0.3860, 0.0067), _row("SimCLRv2", 0.3800, 0.0020)], plugins)
    first.write(tmp_path / "a" / "results.json")
    second.write(tmp_path / "b.json")
    proc = run_cli("report", "a", "b.json", "--format", "latex", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tex = proc.stdout
    assert tex.count("\\begin{tabular}{lcccc}") == 1  # one dataset: one table with all four rows
    assert "Method & ACC & ARI & AMI & NMI \\\\" in tex
    assert "InfoMin (ResNeXt-152) & \\textbf{38.60 $\\pm$ 0.67}" in tex
    assert "SimCLRv2 & \\textcolor{red}{38.00 $\\pm$ 0.20}" in tex  # within one std of the best
    assert "MoCo v2 (ResNet-50) & 23.09 $\\pm$ 0.16" in tex
    assert "SwAV\\_R50 &" in tex
    assert "\\toprule" in tex and "\\bottomrule" in tex
    merged = run_cli("report", "a", "b.json", "--format", "json", cwd=tmp_path)
    assert merged.returncode == 0
    assert Results.model_validate_json(merged.stdout).spec == {"merged": ["a", "b.json"]}
