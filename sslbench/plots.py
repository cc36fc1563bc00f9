"""The paper's figures from results files (``sslbench plot``), PNG and SVG, with matplotlib.

* Figure 1a — k-means ACC against linear top-1: measured, where the results hold the ``linear`` probe's
  ``linear_top1``, else published (the backbone's model card); the legend says which point is which;
* Figure 1b — ARI against ACC; points far from the least-squares line are labelled;
* Figure 2a — ACC and ARI against PCA dimensions, one line per model, error bars = std over seeds;
* Figure 2b — ACC and ARI against the number of clusters, likewise.

A figure is drawn only when the results hold what it needs (a sweep over dims or k, linear top-1s);
:func:`plot_results` returns what it wrote and why it skipped the others; :func:`svg_figures` draws
the same figures as SVG text in memory (the HTML report embeds them).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sslbench.errors import SSLBenchError
from sslbench.results import Results, SummaryRow

if TYPE_CHECKING:
    from sslbench.plugins import Plugins

FORMATS = ("png", "svg")


@dataclass
class PlotOutcome:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FigureSize:
    width_in: float = 6.4
    height_in: float = 4.8
    dpi: int = 100


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SSLBenchError("sslbench plot needs matplotlib: pip install 'sslbench[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _headline_rows(results: Results) -> list[SummaryRow]:
    """One row per model and dataset at the paper's protocol point: k = classes, no overclustering,
    the most PCA dims run; transfer runs (no ``acc``) are left out."""
    best: dict[tuple[str, str], SummaryRow] = {}
    for row in results.summary:
        p = row.protocol
        if "acc" not in row.metrics or p.overcluster != 1.0 or p.k != p.n_classes:
            continue
        key = (row.model, row.dataset)
        if key not in best or p.pca_dims > best[key].protocol.pca_dims:
            best[key] = row
    return list(best.values())


#: The metric the ``linear`` probe records (:mod:`sslbench_plugins.linear_probe`).
MEASURED_LINEAR = "linear_top1"


def linear_top1(row: SummaryRow, plugins: Plugins | None) -> float | None:
    """The row's published linear top-1 in percent: its card's own number, else the one the paper quoted."""
    if plugins is None or row.backbone is None or row.backbone not in plugins.backbones:
        return None
    card = plugins.backbones.get(row.backbone).card
    if card is None:
        return None
    if card.linear_top1 is not None:
        return card.linear_top1.value
    quoted = [p.linear for p in card.paper if p.linear is not None]
    return quoted[0] if quoted else None


def outliers(x: np.ndarray, y: np.ndarray, z: float = 1.5) -> np.ndarray:
    """Points whose residual from the least-squares line exceeds ``z`` residual stds; with fewer
    than four points every point is labelled."""
    if len(x) < 4 or np.ptp(x) == 0:
        return np.ones(len(x), dtype=bool)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    spread = residual.std()
    return np.abs(residual) > z * spread if spread > 0 else np.zeros(len(x), dtype=bool)


def _save(fig: Any, out_dir: Path, stem: str, size: FigureSize, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, format=fmt, dpi=size.dpi)
        paths.append(path)
    return paths


def linear_point(row: SummaryRow, plugins: Plugins | None) -> tuple[float, str] | None:
    """The row's linear top-1 in percent for Figure 1a and where it comes from: ``measured`` by the
    run's linear probe when the row has it, else ``published`` (:func:`linear_top1`); None: neither."""
    if MEASURED_LINEAR in row.metrics:
        return 100 * row.metrics[MEASURED_LINEAR].mean, "measured"
    published = linear_top1(row, plugins)
    return (published, "published") if published is not None else None


#: How Figure 1a's legend names the two kinds of linear top-1.
LINEAR_ORIGINS = {
    "measured": "linear top-1 measured (linear probe)",
    "published": "linear top-1 published (model card)",
}


def _scatter(
    plt: Any,
    points: list[tuple[str, float, float]],
    xlabel: str,
    ylabel: str,
    title: str,
    size: FigureSize,
    series: Sequence[str] | None = None,
) -> Any:
    """A labelled scatter with its least-squares line; ``series`` (one name per point) splits the points
    into legend entries, filled for the first name met, hollow for the others."""
    fig, ax = plt.subplots(figsize=(size.width_in, size.height_in), dpi=size.dpi, layout="constrained")
    x = np.array([p[1] for p in points])
    y = np.array([p[2] for p in points])
    if series is None:
        ax.scatter(x, y, color="tab:blue", zorder=3)
    else:
        names = np.array(series)
        for index, name in enumerate(dict.fromkeys(series)):
            chosen = names == name
            face = "tab:blue" if index == 0 else "none"
            ax.scatter(x[chosen], y[chosen], facecolors=face, edgecolors="tab:blue", zorder=3, label=name)
        ax.legend(fontsize=8)
    for (label, px, py), flagged in zip(points, outliers(x, y), strict=True):
        if flagged:
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(points) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 2)
        ax.plot(grid, slope * grid + intercept, color="0.6", linestyle="--", linewidth=1, zorder=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig


def _sweep_rows(results: Results, field_name: str) -> dict[tuple[str, str], list[SummaryRow]]:
    """Rows of each model × dataset that differ only in ``field_name`` (two values at least)."""
    others = ("n_clusters", "pca_dims", "whiten", "epochs", "backend", "fit_split", "eval_split")
    groups: dict[tuple[Any, ...], list[SummaryRow]] = {}
    for row in results.summary:
        if "acc" not in row.metrics:
            continue
        fixed = tuple(getattr(row.protocol, f) for f in others if f != field_name)
        groups.setdefault((row.model, row.dataset, fixed), []).append(row)
    sweeps: dict[tuple[str, str], list[SummaryRow]] = {}
    for (model, dataset, _), rows in groups.items():
        if len({getattr(r.protocol, field_name) for r in rows}) >= 2 and (model, dataset) not in sweeps:
            sweeps[(model, dataset)] = sorted(rows, key=lambda r: getattr(r.protocol, field_name))
    return sweeps


def _sweep_figure(
    plt: Any,
    *,
    sweeps: dict[tuple[str, str], list[SummaryRow]],
    field_name: str,
    xlabel: str,
    size: FigureSize,
    log_x: bool,
) -> Any:
    fig, axes = plt.subplots(1, 2, figsize=(size.width_in, size.height_in), dpi=size.dpi, layout="constrained")
    several_datasets = len({dataset for _, dataset in sweeps}) > 1
    for (model, dataset), rows in sweeps.items():
        label = f"{model} ({dataset})" if several_datasets else model
        x = [getattr(r.protocol, field_name) for r in rows]
        for ax, metric in zip(axes, ("acc", "ari"), strict=True):
            mean = [100 * r.metrics[metric].mean for r in rows]
            std = [100 * (r.metrics[metric].std or 0.0) for r in rows]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    ticks = sorted({getattr(r.protocol, field_name) for rows in sweeps.values() for r in rows})
    for ax, name in zip(axes, ("ACC (%)", "ARI (%)"), strict=True):
        ax.set(xlabel=xlabel, ylabel=name)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


@dataclass(frozen=True)
class FigurePlan:
    """One figure that the results support, not yet drawn: ``make(plt)`` returns the matplotlib figure."""

    stem: str
    title: str
    make: Callable[[Any], Any]
    #: What a reader must know about this drawing (Figure 1a: which linear top-1s are measured).
    note: str = ""


def plan_figures(
    results: Results, *, plugins: Plugins | None = None, size: FigureSize = FigureSize()
) -> tuple[list[FigurePlan], list[str]]:
    """The figures the results support, in the paper's order, and why each other one is skipped."""
    plans: list[FigurePlan] = []
    skipped: list[str] = []
    headline = _headline_rows(results)
    with_linear = [(row, linear_point(row, plugins)) for row in headline]
    linear_points = [(row.model, p[0], 100 * row.metrics["acc"].mean) for row, p in with_linear if p is not None]
    origins = [LINEAR_ORIGINS[p[1]] for _, p in with_linear if p is not None]
    if len(linear_points) >= 2:
        measured = [row.model for row, p in with_linear if p is not None and p[1] == "measured"]
        note = (
            "Linear top-1 measured by the run's linear probe for every model."
            if len(measured) == len(linear_points)
            else f"Linear top-1 measured by the run's linear probe for {', '.join(measured)}; "
            "published (model card) for the others."
            if measured
            else "Linear top-1 published (model cards); with the linear probe a run places each model at its own."
        )
        plans.append(
            FigurePlan(
                "fig1_acc_vs_linear",
                "Figure 1a: ACC vs linear",
                lambda plt: _scatter(
                    plt,
                    linear_points,
                    "linear top-1 (%)",
                    "k-means ACC (%)",
                    "Figure 1a: ACC vs linear",
                    size,
                    origins,
                ),
                note,
            )
        )
    else:
        skipped.append(
            f"fig1_acc_vs_linear: {len(linear_points)} model(s) with a linear top-1 (measured by the linear probe "
            "or in their card); 2 needed"
        )
    ari_points = [(row.model, 100 * row.metrics["acc"].mean, 100 * row.metrics["ari"].mean) for row in headline]
    if len(ari_points) >= 2:
        plans.append(
            FigurePlan(
                "fig1_ari_vs_acc",
                "Figure 1b: ARI vs ACC",
                lambda plt: _scatter(plt, ari_points, "ACC (%)", "ARI (%)", "Figure 1b: ARI vs ACC", size),
            )
        )
    else:
        skipped.append(f"fig1_ari_vs_acc: {len(ari_points)} model(s) at the paper's protocol point; 2 needed")
    for field_name, stem, xlabel, title in (
        ("pca_dims", "fig2_dims", "PCA dimensions", "Figure 2a: ACC and ARI vs PCA dimensions"),
        ("n_clusters", "fig2_clusters", "clusters", "Figure 2b: ACC and ARI vs the number of clusters"),
    ):
        sweeps = _sweep_rows(results, field_name)
        if sweeps:
            plans.append(
                FigurePlan(
                    stem,
                    title,
                    partial(_sweep_figure, sweeps=sweeps, field_name=field_name, xlabel=xlabel, size=size, log_x=True),
                )
            )
        else:
            skipped.append(f"{stem}: no sweep over {xlabel} in the results")
    return plans, skipped


def plot_results(
    results: Results,
    out_dir: Path,
    *,
    plugins: Plugins | None = None,
    size: FigureSize = FigureSize(),
    formats: Sequence[str] = FORMATS,
) -> PlotOutcome:
    """Write every figure the results support to ``out_dir`` (``fig1_acc_vs_linear.png`` …)."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SSLBenchError(f"unknown figure format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    plans, skipped = plan_figures(results, plugins=plugins, size=size)
    outcome = PlotOutcome(skipped=skipped)
    for plan in plans:
        fig = plan.make(plt)
        try:
            outcome.written += _save(fig, out_dir, plan.stem, size, formats)
        finally:
            plt.close(fig)
    return outcome


def svg_figures(
    results: Results, *, plugins: Plugins | None = None, size: FigureSize = FigureSize()
) -> tuple[list[tuple[FigurePlan, str]], list[str]]:
    """Every figure the results support as an SVG document drawn in memory (text kept as text, ids
    stable for a given figure), and why the others are skipped; :class:`SSLBenchError` without matplotlib."""
    plt = _pyplot()
    import matplotlib

    plans, skipped = plan_figures(results, plugins=plugins, size=size)
    drawn = []
    for plan in plans:
        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"sslbench-{plan.stem}"}):
            fig = plan.make(plt)
            try:
                buffer = io.StringIO()
                fig.savefig(
                    buffer, format="svg", dpi=size.dpi, metadata=dict.fromkeys(("Creator", "Date", "Format", "Type"))
                )
            finally:
                plt.close(fig)
        drawn.append((plan, buffer.getvalue()))
    return drawn, skipped
