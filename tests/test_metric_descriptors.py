"""Metrics declare how they are shown; results.json carries it; every report shows every metric so.

The third-party metric below is a real distribution (a ``.dist-info`` with entry points on sys.path,
found by importlib.metadata as pip's would be); a results file it produced is then rendered by
``sslbench report`` in a subprocess that does not have it.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from test_plugins import install  # noqa: F401 -- the fixture that writes real .dist-info distributions
from test_reports import _protocol, _results

from sslbench import evaluate_features, load_plugins
from sslbench.errors import PluginError, SSLBenchError
from sslbench.interfaces import MetricEntry
from sslbench.results import (
    MetricInfo,
    MetricSummary,
    Results,
    SummaryRow,
    load_results,
    merge_results,
    schema1_info,
)
from sslbench.table import summary_tables

from conftest import blobs, run_cli

FORMATS = ("rich", "md", "latex", "html", "csv", "json")

# A raw score, lower is better: the conditional entropy of the classes given the clusters, in nats.
_THIRD_PARTY = """
    import numpy as np
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    from sslbench import MetricEntry, hookimpl

    def conditional_entropy(ctx):
        classes = np.bincount(ctx.eval_labels)
        return float(entropy(classes[classes > 0]) - mutual_info_score(ctx.eval_labels, ctx.eval_pred))

    @hookimpl
    def sslbench_register_metrics(register):
        register(
            MetricEntry(
                "cond_entropy",
                conditional_entropy,
                "H(Y|C) nats",
                "conditional entropy of the classes given the clusters",
                unit="raw",
                better="lower",
                decimals=3,
            )
        )
"""
LABEL = "H(Y|C) nats"


def _label_in(text: str, fmt: str) -> bool:
    if fmt == "latex":
        return "H(Y|C) nats $\\downarrow$" in text
    if fmt == "html":
        return "H(Y|C) nats ↓</button>" in text
    if fmt == "csv":  # columns are named by the metric's name, which programs read
        return "cond_entropy_mean" in text.splitlines()[0]
    if fmt == "md":  # a | in a Markdown cell is escaped
        return "| H(Y\\|C) nats ↓ |" in text
    if fmt == "json":
        return json.loads(text)["metrics"]["cond_entropy"]["label"] == LABEL
    return f"{LABEL} ↓" in text


def _third_party_results(install) -> tuple[Results, object]:  # noqa: F811
    install("thirdparty-scores", "0.3", {"thirdparty": "thirdparty_scores"}, {"thirdparty_scores": _THIRD_PARTY})
    plugins = load_plugins()
    assert plugins.plugin_of(plugins.metrics, "cond_entropy").distribution == "thirdparty-scores"
    x, y = blobs(30, 4, 6, seed=2, spread=3.0)
    results = evaluate_features(x[:80], y[:80], x[80:], y[80:], seeds=2, epochs=2, backend="reference", plugins=plugins)
    return results, plugins


def test_third_party_metric_in_every_format(install, tmp_path):  # noqa: F811
    results, plugins = _third_party_results(install)
    assert results.metrics["cond_entropy"] == MetricInfo(
        label=LABEL,
        description="conditional entropy of the classes given the clusters",
        unit="raw",
        better="lower",
        decimals=3,
    )
    results.write(tmp_path / "results.json")
    reread = load_results(tmp_path / "results.json")
    assert reread == results
    for fmt in FORMATS:
        assert _label_in(plugins.reporters.get(fmt).reporter.render(reread), fmt), fmt
    mean = results.summary[0].metrics["cond_entropy"].mean
    assert f"{mean:.3f}" in plugins.reporters.get("md").reporter.render(results)  # raw, not × 100
    # `sslbench report` in a subprocess, where the distribution is not on the path.
    proc = run_cli("report", "results.json", "--format", "md", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _label_in(proc.stdout, "md") and f"{mean:.3f}" in proc.stdout


@pytest.mark.slow
def test_third_party_metric_rendered_by_a_process_without_its_plugin(install, tmp_path):  # noqa: F811
    results, _ = _third_party_results(install)
    results.write(tmp_path / "results.json")
    listed = json.loads(run_cli("plugins", "--json", cwd=tmp_path).stdout)
    assert "thirdparty" not in {p["name"] for p in listed}
    for fmt in ("rich", "latex", "csv", "json"):
        proc = run_cli("report", "results.json", "--format", fmt, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert _label_in(proc.stdout, fmt), fmt
    proc = run_cli("report", "results.json", "--format", "html", "-o", "report.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _label_in((tmp_path / "report.html").read_text(), "html")


# --------------------------------------------------------------------------------------------------
# Direction and unit


def _summary(model: str, metrics: dict[str, tuple[float, float | None]]) -> SummaryRow:
    return SummaryRow(
        model=model,
        dataset="ImageNet",
        protocol=_protocol(),
        n_seeds=3,
        seeds=[0, 1, 2],
        metrics={name: MetricSummary(mean=mean, std=std) for name, (mean, std) in metrics.items()},
    )


DAVIES_BOULDIN = MetricInfo(label="DB", unit="raw", better="lower", needs_labels=False, decimals=3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 5.0, allow_nan=False), st.floats(0.0, 1.0, allow_nan=False)), min_size=1, max_size=6
    )
)
def test_lower_is_better_raw_metric_marks_the_minimum(plugins, values):
    rows = [_summary(f"m{i}", {"dbi": (mean, std), "acc": (0.5, 0.01)}) for i, (mean, std) in enumerate(values)]
    results = _results(rows, plugins).model_copy(update={"metrics": {"dbi": DAVIES_BOULDIN}})
    table = summary_tables(results)[0]
    means = np.array([mean for mean, _ in values])
    best = int(np.argmin(means))  # numpy: the first minimum
    for i, row in enumerate(table.rows):
        cell = row.cells["dbi"]
        assert cell.best == (means[i] == means.min())
        assert cell.within_std == (not cell.best and means[i] <= means[best] + values[best][1])
        assert cell.text() == f"{means[i]:.3f} ± {values[i][1]:.3f}"  # raw: not × 100
    assert table.label("dbi") == "DB ↓" and "Lower is better (↓): DB." in table.caption


def test_lower_is_better_in_markdown_latex_and_html(plugins):
    rows = [
        _summary("A", {"dbi": (1.25, 0.01)}),
        _summary("B", {"dbi": (0.75, 0.02)}),
        _summary("C", {"dbi": (0.76, None)}),
    ]
    results = _results(rows, plugins).model_copy(update={"metrics": {"dbi": DAVIES_BOULDIN}})
    md = plugins.reporters.get("md").reporter.render(results)
    assert "| B | **0.750 ± 0.020** |" in md and "| C | _0.760_ |" in md and "| A | 1.250 ± 0.010 |" in md
    latex = plugins.reporters.get("latex").reporter.render(results)
    assert "B & \\textbf{0.750 $\\pm$ 0.020}" in latex and "DB $\\downarrow$" in latex
    html = plugins.reporters.get("html").reporter.render(results)
    assert 'data-key="dbi" data-type="number" data-better="lower"' in html
    assert '<td class="best" data-value="0.75"><strong>0.750 ± 0.020</strong></td>' in html


# --------------------------------------------------------------------------------------------------
# Columns: every metric by default, or chosen and ordered


def _wide_results(plugins) -> Results:
    names = [f"score_{i:02d}" for i in range(14)]
    info = {name: MetricInfo(label=f"Score number {i}") for i, name in enumerate(names)}
    rows = [
        _summary(f"model {j}", {name: (0.1 * j + 0.01 * i, 0.001) for i, name in enumerate(names)}) for j in range(3)
    ]
    return _results(rows, plugins).model_copy(update={"metrics": info})


def test_a_narrow_terminal_splits_the_table_and_hides_no_column(plugins):
    results = _wide_results(plugins)
    parts = {}
    for width in (60, 80, 200):
        console = Console(file=io.StringIO(), width=width, color_system=None, record=True)
        plugins.reporters.get("rich").reporter.show(results, console)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        for info in results.metrics.values():
            assert f" {info.label} " in text  # whole: neither cropped nor folded
        for row in summary_tables(results)[0].rows:
            assert text.count(f" {row.label} ") == text.count("┏")  # the Method column in every part
            for cell in row.cells.values():
                assert f" {cell.text()} " in text
        parts[width] = text.count("┏")
    assert parts[60] > parts[80] > parts[200] > 1  # 14 columns of 18 characters do not fit in 200


def test_columns_chosen_and_ordered_and_unknown_names_refused(plugins, tmp_path):
    results = _wide_results(plugins)
    chosen = results.with_columns(["score_03", "score_01"])
    md = plugins.reporters.get("md").reporter.render(chosen)
    assert "| Method | Score number 3 | Score number 1 |\n" in md
    csv_header = plugins.reporters.get("csv").reporter.render(chosen).splitlines()[0]
    assert csv_header.endswith(",n_seeds,score_03_mean,score_03_std,score_01_mean,score_01_std")
    with pytest.raises(SSLBenchError, match=r"^report metrics: unknown metric 'score_3' \(did you mean .*'score_03'"):
        results.with_columns(["score_3"])
    with pytest.raises(SSLBenchError, match="'score_01' is listed twice"):
        results.with_columns(["score_01", "score_01"])
    results.write(tmp_path / "results.json")
    proc = run_cli("report", "results.json", "--metrics", "score_01,scor_02", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "sslbench: error: --metrics: unknown metric 'scor_02' (did you mean 'score_02' or 'score_12' or 'score_10'?)"
    ]


def test_csv_puts_the_headline_metrics_first_by_default(plugins):
    """Whatever order the descriptors come in (a third party's metric can be described before the built-in
    ones), the CSV's default columns start with ACC, ARI, AMI and NMI, as every other report does."""
    rows = [_summary("m", {"purity": (0.9, 0.0), "nmi": (0.4, 0.0), "acc": (0.5, 0.0), "ari": (0.3, 0.0)})]
    results = _results(rows, plugins)
    purity = MetricInfo(label="Purity")
    described = {"purity": purity, **{name: results.metric_info(name) for name in ("nmi", "acc", "ari")}}
    header = plugins.reporters.get("csv").reporter.render(results.model_copy(update={"metrics": described}))
    means = [column for column in header.splitlines()[0].split(",") if column.endswith("_mean")]
    assert means == ["acc_mean", "ari_mean", "nmi_mean", "purity_mean"]


# --------------------------------------------------------------------------------------------------
# Results written before descriptors; merged results


def test_schema1_names_read_with_the_builtin_plugins_labels(plugins):
    # the label-free scores came after schema 1: no file of that schema holds them
    builtin = [
        entry
        for entry in plugins.metrics
        if plugins.plugin_of(plugins.metrics, entry.name).distribution == "sslbench" and entry.needs_labels
    ]
    assert builtin
    for entry in builtin:
        assert schema1_info(entry.name) == MetricInfo(label=entry.label)
        assert schema1_info(f"{entry.name}_in_imagenet").label == f"{entry.label} in imagenet"
    assert schema1_info("knn_top1_k20").label == "kNN-20"
    assert schema1_info("purity") == MetricInfo(label="purity", unit="raw", decimals=4)


def test_an_old_results_file_renders_as_before(plugins, tmp_path):
    metrics = {"acc": (0.5, 0.01), "ari": (0.4, 0.01), "ami": (0.3, None), "nmi": (0.2, 0.0)}
    metrics |= {"acc_in_imagenet": (0.6, 0.01), "ari_in_imagenet": (0.5, 0.0), "knn_top1_k20": (0.7, 0.0)}
    metrics |= {"purity": (0.81234, 0.001)}
    new = _results([_summary("A", metrics)], plugins)
    data = json.loads(new.to_json())
    del data["metrics"], data["columns"]
    data["schema_version"] = 1
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_results(tmp_path / "old.json")
    md = plugins.reporters.get("md").reporter.render(old)
    assert "| Method | ACC | ARI | AMI | NMI | ACC in imagenet | kNN-20 | purity |" in md
    assert "| A | **50.00 ± 1.00** | **40.00 ± 1.00** | **30.00** | **20.00 ± 0.00** |" in md
    assert "**0.8123 ± 0.0010** |" in md


def test_merging_files_with_different_descriptors_of_one_metric_names_both(plugins, tmp_path):
    row = _summary("A", {"dbi": (1.0, None)})
    one = _results([row], plugins).model_copy(update={"metrics": {"dbi": DAVIES_BOULDIN}})
    same = merge_results([one, one], ["a.json", "b.json"])
    assert same.metrics == {"dbi": DAVIES_BOULDIN}
    other = one.model_copy(update={"metrics": {"dbi": DAVIES_BOULDIN.model_copy(update={"better": "higher"})}})
    with pytest.raises(SSLBenchError) as info:
        merge_results([one, other], ["a.json", "b.json"])
    assert str(info.value) == (
        "metric 'dbi' is described differently in a.json and b.json (better: 'lower' vs 'higher'); "
        "were they written with different versions of its plugin?"
    )


def test_a_metric_entry_with_an_unknown_unit_is_refused_when_made():
    with pytest.raises(PluginError, match=r"^metric 'x': unit: Input should be 'percent' or 'raw' \(got 'pct'\)$"):
        MetricEntry("x", lambda ctx: 0.0, "X", "x", unit="pct")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# The spec's report.metrics


def test_spec_report_metrics_are_checked_at_validate(plugins):
    from sslbench.spec import parse_spec, resolve_spec

    base = "models: [{id: raw}]\ndatasets: [{id: digits}]\nprobes: [{id: knn}, {id: linear}]\nreport:\n  metrics: [acc, %s]\n"
    for good in ("nmi", "knn_top1_k20", "linear_top5", "acc_in_some_group"):
        resolve_spec(parse_spec(base % good, "spec.yaml"), plugins)
    with pytest.raises(SSLBenchError) as info:
        resolve_spec(parse_spec(base % "nmii", "spec.yaml"), plugins)
    assert re.fullmatch(
        r"spec\.yaml:5: report\.metrics\[1\]: unknown metric 'nmii' \(did you mean 'nmi'.*\)", str(info.value)
    )
    with pytest.raises(SSLBenchError, match=r"^spec\.yaml:5: report\.metrics\[1\]: 'acc' is listed twice$"):
        resolve_spec(parse_spec(base % "acc", "spec.yaml"), plugins)


def test_spec_report_metrics_choose_the_columns_of_a_run(plugins, tmp_path):
    from sslbench.runner import run_spec
    from sslbench.spec import parse_spec, resolve_spec

    text = f"""\
models: [{{id: raw}}]
datasets: [{{id: digits}}]
protocol: {{epochs: 1, seeds: 1}}
report: {{metrics: [nmi, acc_majority, acc]}}
device: cpu
cache_dir: {tmp_path / "cache"}
"""
    results = run_spec(resolve_spec(parse_spec(text, "spec.yaml"), plugins), plugins, out_dir=tmp_path / "out")
    assert results.columns == ["nmi", "acc_majority", "acc"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["columns"] == results.columns
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Method | NMI | ACC-maj | ACC |\n" in md
    # A class group the datasets do not declare is refused when the run is planned, before extraction.
    wrong = text.replace("acc_majority", "acc_in_imagenet").replace(str(tmp_path / "cache"), str(tmp_path / "cache2"))
    with pytest.raises(SSLBenchError) as info:
        run_spec(resolve_spec(parse_spec(wrong, "spec.yaml"), plugins), plugins, out_dir=tmp_path / "wrong")
    assert str(info.value).startswith("spec.yaml: report.metrics: unknown metric 'acc_in_imagenet'")
    assert not any(path.is_file() for path in (tmp_path / "cache2").rglob("*"))  # nothing extracted


def test_without_the_builtin_metrics_a_plugin_metric_is_still_a_column(plugins):
    """The issue's case: with the built-in metrics disabled the table had a single Method column."""
    purity = MetricInfo(label="Purity", description="majority eval class per cluster")
    results = _results([_summary("A", {"purity": (0.9, 0.01)}), _summary("B", {"purity": (0.8, None)})], plugins)
    results = results.model_copy(update={"metrics": {"purity": purity}})
    md = plugins.reporters.get("md").reporter.render(results)
    assert "| Method | Purity |\n" in md and "| A | **90.00 ± 1.00** |" in md and "| B | 80.00 |" in md
