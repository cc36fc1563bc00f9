"""Built-in report formats: the rich terminal table, Markdown, LaTeX, CSV, JSON and a self-contained HTML page."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import TYPE_CHECKING

from sslbench import hookimpl
from sslbench.interfaces import Reporter, ReporterEntry
from sslbench.results import Results
from sslbench.table import PresetComparison, Table, headline_metrics, preset_comparisons, summary_tables

if TYPE_CHECKING:  # rich is imported by the methods that draw: listing plugins need not load it
    from rich.console import Console
    from rich.table import Table as RichTable

from .html_report import HTMLReporter


class RichReporter(Reporter):
    """The paper's Table 1 on the terminal: best bold, within one std of the best in red.

    A table wider than the terminal is split into several, each with the Method column, so that no
    column is squeezed away; a cell too wide even alone folds onto more lines.
    """

    suffix = ".txt"

    def tables(self, results: Results, width: int = 160) -> list[list[RichTable]]:
        """Per dataset, its table split into parts that fit ``width`` columns."""
        return [self._parts(table, width) for table in summary_tables(results)]

    def _parts(self, table: Table, width: int) -> list[RichTable]:
        from rich.cells import cell_len
        from rich.table import Table as RichTable
        from rich.text import Text

        # A rich table with a box draws 3 columns around each cell (a rule and two spaces) and 1 after the last.
        published = "  ↳ published"
        labels = ["Method", *(row.label for row in table.rows), *(published for row in table.rows if row.published)]
        method = max(cell_len(label) for label in labels)
        method = min(method, max(12, width // 3))
        chunks: list[list[str]] = []
        used = width
        for metric in table.metrics:
            texts = [table.label(metric), *(row.cells[metric].text() for row in table.rows)]
            texts += [row.published_text(metric) for row in table.rows if row.published]
            need = max(cell_len(text) for text in texts) + 3
            if not chunks or used + need > width:
                chunks.append([])
                used = 1 + method + 3
            chunks[-1].append(metric)
            used += need
        parts = []
        for index, metrics in enumerate(chunks or [[]]):
            title = table.dataset if index == 0 else f"{table.dataset} (continued, {index + 1}/{len(chunks)})"
            rich_table = RichTable(title=title)
            rich_table.add_column("Method", overflow="fold", max_width=method)
            for metric in metrics:
                rich_table.add_column(table.label(metric), justify="right", overflow="fold")
            for row in table.rows:
                cells: list[Text | str] = [row.label]
                for metric in metrics:
                    cell = row.cells[metric]
                    style = "bold" if cell.best else ("red" if cell.within_std else "")
                    cells.append(Text(cell.text(), style=style))
                rich_table.add_row(*cells)
                if row.published:
                    rich_table.add_row(
                        Text(published, style="dim"),
                        *(Text(row.published_text(m), style="dim") for m in metrics),
                    )
            parts.append(rich_table)
        return parts

    def show(self, results: Results, console: Console) -> None:
        from rich.text import Text

        # The caption is a paragraph under the table, wrapped at the terminal (at most 100 columns),
        # not squeezed to the table's width as a rich caption would be.
        for parts, table in zip(self.tables(results, console.width), summary_tables(results), strict=True):
            for rich_table in parts:
                console.print(rich_table)
            console.print(Text(table.caption, style="dim"), width=min(console.width, 100))
            console.print()
        for comparison in preset_comparisons(results):
            console.print(self._comparison(comparison))
            for line in comparison.agreement_lines():
                console.print(Text(line, style="dim"))
            console.print()

    @staticmethod
    def _comparison(comparison: PresetComparison) -> RichTable:
        from rich.table import Table as RichTable

        table = RichTable(title=f"{comparison.dataset}: each preset's main score")
        table.add_column("Model", overflow="fold")
        for preset in comparison.presets:
            table.add_column(comparison.header(preset), justify="right")
        for model in comparison.scores:
            table.add_row(model, *(comparison.text(model, preset) for preset in comparison.presets))
        return table

    def render(self, results: Results) -> str:
        from rich.console import Console

        console = Console(file=io.StringIO(), width=160, color_system=None, record=True)
        self.show(results, console)
        return console.export_text()


class MarkdownReporter(Reporter):
    """One Markdown table per dataset: best **bold**, within one std of the best _italic_."""

    suffix = ".md"

    def render(self, results: Results) -> str:
        parts = []
        for table in summary_tables(results):
            header = ["Method", *(table.label(m).replace("|", "\\|") for m in table.metrics)]
            lines = [f"### {table.dataset}", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "|".join(["---", *("---:" for _ in table.metrics)]) + "|")
            for row in table.rows:
                cells = [row.label.replace("|", "\\|")]
                for metric in table.metrics:
                    cell = row.cells[metric]
                    text = cell.text()
                    cells.append(f"**{text}**" if cell.best else (f"_{text}_" if cell.within_std else text))
                lines.append("| " + " | ".join(cells) + " |")
                if row.published:
                    paper = ["↳ published", *(row.published_text(m) for m in table.metrics)]
                    lines.append("| " + " | ".join(paper) + " |")
            lines += ["", table.caption, ""]
            parts.append("\n".join(lines))
        for comparison in preset_comparisons(results):
            header = ["Model", *(comparison.header(p).replace("|", "\\|") for p in comparison.presets)]
            lines = [f"### {comparison.dataset}: each preset's main score", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "|".join(["---", *("---:" for _ in comparison.presets)]) + "|")
            for model in comparison.scores:
                cells = [model.replace("|", "\\|"), *(comparison.text(model, p) for p in comparison.presets)]
                lines.append("| " + " | ".join(cells) + " |")
            lines += ["", *(f"- {line}" for line in comparison.agreement_lines()), ""]
            parts.append("\n".join(lines))
        return "\n".join(parts)


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(char, escaped)
    for symbol, command in (("×", r"$\times$"), ("±", r"$\pm$"), ("→", r"$\to$"), ("↓", r"$\downarrow$")):
        text = text.replace(symbol, command)
    return text


class LatexReporter(Reporter):
    """The paper's Table 1 form: booktabs, mean $\\pm$ std, best bold, within one std of the best red."""

    suffix = ".tex"

    def render(self, results: Results) -> str:
        parts = ["% needs \\usepackage{booktabs} and \\usepackage{xcolor}"]
        for table in summary_tables(results):
            columns = "l" + "c" * len(table.metrics)
            header = " & ".join(["Method", *(_latex_escape(table.label(m)) for m in table.metrics)])
            lines = [
                "\\begin{table}[t]",
                "\\centering",
                f"\\caption{{{_latex_escape(table.caption)}}}",
                f"\\begin{{tabular}}{{{columns}}}",
                "\\toprule",
                f"{header} \\\\",
                "\\midrule",
            ]
            for row in table.rows:
                cells = [_latex_escape(row.label)]
                for metric in table.metrics:
                    cell = row.cells[metric]
                    text = cell.text().replace("±", "$\\pm$")
                    if cell.best:
                        text = f"\\textbf{{{text}}}"
                    elif cell.within_std:
                        text = f"\\textcolor{{red}}{{{text}}}"
                    cells.append(text)
                lines.append(" & ".join(cells) + " \\\\")
            lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
            parts.append("\n".join(lines))
        return "\n".join(parts)


class CSVReporter(Reporter):
    """One row per model × dataset × protocol point: every metric's mean and std as recorded (fractions
    for percent metrics), in the columns chosen (results ``columns``) or all of them; for a metric some
    row has a published value of, also ``<metric>_published`` and ``<metric>_delta`` (ours minus
    published). Columns are named by the metrics' names, which programs read; their labels are in
    results.json ``metrics``."""

    suffix = ".csv"

    def render(self, results: Results) -> str:
        if results.columns is not None:
            metrics = list(results.columns)
        else:  # every metric, the headline ones first (as the other reports order their columns)
            names = results.metric_names()
            first = headline_metrics(names)
            metrics = [*first, *(name for name in names if name not in first)]
        metrics = [m for m in metrics if any(m in row.metrics for row in results.summary)]
        compared = [m for m in metrics if any(row.published and m in row.published.metrics for row in results.summary)]
        protocol_fields = [
            "fit_split",
            "eval_split",
            "n_classes",
            "k",
            "overcluster",
            "n_clusters",
            "pca_dims",
            "whiten",
            "epochs",
            "batch_size",
            "backend",
            "preset",
            "algorithm",
            "n_init",
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                "model",
                "dataset",
                *protocol_fields,
                "n_seeds",
                *(f"{m}_{s}" for m in metrics for s in ("mean", "std")),
                *(f"{m}_{s}" for m in compared for s in ("published", "delta")),
            ]
        )
        for row in results.summary:
            values = []
            for metric in metrics:
                summary = row.metrics.get(metric)
                values += (
                    ["", ""]
                    if summary is None
                    else [repr(summary.mean), "" if summary.std is None else repr(summary.std)]
                )
            for metric in compared:
                paper = row.published.metrics.get(metric) if row.published else None
                ours = row.metrics.get(metric)
                values += (
                    ["", ""]
                    if paper is None
                    else [repr(paper.mean), "" if ours is None else repr(ours.mean - paper.mean)]
                )
            writer.writerow(
                [
                    row.model,
                    row.dataset,
                    *(getattr(row.protocol, f) for f in protocol_fields),
                    row.n_seeds,
                    *values,
                ]
            )
        return buffer.getvalue()


class JSONReporter(Reporter):
    """The results file itself."""

    suffix = ".json"

    def render(self, results: Results) -> str:
        return results.to_json()


@hookimpl
def sslbench_register_reporters(register: Callable[[ReporterEntry], None]) -> None:
    register(ReporterEntry("rich", RichReporter(), "terminal table in the paper's Table 1 layout"))
    register(ReporterEntry("md", MarkdownReporter(), "Markdown tables"))
    register(ReporterEntry("csv", CSVReporter(), "CSV, one row per model/dataset/protocol point"))
    register(ReporterEntry("latex", LatexReporter(), "LaTeX table in the paper's Table 1 form"))
    register(ReporterEntry("json", JSONReporter(), "the results JSON"))
    register(
        ReporterEntry(
            "html", HTMLReporter(), "one self-contained HTML page: sortable tables, figures, cluster statistics"
        )
    )
