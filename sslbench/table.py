"""The paper's Table 1 layout computed from results: one table per dataset, best and near-best marked.

Reporters render these tables; they do not recompute anything. Each column is a metric, shown as its
descriptor in the results says (:class:`~sslbench.results.MetricInfo`: label, percent or raw, which
way is better). A value is *best* when its mean is the column's best (the maximum, or the minimum for
a lower-is-better metric), and *within one std* when it is not best but lies no further from the best
mean than the best row's std, on the worse side (the paper's red marks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sslbench.results import HEADLINE_METRICS, MetricInfo, Results, RunProtocol, SummaryRow
from sslbench.transfer import TRANSFER_METRICS

#: The columns shown first for rows of data without labels: the label-free scores (plugins/label_free.py).
LABEL_FREE_HEADLINE = ("silhouette", "davies_bouldin", "calinski_harabasz", "rankme")


def headline_metrics(names: Iterable[str]) -> tuple[str, ...]:
    """The columns shown first for rows holding ``names``: Table C.2's for transfer rows, else Table 1's,
    else (rows of data without labels) the label-free scores."""
    present = set(names)
    chosen: tuple[str, ...]
    if "acc_tr" in present:
        chosen = TRANSFER_METRICS
    else:
        chosen = HEADLINE_METRICS if present.intersection(HEADLINE_METRICS) else LABEL_FREE_HEADLINE
    return tuple(m for m in chosen if m in present)


def default_metrics(summaries: list[SummaryRow], describe: Mapping[str, MetricInfo]) -> tuple[str, ...]:
    """The columns for these rows when none were chosen: the rows' preset's main score (when they share
    one), the headline metrics (:func:`headline_metrics`), then every other metric every row has, in the
    order of ``describe`` (the results' descriptor table: registered metrics, class groups, transfer,
    kNN), except that of the metrics restricted to a class group only the ACC is shown (Table 2's in /
    not in ImageNet split; the others are chosen by name)."""
    present = set.intersection(*(set(row.metrics) for row in summaries)) if summaries else set()
    main = {row.protocol.main_score for row in summaries}
    # Transfer rows keep Table C.2's columns first: a preset's main score is of its own dataset's runs.
    lead = tuple(main & present) if len(main) == 1 and "acc_tr" not in present else ()
    first = (*lead, *(m for m in headline_metrics(present) if m not in lead))
    group_column = HEADLINE_METRICS[0]
    rest = [
        name
        for name, info in describe.items()
        if name in present and name not in first and (info.group is None or info.of == group_column)
    ]
    return (*first, *rest)


@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None
    info: MetricInfo
    best: bool = False
    within_std: bool = False

    def text(self) -> str:
        """Mean ± std as the metric is shown: ``23.09 ± 0.16`` (percent), ``1.52 ± 0.03`` (raw)."""
        mean = self.info.text(self.mean)
        return mean if self.std is None else f"{mean} ± {self.info.text(self.std)}"


@dataclass(frozen=True)
class Row:
    label: str
    summary: SummaryRow
    cells: dict[str, Cell]
    #: The published value of the same row.
    published: dict[str, Cell] | None = None

    def published_text(self, metric: str) -> str:
        """``"23.09 ± 0.16 (−0.41, within std)"``: the published value, our difference (in points for a
        percent metric), and whether ours lies within the published std; empty when nothing was published."""
        cell = (self.published or {}).get(metric)
        if cell is None:
            return ""
        info = cell.info
        difference = self.cells[metric].mean - cell.mean
        within = cell.std is not None and abs(info.scaled(difference)) <= info.scaled(cell.std)
        delta = info.text(difference)
        return f"{cell.text()} ({'' if delta.startswith('-') else '+'}{delta}{', within std' if within else ''})"


@dataclass(frozen=True)
class Table:
    dataset: str
    metrics: tuple[str, ...]
    rows: list[Row]
    caption: str
    #: The descriptor of every column.
    info: dict[str, MetricInfo]

    def label(self, metric: str) -> str:
        """A column's title: the metric's label, with ↓ when lower is better."""
        info = self.info[metric]
        return f"{info.label} ↓" if info.better == "lower" else info.label


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


def _caption(
    dataset: str, summaries: list[SummaryRow], varying: list[str], wall_s: float, shown: Mapping[str, MetricInfo]
) -> str:
    """The table's caption as prose: what was fitted where, with what, over how many seeds."""
    protocols = [row.protocol for row in summaries]
    first = protocols[0]
    clusters = _values(protocols, "n_clusters")
    classes = (
        f"{first.n_classes} classes"
        if first.n_classes
        else "no class labels: only label-free scores, no metric that compares clusters with classes"
    )
    sentences = [
        f"{dataset}: fitted on {first.fit_split}, scored on {first.eval_split} ({classes})",
        f"{clusters} cluster{'s' if clusters != '1' else ''}",
    ]
    dims = {p.pca_dims for p in protocols}
    if not first.pca:
        sentences.append("no PCA")
    elif "pca_dims" in varying:
        sentences.append("PCA dimensions as in each row")
    elif len(dims) == 1:
        sentences.append(f"PCA to {first.pca_dims} dimensions")
    else:  # one value per model: all of each model's components
        sentences.append(f"PCA to each model's dimension ({min(dims)} to {max(dims)})")
    if first.algorithm != "minibatch":
        restarts = f", best of {first.n_init} initialisations" if first.n_init > 1 else ""
        sentences.append(f"{first.algorithm} k-means, at most {first.max_iter} iterations{restarts}")
    seeds = sorted({row.n_seeds for row in summaries})
    count = " or ".join(str(s) for s in seeds)
    sentences.append(f"mean ± std over {count} seed{'s' if seeds != [1] else ''}")
    sentences.append(f"{_values(protocols, 'backend')} backend, {wall_s:.1f} s in all")
    text = "; ".join(sentences) + ". Bold: best; marked: within one std of the best."
    raw = [info.label for info in shown.values() if info.unit == "raw"]
    lower = [info.label for info in shown.values() if info.better == "lower"]
    if raw:
        text += f" Not in percent: {', '.join(raw)}."
    if lower:
        text += f" Lower is better (↓): {', '.join(lower)}."
    return text


def _disambiguated(labels: list[str], summaries: list[SummaryRow]) -> list[str]:
    """Rows that would read the same (merged files of one model) get their source file appended."""
    counts = {label: labels.count(label) for label in labels}
    return [
        f"{label} [{row.source}]" if counts[label] > 1 and row.source else label
        for label, row in zip(labels, summaries, strict=True)
    ]


def summary_tables(results: Results, metrics: tuple[str, ...] | None = None) -> list[Table]:
    """One table per dataset. The columns: ``metrics``, else the results' chosen ``columns``, else
    :func:`default_metrics` of each table's rows; of those, the ones every row of the table has."""
    chosen = metrics if metrics is not None else results.columns
    describe = {name: results.metric_info(name) for name in results.metric_names()}
    several = len({row.protocol.preset for row in results.summary}) > 1
    # One table per dataset, or per dataset and preset when the results hold several presets.
    groups = list(dict.fromkeys((row.dataset, row.protocol.preset if several else None) for row in results.summary))
    tables = []
    for dataset, preset in groups:
        summaries = [row for row in results.summary if row.dataset == dataset and preset in (None, row.protocol.preset)]
        varying = [
            field
            for field, _ in _VARYING
            if any(
                len({getattr(row.protocol, field) for row in summaries if row.model == model}) > 1
                for model in {row.model for row in summaries}
            )
        ]
        wanted = chosen if chosen is not None else default_metrics(summaries, describe)
        shown = {m: describe[m] for m in wanted if all(m in row.metrics for row in summaries)}
        best = {m: info.best(row.metrics[m].mean for row in summaries) for m, info in shown.items()}
        # The std that decides "within": the best row's (the first of them when several tie).
        spread: dict[str, float | None] = {}
        for metric in shown:
            top = next((row.metrics[metric] for row in summaries if row.metrics[metric].mean == best[metric]), None)
            spread[metric] = top.std if top is not None else None
        rows = []
        labels = _disambiguated([_row_label(summary, varying) for summary in summaries], summaries)
        for summary, label in zip(summaries, labels, strict=True):
            cells = {}
            for metric, info in shown.items():
                value = summary.metrics[metric]
                is_best = value.mean == best[metric]
                top_std = spread[metric]
                within = not is_best and top_std is not None and info.within(value.mean, best[metric], top_std)
                cells[metric] = Cell(value.mean, value.std, info, is_best, within)
            published = None
            if summary.published is not None:
                published = {
                    m: Cell(v.mean, v.std, shown[m]) for m, v in summary.published.metrics.items() if m in shown
                }
            rows.append(Row(label, summary, cells, published))
        title = dataset if preset is None else f"{dataset}, preset {preset}"
        caption = _caption(title, summaries, varying, results.wall_s, shown)
        tables.append(Table(title, tuple(shown), rows, caption, shown))
    return tables


# --------------------------------------------------------------------------------------------------
# Presets side by side


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two rankings (ties in either counted as neither concordant nor discordant, the
    denominator corrected for them); NaN when either has no two distinct values."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


@dataclass(frozen=True)
class PresetComparison:
    """One dataset's models under each preset: each preset's main score, and how the presets rank the models
    alike (Kendall's τ-b over the models every preset scored)."""

    dataset: str
    presets: tuple[str, ...]
    #: Per preset, the metric its scores are (its main score) and how it is shown.
    main: dict[str, MetricInfo]
    main_names: dict[str, str]
    #: Per model, per preset, the mean main score over seeds (absent: that preset did not score it).
    scores: dict[str, dict[str, float]]
    #: ``(preset a, preset b, τ, models ranked)`` for every pair of presets.
    agreement: list[tuple[str, str, float, int]]

    def text(self, model: str, preset: str) -> str:
        value = self.scores[model].get(preset)
        return "—" if value is None else self.main[preset].text(value)

    def header(self, preset: str) -> str:
        return f"{preset}: {self.main[preset].label}"

    def agreement_lines(self) -> list[str]:
        """``Kendall τ mieb vs temi: 0.67 over 4 models`` for every pair of presets."""
        return [
            f"Kendall τ {a} vs {b}: "
            + (f"{tau:.2f} over {n} models" if math.isfinite(tau) else f"undefined over {n} model(s) (no two ranked)")
            for a, b, tau, n in self.agreement
        ]


def preset_comparisons(results: Results) -> list[PresetComparison]:
    """Per dataset scored under several presets: each model's main score under each preset and the
    rank agreement of the models between every two presets. A model × preset with several protocol points
    (a sweep) shows its first."""
    comparisons = []
    for dataset in dict.fromkeys(row.dataset for row in results.summary):
        rows = [row for row in results.summary if row.dataset == dataset]
        presets = tuple(dict.fromkeys(row.protocol.preset for row in rows))
        if len(presets) < 2:
            continue
        main_names = {row.protocol.preset: row.protocol.main_score for row in reversed(rows)}
        scores: dict[str, dict[str, float]] = {}
        for row in rows:
            metric = row.metrics.get(row.protocol.main_score)
            if metric is not None:
                scores.setdefault(row.model, {}).setdefault(row.protocol.preset, metric.mean)
        agreement = []
        for a_index, a in enumerate(presets):
            for b in presets[a_index + 1 :]:
                both = [m for m, by in scores.items() if a in by and b in by]
                tau = kendall_tau([scores[m][a] for m in both], [scores[m][b] for m in both])
                agreement.append((a, b, tau, len(both)))
        main = {p: results.metric_info(main_names[p]) for p in presets}
        comparisons.append(PresetComparison(dataset, presets, main, main_names, scores, agreement))
    return comparisons
