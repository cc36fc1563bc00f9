"""The paper's Table 1 layout computed from results: one table per dataset, best and near-best marked.

Reporters render these tables; they do not recompute anything. A value is *best* when its mean is
the column maximum, and *within one std* when it is not best but its mean is at least the best mean
minus the best row's std (the paper's red marks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sslbench.results import Results, RunProtocol, SummaryRow
from sslbench.transfer import TRANSFER_METRICS

#: The columns of the paper's Table 1.
HEADLINE_METRICS = ("acc", "ari", "ami", "nmi")
METRIC_LABELS = {
    "acc": "ACC",
    "acc_majority": "ACC-maj",
    "acc_eval_assignment": "ACC-eval",
    "ari": "ARI",
    "ami": "AMI",
    "nmi": "NMI",
    "v_measure": "V",
    "fowlkes_mallows": "FM",
    "acc_tr": "ACC-tr",
    "acc_val": "ACC-val",
    "single_cluster": "1 cluster",
}


#: kNN top-1 columns: ``knn_top1_k20`` → ``kNN-20``.
KNN_METRIC = re.compile(r"^knn_top1_k(\d+)$")


def metric_label(name: str) -> str:
    """Column title: ``ACC``, ``ACC-tr``, ``kNN-20`` for ``knn_top1_k20``, and ``ACC in imagenet`` for a
    class group's ``acc_in_imagenet``."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    knn = KNN_METRIC.match(name)
    if knn:
        return f"kNN-{knn.group(1)}"
    if name.startswith("acc_"):
        return "ACC " + name[len("acc_") :].replace("_", " ")
    return name


def default_metrics(summaries: list[SummaryRow]) -> tuple[str, ...]:
    """The paper's columns for these rows: Table C.2's for transfer runs, else Table 1's, followed by
    the per-class-group ACCs when every row has them (Table 2's in / not in ImageNet split), then the kNN
    top-1 columns (``protocol.knn``, by increasing k) when every row has them."""
    present = set.intersection(*(set(row.metrics) for row in summaries)) if summaries else set()
    if "acc_tr" in present:
        return TRANSFER_METRICS
    # Every metric is also recorded per class group as <metric>_<group>; a group's column is its ACC.
    # acc_<x> is a group's when ari_<x> exists too (acc_majority_<group> has no ari_majority_<group>).
    groups = sorted(m for m in present if m.startswith("acc_") and m not in METRIC_LABELS and f"ari{m[3:]}" in present)
    knn = sorted((m for m in present if KNN_METRIC.match(m)), key=lambda m: int(m[len("knn_top1_k") :]))
    return (*HEADLINE_METRICS, *groups, *knn)


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None
    best: bool = False
    within_std: bool = False

    def text(self) -> str:
        """Percent with two decimals: ``23.09 ± 0.16``."""
        mean = f"{100 * self.mean:.2f}"
        return mean if self.std is None else f"{mean} ± {100 * self.std:.2f}"


@dataclass(frozen=True)
class Row:
    label: str
    summary: SummaryRow
    cells: dict[str, Cell]
    #: The published value of the same row.
    published: dict[str, Cell] | None = None

    def published_text(self, metric: str) -> str:
        """``"23.09 ± 0.16 (−0.41, within std)"``: the published value, our difference in points,
        and whether ours lies within the published std; empty when nothing was published."""
        cell = (self.published or {}).get(metric)
        if cell is None:
            return ""
        delta = 100 * (self.cells[metric].mean - cell.mean)
        within = cell.std is not None and abs(delta) <= 100 * cell.std
        return f"{cell.text()} ({delta:+.2f}{', within std' if within else ''})"


@dataclass(frozen=True)
class Table:
    dataset: str
    metrics: tuple[str, ...]
    rows: list[Row]
    caption: str


_VARYING = (
    ("n_clusters", lambda p: f"k={p.n_clusters}"),
    ("overcluster", lambda p: f"{p.overcluster:g}× over."),
    ("pca_dims", lambda p: f"PCA {p.pca_dims}"),
    ("whiten", lambda p: "whitened" if p.whiten else "unwhitened"),
    ("epochs", lambda p: f"{p.epochs} ep."),
    ("backend", lambda p: p.backend),
)


def _row_label(row: SummaryRow, varying: list[str]) -> str:
    tags = [fmt(row.protocol) for field, fmt in _VARYING if field in varying]
    return f"{row.model} ({', '.join(tags)})" if tags else row.model


def _values(protocols: list[RunProtocol], field: str) -> str:
    """``10 and 15``, ``10, 15 and 20``: the distinct values, read as a list in a sentence."""
    values = [f"{v:g}" if isinstance(v, float) else str(v) for v in sorted({getattr(p, field) for p in protocols})]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def _caption(dataset: str, summaries: list[SummaryRow], varying: list[str], wall_s: float) -> str:
    """The table's caption as prose: what was fitted where, with what, over how many seeds."""
    protocols = [row.protocol for row in summaries]
    first = protocols[0]
    clusters = _values(protocols, "n_clusters")
    sentences = [
        f"{dataset}: fitted on {first.fit_split}, scored on {first.eval_split} ({first.n_classes} classes)",
        f"{clusters} cluster{'s' if clusters != '1' else ''}",
    ]
    dims = {p.pca_dims for p in protocols}
    if "pca_dims" in varying:
        sentences.append("PCA dimensions as in each row")
    elif len(dims) == 1:
        sentences.append(f"PCA to {first.pca_dims} dimensions")
    else:  # one value per model: all of each model's components
        sentences.append(f"PCA to each model's dimension ({min(dims)} to {max(dims)})")
    seeds = sorted({row.n_seeds for row in summaries})
    count = " or ".join(str(s) for s in seeds)
    sentences.append(f"mean ± std over {count} seed{'s' if seeds != [1] else ''}")
    sentences.append(f"{_values(protocols, 'backend')} backend, {wall_s:.1f} s in all")
    return "; ".join(sentences) + ". Bold: best; marked: within one std of the best."


def _disambiguated(labels: list[str], summaries: list[SummaryRow]) -> list[str]:
    """Rows that would read the same (merged files of one model) get their source file appended."""
    counts = {label: labels.count(label) for label in labels}
    return [
        f"{label} [{row.source}]" if counts[label] > 1 and row.source else label
        for label, row in zip(labels, summaries, strict=True)
    ]


def summary_tables(results: Results, metrics: tuple[str, ...] | None = None) -> list[Table]:
    """One table per dataset; ``metrics`` (default: :func:`default_metrics` of each table's rows)
    are the columns, those that every row has."""
    datasets = list(dict.fromkeys(row.dataset for row in results.summary))
    tables = []
    for dataset in datasets:
        summaries = [row for row in results.summary if row.dataset == dataset]
        varying = [
            field
            for field, _ in _VARYING
            if any(
                len({getattr(row.protocol, field) for row in summaries if row.model == model}) > 1
                for model in {row.model for row in summaries}
            )
        ]
        wanted = metrics if metrics is not None else default_metrics(summaries)
        shown = tuple(m for m in wanted if all(m in row.metrics for row in summaries))
        best: dict[str, SummaryRow] = {}
        for metric in shown:
            best[metric] = max(summaries, key=lambda row: row.metrics[metric].mean)
        rows = []
        labels = _disambiguated([_row_label(summary, varying) for summary in summaries], summaries)
        for summary, label in zip(summaries, labels, strict=True):
            cells = {}
            for metric in shown:
                value = summary.metrics[metric]
                top = best[metric].metrics[metric]
                is_best = value.mean == top.mean
                within = not is_best and top.std is not None and value.mean >= top.mean - top.std
                cells[metric] = Cell(value.mean, value.std, is_best, within)
            published = None
            if summary.published is not None:
                published = {m: Cell(v.mean, v.std) for m, v in summary.published.metrics.items() if m in shown}
            rows.append(Row(label, summary, cells, published))
        tables.append(Table(dataset, shown, rows, _caption(dataset, summaries, varying, results.wall_s)))
    return tables
