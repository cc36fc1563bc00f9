"""The HTML report: one self-contained page for a paper's supplementary material or a pull request.

``sslbench report RUN_DIR --format html -o report.html`` writes a single file that loads nothing
from anywhere (inline CSS, inline JS, inline SVG; its Content-Security-Policy forbids the rest):

* the Table 1 layout of :mod:`sslbench.table`, one table per dataset: best **bold**, within one std
  of the best marked, the published value and our difference under each row that has one. Clicking a
  column header sorts by that column (the mean; again to reverse);
* the paper's figures that the results support, drawn by :func:`sslbench.plots.svg_figures`
  (a note instead when matplotlib is not installed);
* per-cluster statistics of each saved ``predictions/*.npz`` in the run directories given
  (``sslbench run --save-predictions``): the purest and least pure clusters of the eval split;
* the run's environment, spec, sslbench version, creation time and wall time.

**Shareable sorted views**: ``report.html#sort=acc`` opens with every table sorted by ACC, best
first; ``#sort=acc:asc`` sorts ascending, ``#sort=method`` by method name. The key is the
metric's name in results.json (``acc``, ``ari``, ``acc_tr``, …); clicking a header puts the view
it shows into the address.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable
from html import escape
from pathlib import Path

import numpy as np
import yaml

from sslbench.errors import SSLBenchError
from sslbench.inputs import NO_LABEL
from sslbench.inspection import ClusterStat, cluster_stats, largest_and_smallest, purest_and_least_pure
from sslbench.interfaces import ReportContext, Reporter
from sslbench.plots import FigureSize, svg_figures
from sslbench.results import Results, sslbench_version
from sslbench.table import PresetComparison, Table, preset_comparisons, summary_tables

_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_HREF = "{http://www.w3.org/1999/xlink}href"

#: What each figure shows, under it.
FIGURE_CAPTIONS = {
    "fig1_acc_vs_linear": "k-means ACC against each model's linear top-1 (filled: measured by the run's linear "
    "probe; hollow: published in its card), at the paper's protocol point; points far from the least-squares line "
    "are labelled.",
    "fig1_ari_vs_acc": "ARI against ACC, one point per model at the paper's protocol point; "
    "points far from the least-squares line are labelled.",
    "fig2_dims": "ACC and ARI against the PCA dimensions kept; error bars: std over seeds.",
    "fig2_clusters": "ACC and ARI against the number of clusters; error bars: std over seeds.",
}

_CSS = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --accent: #0b5cad; --near: #b3261e; --soft: #f6f8fa; }
* { box-sizing: border-box; }
html { color-scheme: light; }
body { margin: 0 auto; max-width: 74rem; padding: 2rem 1.5rem 4rem; color: var(--fg); background: #fff;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; line-height: 1.25; }
h2 { font-size: 1.25rem; margin: 2.5rem 0 .75rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.75rem 0 .5rem; }
h4 { font-size: .95rem; margin: 0 0 .35rem; word-break: break-all; }
p { margin: .4rem 0; }
a { color: var(--accent); }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
.meta { color: var(--muted); margin: 0; }
.meta span + span::before { content: " · "; }
nav ul { list-style: none; padding: 0; margin: 1rem 0 0; display: flex; flex-wrap: wrap; gap: .25rem 1.25rem; }
.note { color: var(--muted); font-size: .9rem; }
.legend { font-size: .9rem; color: var(--muted); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .65rem; }
table.results { width: 100%; margin: .25rem 0 .5rem; }
table.results caption { caption-side: bottom; text-align: left; color: var(--muted); font-size: .82rem;
  padding-top: .5rem; }
table.results thead th { border-bottom: 2px solid var(--fg); text-align: right; vertical-align: bottom;
  white-space: nowrap; }
table.results thead th[data-key="method"], table.results tbody th { text-align: left; }
table.results tbody { border-bottom: 1px solid var(--line); }
table.results tbody th { font-weight: normal; }
table.results td { text-align: right; white-space: nowrap; }
td.best strong { font-weight: 700; }
td.within-std, .within-std-sample { color: var(--near); text-decoration: underline dotted;
  text-underline-offset: .2em; }
tr.published th, tr.published td { color: var(--muted); font-size: .8rem; padding-top: 0; }
tr.published .source { font-style: italic; }
button.sort { font: inherit; font-weight: 600; color: inherit; background: none; border: 0; padding: 0;
  cursor: pointer; }
button.sort:hover, button.sort:focus-visible { color: var(--accent); text-decoration: underline; }
th[aria-sort] button.sort::after { display: inline-block; width: 1em; margin-left: .2em; color: #9aa4ae;
  content: "\\2195"; }
th[aria-sort="ascending"] button.sort::after { content: "\\25B2"; color: var(--accent); }
th[aria-sort="descending"] button.sort::after { content: "\\25BC"; color: var(--accent); }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(26rem, 1fr)); gap: 1.5rem 2rem; }
figure { margin: 0; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { font-size: .85rem; color: var(--muted); margin-top: .25rem; }
figcaption b { color: var(--fg); }
.clusters { display: grid; grid-template-columns: repeat(auto-fill, minmax(19rem, 1fr)); gap: 1.25rem 2rem; }
.clusters table, table.plain { font-size: .85rem; }
.clusters th, .clusters td, table.plain th, table.plain td { border-bottom: 1px solid var(--line); text-align: right; }
.clusters thead th, table.plain thead th { border-bottom: 2px solid var(--fg); }
.clusters tr.group th { text-align: left; font-weight: 600; background: var(--soft); }
table.plain th:first-child, table.plain td:first-child, table.plain.left td { text-align: left; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 4px; padding: .75rem 1rem;
  overflow-x: auto; font-size: .8rem; line-height: 1.45; }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav, .screen-only { display: none; }
  a { color: inherit; text-decoration: none; }
  h2, h3, h4 { break-after: avoid; }
  table, figure, .clusters > section { break-inside: avoid; }
  .scroll { overflow: visible; }
  th[aria-sort] button.sort::after { content: none; }
  td.within-std { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  pre { white-space: pre-wrap; word-break: break-all; overflow: visible; }
  .figures { display: block; }
  figure { margin-bottom: 1rem; }
}
"""

# Sorting: each tbody is one row with its published row; a header's button sorts the tbodies of
# its table on the data-value of that column (the mean, or the method's label). ``#sort=KEY[:DIR]``
# sorts every table that has column KEY when the page opens or the address changes.
_JS = """
(function () {
  "use strict";
  var tables = Array.prototype.slice.call(document.querySelectorAll("table.sortable"));

  function headers(table) {
    return Array.prototype.slice.call(table.tHead.rows[0].cells);
  }
  function columnOf(table, key) {
    var cells = headers(table);
    for (var i = 0; i < cells.length; i++) {
      if (cells[i].getAttribute("data-key") === key) return i;
    }
    return -1;
  }
  function defaultDirection(th) {
    // best first: a number column descending unless lower is better
    if (th.getAttribute("data-type") !== "number") return "asc";
    return th.getAttribute("data-better") === "lower" ? "asc" : "desc";
  }
  function cellValue(group, column, numeric) {
    var raw = group.rows[0].cells[column].getAttribute("data-value") || "";
    if (!numeric) return raw;
    var number = parseFloat(raw);
    return isNaN(number) ? -Infinity : number;
  }
  function sortTable(table, key, direction) {
    var column = columnOf(table, key);
    if (column < 0) return;
    var th = headers(table)[column];
    var numeric = th.getAttribute("data-type") === "number";
    var sign = direction === "asc" ? 1 : -1;
    var groups = Array.prototype.slice.call(table.tBodies);
    groups.sort(function (a, b) {
      var x = cellValue(a, column, numeric), y = cellValue(b, column, numeric);
      var order = numeric ? (x < y ? -1 : x > y ? 1 : 0) : x.localeCompare(y);
      if (order !== 0) return sign * order;
      return Number(a.getAttribute("data-order")) - Number(b.getAttribute("data-order"));
    });
    groups.forEach(function (group) { table.appendChild(group); });
    headers(table).forEach(function (cell) {
      if (cell.hasAttribute("aria-sort")) cell.setAttribute("aria-sort", "none");
    });
    th.setAttribute("aria-sort", direction === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sorted", key + ":" + direction);
  }
  function share(key, direction) {
    try {
      history.replaceState(null, "", "#sort=" + encodeURIComponent(key) + ":" + direction);
    } catch (error) {
      // an address that cannot be rewritten (a sandboxed frame) keeps the sorted view on screen only
    }
  }
  function sortFromAddress() {
    var match = /^#sort=([^:]+)(?::(asc|desc))?$/.exec(window.location.hash);
    if (!match) return;
    var key;
    try {
      key = decodeURIComponent(match[1]);
    } catch (error) {
      return;
    }
    tables.forEach(function (table) {
      var column = columnOf(table, key);
      if (column >= 0) sortTable(table, key, match[2] || defaultDirection(headers(table)[column]));
    });
  }
  tables.forEach(function (table) {
    headers(table).forEach(function (th) {
      var button = th.querySelector("button.sort");
      if (!button) return;
      button.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        var state = th.getAttribute("aria-sort");
        var direction = state === "descending" ? "asc" : state === "ascending" ? "desc" : defaultDirection(th);
        sortTable(table, key, direction);
        share(key, direction);
      });
    });
  });
  sortFromAddress();
  window.addEventListener("hashchange", sortFromAddress);
})();
"""

# Nothing but what the page itself holds: no fetch, no frame, no remote style, script, font or image.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; base-uri 'none'"


def _e(text: object) -> str:
    """``text`` escaped for HTML element content and attribute values."""
    return escape(str(text), quote=True)


def page_title(results: Results) -> str:
    """The spec's name, else a description of what was merged, else a generic title."""
    spec = results.spec or {}
    if isinstance(spec.get("name"), str) and spec["name"]:
        return f"{spec['name']} — sslbench results"
    if isinstance(spec.get("merged"), list):
        return "sslbench results merged from " + ", ".join(str(s) for s in spec["merged"])
    return "sslbench results"


def inline_svg(svg: str, prefix: str, label: str) -> str:
    """A standalone SVG document as an element to put inside HTML: no XML declaration or DOCTYPE,
    every id prefixed with ``prefix`` (several figures share one page) and the references to them
    rewritten, its style sheet scoped to itself, ``xlink:href`` as SVG 2's ``href``."""
    root = ET.fromstring(svg)
    own = f"{prefix}svg"

    def rename(match: re.Match[str]) -> str:
        return f"url(#{prefix}{match.group(1)})"

    for element in root.iter():
        # unqualified names and one xmlns on the root: the markup an HTML page holds inline
        if element.tag.startswith(f"{{{_SVG_NS}}}"):
            element.tag = element.tag[len(_SVG_NS) + 2 :]
        for name, value in list(element.attrib.items()):
            if name == "id":
                element.set(name, prefix + value)
            elif name in (_XLINK_HREF, "href"):
                del element.attrib[name]
                element.set("href", f"#{prefix}{value[1:]}" if value.startswith("#") else value)
            elif "url(#" in value:
                element.set(name, re.sub(r"url\(#([^)]+)\)", rename, value))
        if element.tag == "style" and element.text:
            # a sheet inside an inline SVG applies to the whole page: limit each rule to this figure
            sheet = re.sub(r"url\(#([^)]+)\)", rename, element.text)
            element.text = re.sub(
                r"(^|\})\s*([^{}]+?)\s*\{",
                lambda m: m.group(1) + ", ".join(f"#{own} {s.strip()}" for s in m.group(2).split(",")) + " {",
                sheet,
            )
    root.set("xmlns", _SVG_NS)
    root.set("id", own)
    root.set("role", "img")
    root.set("aria-label", label)
    return ET.tostring(root, encoding="unicode")


class HTMLReporter(Reporter):
    """One self-contained HTML page: sortable tables, inline SVG figures, per-cluster statistics,
    environment and spec. See the module's documentation for what the page holds."""

    suffix = ".html"

    def __init__(self, top: int = 5, min_size: int = 10, figure_size: FigureSize | None = None) -> None:
        #: Clusters listed per predictions file (purest and least pure), and the smallest listed.
        self.top = top
        self.min_size = min_size
        self.figure_size = figure_size or FigureSize(6.4, 4.0, 100)

    def render(self, results: Results) -> str:
        return self.render_with_context(results, ReportContext())

    def render_with_context(self, results: Results, context: ReportContext) -> str:
        title = page_title(results)
        tables = summary_tables(results)
        sections: list[tuple[str, str, str]] = [
            ("results", "Results", self._tables(tables)),
        ]
        comparisons = preset_comparisons(results)
        if comparisons:
            sections.append(("presets", "Presets compared", "\n".join(self._comparison(c) for c in comparisons)))
        sections += [
            ("figures", "Figures", self._figures(results, context)),
            ("clusters", "Per-cluster statistics", self._clusters(context.run_dirs)),
        ]
        if results.skipped:
            sections.append(("skipped", "Skipped samples", self._skipped(results)))
        sections += [
            ("environment", "Environment", self._environment(results)),
            ("spec", "Spec", self._spec(results)),
        ]
        nav = "".join(f'<li><a href="#{key}">{_e(heading)}</a></li>' for key, heading, _ in sections)
        body = "\n".join(
            f'<section id="{key}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>' for key, heading, content in sections
        )
        datasets = len({row.dataset for row in results.summary})
        meta = [
            f"sslbench {_e(results.sslbench_version)}",
            f"created {_e(results.created)}",
            f"wall time {_e(_duration(results.wall_s))}",
            f"{len(results.runs)} run{'s' * (len(results.runs) != 1)}",
            f"{datasets} dataset{'s' * (datasets != 1)}",
        ]
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sslbench {_e(sslbench_version())}">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(title)}</h1>
<p class="meta">{"".join(f"<span>{m}</span>" for m in meta)}</p>
<nav aria-label="sections"><ul>{nav}</ul></nav>
</header>
<main>
{body}
</main>
<footer>Rendered by sslbench {_e(sslbench_version())} from results.json (schema {results.schema_version}).
<span class="screen-only">Click a column header to sort; the address (for example <code>#sort=acc</code>)
keeps the sorted view.</span></footer>
<script>{_JS}</script>
</body>
</html>
"""

    # ----------------------------------------------------------------------------------------------

    def _tables(self, tables: list[Table]) -> str:
        if not tables:
            return '<p class="note">The results have no summary rows.</p>'
        legend = (
            '<p class="legend">Mean ± std over seeds, in percent (unless a caption says otherwise). '
            "<strong>Bold</strong>: best in its column (lowest in a column marked ↓); "
            '<span class="within-std-sample">red, underlined</span>: within one std of the best; '
            "↳ published: the published value, our difference in points, and whether ours lies within its std.</p>"
        )
        parts = [legend]
        for index, table in enumerate(tables):
            parts.append(f'<h3 id="table-{index}-title">{_e(table.dataset)}</h3>')
            parts.append(f'<div class="scroll">{self._table(table, index)}</div>')
        return "\n".join(parts)

    def _comparison(self, comparison: PresetComparison) -> str:
        """Each model's main score under each preset, and the presets' rank agreement (Kendall's τ-b)."""
        head = "".join(f'<th scope="col">{_e(comparison.header(p))}</th>' for p in comparison.presets)
        rows = "".join(
            f'<tr><th scope="row">{_e(model)}</th>'
            + "".join(f"<td>{_e(comparison.text(model, p))}</td>" for p in comparison.presets)
            + "</tr>"
            for model in comparison.scores
        )
        agreement = "".join(f"<li>{_e(line)}</li>" for line in comparison.agreement_lines())
        return (
            f"<h3>{_e(comparison.dataset)}: each preset's main score</h3>\n"
            f'<div class="scroll"><table class="results presets"><thead><tr><th scope="col">Model</th>{head}</tr>'
            f"</thead><tbody>{rows}</tbody></table></div>\n<ul>{agreement}</ul>"
        )

    def _table(self, table: Table, index: int) -> str:
        head = ['<th scope="col" data-key="method" data-type="text" aria-sort="none">']
        head.append('<button type="button" class="sort">Method</button></th>')
        for metric in table.metrics:
            info = table.info[metric]
            about = f"{info.description}; " if info.description else ""
            unit = "in percent" if info.unit == "percent" else "raw value"
            head.append(
                f'<th scope="col" data-key="{_e(metric)}" data-type="number" data-better="{info.better}" '
                f'aria-sort="none"><button type="button" class="sort" '
                f'title="{_e(f"{about}{unit}, {info.better} is better; sort by {info.label}")}">'
                f"{_e(table.label(metric))}</button></th>"
            )
        groups = []
        for order, row in enumerate(table.rows):
            cells = [f'<th scope="row" data-value="{_e(row.label)}">{_e(row.label)}</th>']
            for metric in table.metrics:
                cell = row.cells[metric]
                text = _e(cell.text())
                if cell.best:
                    cells.append(f'<td class="best" data-value="{cell.mean!r}"><strong>{text}</strong></td>')
                elif cell.within_std:
                    title = "within one std of the best"
                    cells.append(f'<td class="within-std" data-value="{cell.mean!r}" title="{title}">{text}</td>')
                else:
                    cells.append(f'<td data-value="{cell.mean!r}">{text}</td>')
            lines = [f'<tr class="measured">{"".join(cells)}</tr>']
            if row.published:
                source = row.summary.published.source if row.summary.published is not None else ""
                published = [f'<th scope="row">↳ published <span class="source">{_e(source)}</span></th>']
                published += [f"<td>{_e(row.published_text(metric))}</td>" for metric in table.metrics]
                lines.append(f'<tr class="published">{"".join(published)}</tr>')
            groups.append(f'<tbody class="row-group" data-order="{order}">{"".join(lines)}</tbody>')
        return (
            f'<table class="results sortable" id="table-{index}" data-dataset="{_e(table.dataset)}" '
            f'aria-labelledby="table-{index}-title">\n'
            f"<caption>{_e(table.caption)}</caption>\n"
            f"<thead><tr>{''.join(head)}</tr></thead>\n" + "\n".join(groups) + "\n</table>"
        )

    def _figures(self, results: Results, context: ReportContext) -> str:
        try:
            drawn, skipped = svg_figures(results, plugins=context.plugins, size=self.figure_size)
        except SSLBenchError:
            return (
                '<p class="note">The figures need matplotlib, which is not installed where this report was '
                "rendered: <code>pip install 'sslbench[plot]'</code> and render it again.</p>"
            )
        parts = []
        if drawn:
            parts.append('<div class="figures">')
            for plan, svg in drawn:
                caption = " ".join(part for part in (FIGURE_CAPTIONS.get(plan.stem, ""), plan.note) if part)
                parts.append(
                    f'<figure id="{_e(plan.stem)}">\n{inline_svg(svg, plan.stem + "-", plan.title)}\n'
                    f"<figcaption><b>{_e(plan.title)}.</b> {_e(caption)}</figcaption>\n</figure>"
                )
            parts.append("</div>")
        else:
            parts.append('<p class="note">The results support none of the paper\'s figures.</p>')
        if skipped:
            items = "".join(f"<li>{_e(reason)}</li>" for reason in skipped)
            parts.append(f'<p class="note">Not drawn:</p><ul class="note skipped-figures">{items}</ul>')
        return "\n".join(parts)

    def _clusters(self, run_dirs: Iterable[Path]) -> str:
        dirs = list(run_dirs)
        if not dirs:
            return (
                '<p class="note">Rendered without a run directory: <code>sslbench report RUN_DIR --format html</code> '
                "adds the clusters of the predictions a run saved.</p>"
            )
        found = [(folder, sorted((folder / "predictions").glob("*.npz"))) for folder in dirs]
        if not any(files for _, files in found):
            return (
                '<p class="note">No saved predictions in '
                + ", ".join(f"<code>{_e(folder)}</code>" for folder in dirs)
                + ": run with <code>sslbench run --save-predictions</code>.</p>"
            )
        parts = [
            f'<p class="note">Each file\'s eval split: its {self.top} purest and {self.top} least pure clusters '
            f"(purity: the share of a cluster's samples in its majority class; clusters under {self.min_size} "
            "samples left out). Classes are the dataset's class indices.</p>"
        ]
        for folder, files in found:
            if not files:
                continue
            if len(dirs) > 1:
                parts.append(f"<h3>{_e(folder)}</h3>")
            parts.append('<div class="clusters">')
            parts += [self._cluster_file(path) for path in files]
            parts.append("</div>")
        return "\n".join(parts)

    def _cluster_file(self, path: Path) -> str:
        try:
            with np.load(path) as saved:
                pred, labels = saved["eval_pred"], saved["eval_labels"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            return f'<section><h4>{_e(path.name)}</h4><p class="note">unreadable: {_e(exc)}</p></section>'
        if len(pred) == 0:
            return f'<section><h4>{_e(path.name)}</h4><p class="note">no predictions</p></section>'
        stats = cluster_stats(pred, labels)
        if bool(labels[0] == NO_LABEL):
            return self._unlabeled_cluster_file(path, stats, len(pred))
        purest, impure = purest_and_least_pure(stats, self.top, self.min_size)

        def rows(heading: str, listed: list[ClusterStat]) -> str:
            out = f'<tr class="group"><th colspan="4" scope="rowgroup">{_e(heading)}</th></tr>'
            if not listed:
                return out + f'<tr><td colspan="4">no cluster of {self.min_size} samples or more</td></tr>'
            for stat in listed:
                out += (
                    f"<tr><td>{stat.cluster}</td><td>{stat.size}</td><td>{stat.majority_class}</td>"
                    f"<td>{100 * stat.purity:.1f} %</td></tr>"
                )
            return out

        return (
            f'<section data-file="{_e(path.name)}"><h4>{_e(path.name)}</h4>'
            f'<p class="note">{len(stats)} non-empty clusters, {len(pred)} samples</p>'
            '<table><thead><tr><th scope="col">cluster</th><th scope="col">size</th>'
            '<th scope="col">majority class</th><th scope="col">purity</th></tr></thead>'
            f"<tbody>{rows('purest', purest)}{rows('least pure', impure)}</tbody></table></section>"
        )

    def _unlabeled_cluster_file(self, path: Path, stats: list[ClusterStat], n_samples: int) -> str:
        """Clusters of a split without labels: the largest and the smallest, by size (purity needs labels)."""
        largest, smallest = largest_and_smallest(stats, self.top)
        rows = "".join(
            f'<tr class="group"><th colspan="2" scope="rowgroup">{heading}</th></tr>'
            + "".join(f"<tr><td>{stat.cluster}</td><td>{stat.size}</td></tr>" for stat in listed)
            for heading, listed in (("largest", largest), ("smallest", smallest))
        )
        return (
            f'<section data-file="{_e(path.name)}"><h4>{_e(path.name)}</h4>'
            f'<p class="note">{len(stats)} non-empty clusters, {n_samples} samples; no class labels, so '
            "no purity: the largest and smallest clusters</p>"
            '<table><thead><tr><th scope="col">cluster</th><th scope="col">size</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></section>"
        )

    def _skipped(self, results: Results, limit: int = 100) -> str:
        rows = "".join(
            f"<tr><td>{_e(s.model)}</td><td>{_e(s.dataset)}</td><td>{_e(s.split)}</td>"
            f"<td>{_e(s.sample)}</td><td>{_e(s.error)}</td></tr>"
            for s in results.skipped[:limit]
        )
        more = len(results.skipped) - limit
        tail = f'<p class="note">… and {more} more, listed in results.json.</p>' if more > 0 else ""
        return (
            f'<p class="note">{len(results.skipped)} unreadable sample(s) were left out of the runs.</p>'
            '<div class="scroll"><table class="plain left"><thead><tr><th>model</th><th>dataset</th><th>split</th>'
            f"<th>sample</th><th>error</th></tr></thead><tbody>{rows}</tbody></table></div>{tail}"
        )

    def _environment(self, results: Results) -> str:
        env = results.environment
        facts = [
            ("sslbench (results)", results.sslbench_version),
            ("created", results.created),
            ("wall time", _duration(results.wall_s)),
            ("device", env.device),
            ("python", env.python),
            ("platform", env.platform),
            ("sslbench (run)", env.sslbench),
            ("torch", env.torch or "not installed"),
            ("numpy", env.numpy),
            ("scikit-learn", env.scikit_learn),
            ("scipy", env.scipy),
        ]
        facts_html = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(v)}</td></tr>' for k, v in facts)
        plugins = "".join(
            f"<tr><td>{_e(p.name)}</td><td>{_e(p.distribution or '-')}</td><td>{_e(p.version or '-')}</td></tr>"
            for p in env.plugins
        )
        return (
            f'<table class="plain left environment"><tbody>{facts_html}</tbody></table>\n'
            "<h3>Plugins loaded</h3>\n"
            '<table class="plain left plugins"><thead><tr><th scope="col">plugin</th><th scope="col">distribution</th>'
            f'<th scope="col">version</th></tr></thead><tbody>{plugins}</tbody></table>'
        )

    def _spec(self, results: Results) -> str:
        if results.spec is None:
            return '<p class="note">No spec recorded (results built through the Python API).</p>'
        try:
            text = yaml.safe_dump(results.spec, sort_keys=False, allow_unicode=True, width=100)
        except yaml.YAMLError:
            text = json.dumps(results.spec, indent=2, ensure_ascii=False)
        return f'<pre class="spec">{_e(text)}</pre>'


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"
