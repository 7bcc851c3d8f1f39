"""The study's standard figures (docs/design.md §5: every figure names its data), saved as PNG + PDF.

Every ``plot_*`` function returns a matplotlib Figure drawn under :func:`use_style` (seaborn
"paper" context, "ticks" style, colour-blind palette, constrained layout, sizes 3.4–7 in) and
takes ``title`` and ``subtitle``; put the data label and profile in the subtitle so each figure
names its data (``reporting.describe_data``). Titles, subtitles and captions are wrapped to the
figure's width (:func:`wrap_to_width`), so a long data label adds lines instead of shrinking the
plot; code names of predictors and arms come with plain words (:func:`predictor_label`,
:func:`arm_label`). Figures stay readable in greyscale: series differ by marker, line style or
hatch, and heat-map cells carry their number. Save with
:func:`savefig`, which writes ``<stem>.png`` (200 dpi) and ``<stem>.pdf`` (TrueType fonts, no
creation date, so the bytes are stable across reruns) atomically, displays it inline when run in
a Jupyter kernel, and closes the figure.

    >>> from hmqat.study import plotting, reporting
    >>> label = reporting.describe_data("cifar10", train.source)            # doctest: +SKIP
    >>> fig = plotting.plot_layer_traces(traces, subtitle=f"{label}; profile quick")  # +SKIP
    >>> plotting.savefig(fig, Path("results/quick/figures/layer_traces"))  # doctest: +SKIP
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator
from scipy.stats import spearmanr

from ..runtime import atomic_write_bytes, in_notebook
from . import reporting

__all__ = [
    "HATCHES",
    "LINESTYLES",
    "MARKERS",
    "PREDICTOR_WORDS",
    "PlotError",
    "arm_label",
    "plot_ablation",
    "plot_across_models",
    "nearest_uniform_pairs",
    "plot_accuracy_size",
    "plot_additivity",
    "plot_bit_heatmap",
    "plot_frontier",
    "plot_kendall",
    "plot_layer_traces",
    "plot_noise_check",
    "plot_omega_validation",
    "plot_ptq_frontier",
    "plot_qat_level",
    "plot_single_layer",
    "plot_training_curves",
    "plot_transition_diagnostics",
    "plot_walk",
    "predictor_label",
    "savefig",
    "use_style",
    "wrap_to_width",
]

#: Series styles that survive greyscale printing (used in this order).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
HATCHES = ("", "///", "...", "xx", "\\\\\\", "++", "oo", "--")
PNG_DPI = 200
LABEL_BOX = {"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75}
STYLE_RC: dict[str, Any] = {
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42,          # TrueType, not Type 3 (venues reject Type 3)
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "svg.hashsalt": "hmqat",
    "savefig.dpi": PNG_DPI,
    "axes.spines.right": False,
    "axes.spines.top": False,
    "hatch.linewidth": 0.6,
}


class PlotError(ValueError):
    """The data handed to a plot function does not have the expected columns or values."""


# --------------------------------------------------------------------------------------------
# Style and saving
# --------------------------------------------------------------------------------------------
@contextmanager
def use_style() -> Iterator[None]:
    """Apply the study's seaborn theme (notebooks.md §6) for the ``with`` block only; the
    previous rcParams come back afterwards."""
    with mpl.rc_context():
        sns.set_theme(context="paper", style="ticks", palette="colorblind", rc=STYLE_RC)
        yield


def savefig(fig: Figure, stem: str | os.PathLike, *, formats: Sequence[str] = ("png", "pdf"),
            dpi: int = PNG_DPI, show: bool | None = None) -> list[Path]:
    """Write ``fig`` to ``<stem>.png`` and ``<stem>.pdf`` atomically (temporary file in the same
    folder, then ``os.replace``; docs/design.md §4), show it inline, and close it. The PDF has no
    creation date and TrueType fonts, so rebuilding and saving the same figure gives the same
    bytes. An unknown format raises before anything is written and leaves the figure open.

    ``show``: display the figure in the cell's output before closing it (an ``image/png``
    output in an executed notebook, in JupyterLab and on GitHub); None = when running inside a
    Jupyter kernel. Closing a figure that was never displayed would leave the cell without it."""
    stem = Path(stem)
    unknown = [f for f in formats if f not in ("png", "pdf", "svg")]
    if unknown:
        raise PlotError(f"unsupported figure format(s) {unknown}; use 'png', 'pdf' or 'svg'")
    metadata = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with use_style():
            for fmt in formats:
                buf = io.BytesIO()
                fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata[fmt],
                            bbox_inches="tight", pad_inches=0.03)
                written.append(atomic_write_bytes(stem.with_name(f"{stem.name}.{fmt}"),
                                                  buf.getvalue()))
        if show or (show is None and in_notebook()):
            from IPython.display import display
            display(fig)
    finally:
        plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PlotError(f"{what} lacks column(s) {missing}; it has {list(df.columns)}")
    if len(df) == 0:
        raise PlotError(f"{what} is empty; there is nothing to plot")


def _text_width_px(fig: Figure, text: str, fontsize: str | float) -> float:
    """Width of ``text`` in display pixels at ``fontsize``, as the figure's renderer draws it."""
    prop = mpl.font_manager.FontProperties(size=fontsize)
    try:
        renderer = fig.canvas.get_renderer()
        return float(renderer.get_text_width_height_descent(text, prop, ismath=False)[0])
    except AttributeError:       # a canvas without a renderer: ~0.6 em per character
        return 0.6 * prop.get_size_in_points() * len(text) * fig.dpi / 72


def wrap_to_width(fig: Figure, text: str, fontsize: str | float = "medium",
                  fraction: float = 0.92) -> str:
    """``text`` with its words wrapped so that no line is wider than ``fraction`` of the
    figure's width (measured with the figure's renderer). Existing line breaks are kept.

    A title or caption wider than the figure does not shrink the figure: ``savefig(...,
    bbox_inches="tight")`` widens the saved canvas to hold it, so the axes end up in a
    fraction of the image (the subtitle of the quick run's Kendall figure made a 2,161-px-wide
    PNG whose plot filled a third of it). Every figure's title, subtitle and caption go
    through this function."""
    limit = fraction * fig.get_figwidth() * fig.dpi
    out: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and _text_width_px(fig, trial, fontsize) > limit:
                out.append(line)
                line = word
            else:
                line = trial
        out.append(line)
    return "\n".join(out)


def _titles(fig: Figure, title: str | None, subtitle: str | None) -> None:
    """Title and subtitle (data label + profile) as the figure's suptitle, each wrapped to
    the figure's width (:func:`wrap_to_width`), so a long data label adds lines, not width."""
    lines = [wrap_to_width(fig, t, "medium") for t in (title, subtitle) if t]
    if lines:
        fig.suptitle("\n".join(lines), fontsize="medium")


def _legend_below(fig: Figure, handles: Sequence[Any], labels: Sequence[str], *,
                  caption: str | None = None, max_cols: int = 3) -> mpl.legend.Legend:
    """One legend for the whole figure, under the axes (outside the data), with ``caption``
    (wrapped) as its title; as many columns (≤ ``max_cols``) as fit the figure's width."""
    title = wrap_to_width(fig, caption, "x-small") if caption else None
    ncols = max(1, min(max_cols, len(handles)))
    while True:
        legend = fig.legend(handles=list(handles), labels=list(labels),
                            loc="outside lower center", ncols=ncols, fontsize="x-small",
                            frameon=False, title=title, title_fontsize="x-small",
                            alignment="left")
        legend.get_title().set_color("0.2")
        fig.canvas.draw()
        if ncols == 1 or legend.get_window_extent().width <= fig.get_figwidth() * fig.dpi:
            return legend
        legend.remove()
        ncols -= 1


def _caption(fig: Figure, text: str | None) -> None:
    """A caption under the axes (the figure's supxlabel, so constrained layout makes room for
    it), wrapped to the figure's width: where a figure's labels need plain words."""
    if text:
        fig.supxlabel(wrap_to_width(fig, text, "x-small"), fontsize="x-small", color="0.2",
                      multialignment="left")


#: Plain words for the study's predictors and Ω variants (docs/method.md §3, the variants
#: table), used by the figures that show them by code name.
PREDICTOR_WORDS: dict[str, str] = {
    "joint": "HMQAT Ω: trace × quant. error",
    "trace_size": "trace × step size²",
    "trace": "trace alone",
    "param_size": "layer size alone",
    "qerr_only": "quant. error alone",
    "size_only": "quant. error alone",
    "permuted_trace": "error × shuffled traces",
    "random": "error × shuffled traces",
    "fisher": "diagonal Fisher × error²",
    "exact_quad": "exact ΔWᵀHΔW",
    "n_2bit": "count of 2-bit layers",
    "avg_bits": "average bits",
    "loss_increase": "PTQ loss increase",
}


def predictor_label(name: str) -> str:
    """``"quant. error alone (qerr_only)"`` for ``"omega_qerr_only"`` or ``"qerr_only"``: the
    plain words of :data:`PREDICTOR_WORDS` with the code name that the tables use; an unknown
    name stays as it is."""
    code = str(name).removeprefix("omega_")
    words = PREDICTOR_WORDS.get(code)
    return f"{words} ({code})" if words else code


def _size(width: float, height: float) -> tuple[float, float]:
    """Clip a figure size to the journal range: 3.4–7 in wide, 2.4–9 in high."""
    return float(np.clip(width, 3.4, 7.0)), float(np.clip(height, 2.4, 9.0))


def _scale_for(values: np.ndarray, *, log_span: float = 1.0) -> tuple[str, dict[str, Any]]:
    """("log", {}) when every finite value is positive (and max/min ≥ ``log_span``), otherwise
    ("symlog", {linthresh}) when some are ≤ 0, else ("linear", {})."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return "linear", {}
    if (v > 0).all():
        return ("log", {}) if v.max() / v.min() >= log_span else ("linear", {})
    pos = np.abs(v[v != 0])
    return "symlog", {"linthresh": float(pos.min()) if pos.size else 1.0}


def _symlog_ticks(values: np.ndarray, linthresh: float, max_per_side: int = 3) -> list[float]:
    """0 and ±powers of ten outside the linear region (≥ 10·linthresh), at most
    ``max_per_side`` per sign (every k-th decade): a symlog axis otherwise labels −t, 0 and t
    with t = linthresh, which print on top of each other."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    top = float(np.abs(v).max()) if v.size else linthresh
    lo = math.floor(math.log10(linthresh)) + 1
    hi = max(lo, math.ceil(math.log10(max(top, linthresh))))
    decades = list(range(lo, hi + 1))
    stride = max(1, math.ceil(len(decades) / max_per_side))
    mags = [10.0 ** d for d in decades[::-1][::stride]]
    ticks = [0.0]
    if (v > 0).any():
        ticks += mags
    if (v < 0).any():
        ticks += [-m for m in mags]
    return sorted(ticks)


def _set_scale(ax: plt.Axes, axis: str, values: np.ndarray, *, log_span: float = 1.0) -> str:
    scale, kw = _scale_for(values, log_span=log_span)
    if scale == "log":
        kw = {"nonpositive": "clip"}
    (ax.set_xscale if axis == "x" else ax.set_yscale)(scale, **kw)
    if scale == "symlog":
        target = ax.xaxis if axis == "x" else ax.yaxis
        target.set_major_locator(FixedLocator(_symlog_ticks(values, kw["linthresh"])))
        target.set_minor_locator(NullLocator())
    return scale


#: Label positions tried in order, relative to the labelled point: (dx, dy) in points, ha, va.
_LABEL_OFFSETS = ((5, -4, "left", "top"), (5, 4, "left", "bottom"), (-5, -4, "right", "top"),
                  (-5, 4, "right", "bottom"), (0, -8, "center", "top"),
                  (0, 8, "center", "bottom"))


def _box_distance(box: Any, xy: np.ndarray) -> np.ndarray:
    """Distance (display units) from a Bbox to each point of ``xy`` (N×2); 0 inside it."""
    dx = np.maximum(np.maximum(box.x0 - xy[:, 0], xy[:, 0] - box.x1), 0)
    dy = np.maximum(np.maximum(box.y0 - xy[:, 1], xy[:, 1] - box.y1), 0)
    return np.hypot(dx, dy)


def _place_labels(ax: plt.Axes,
                  labels: Sequence[tuple[str, Sequence[tuple[float, float]], dict]],
                  points: np.ndarray, *, marker_radius: float = 4.0,
                  avoid: Sequence[Any] = ()) -> None:
    """Annotate each (text, anchors, annotate kwargs): at the first anchor (data xy) and offset
    of ``_LABEL_OFFSETS`` whose box lies inside the axes, overlaps no earlier label, no legend,
    no artist in ``avoid`` and no marker in ``points`` (data coordinates, N×2; a marker is a
    square of ``marker_radius`` points) other than the anchor's own, and is closer to its own
    point than to any other marker (so it cannot be read as another point's label). If no
    position is free, the one with the fewest clashes. Greedy, in order, on the figure's final
    layout (so call it after the axes' limits and legend are set)."""
    fig = ax.figure
    fig.canvas.draw()                          # run constrained layout: positions are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    r = marker_radius * fig.dpi / 72
    xy_px = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
    markers = [mpl.transforms.Bbox.from_extents(px - r, py - r, px + r, py + r)
               for px, py in xy_px]
    legend = ax.get_legend()
    taken = [a.get_window_extent(renderer) for a in avoid]
    if legend is not None:
        box = legend.get_window_extent(renderer)
        # freeze loc="best" where it was drawn, so later draws cannot move it onto a label
        legend.set_loc(tuple(ax.transAxes.inverted().transform((box.x0, box.y0))))
        taken.append(box)
    for text, anchors, kw in labels:
        best = None
        for xy in anchors:
            own = ax.transData.transform(np.asarray(xy, dtype=float).reshape(1, 2))
            mine = np.all(np.isclose(xy_px, own), axis=1)
            obstacles = taken + [m for m, is_own in zip(markers, mine) if not is_own]
            for dx, dy, ha, va in _LABEL_OFFSETS:
                ann = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points",
                                  ha=ha, va=va, **kw)
                box = ann.get_window_extent(renderer)
                outside = not (frame.x0 <= box.x0 and box.x1 <= frame.x1
                               and frame.y0 <= box.y0 and box.y1 <= frame.y1)
                clashes = 2 * outside + sum(box.overlaps(o) for o in obstacles)
                if (~mine).any():     # nearer another marker than its own: ambiguous
                    clashes += int(_box_distance(box, xy_px[~mine]).min()
                                   < _box_distance(box, own)[0])
                if best is None or clashes < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (clashes, ann, box)
                else:
                    ann.remove()
                if clashes == 0:
                    break
            if best[0] == 0:
                break
        taken.append(best[2])


def _style(i: int) -> dict[str, Any]:
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % len(LINESTYLES)]}


# --------------------------------------------------------------------------------------------
# 1. Per-layer sensitivity
# --------------------------------------------------------------------------------------------
def plot_layer_traces(traces: pd.DataFrame, *,
                      title: str | None = "Average Hessian trace per layer",
                      subtitle: str | None = None, n_params: bool = True, n_se: float = 2.0,
                      horizontal: bool | None = None) -> Figure:
    """Bar chart of ``avg_trace`` (Tr(H_ii)/n_i, docs/design.md §3) per layer in network order, with
    ±``n_se`` standard-error bars; log scale (symlog with a note when some estimates are ≤ 0).
    ``n_params`` adds the weight count on a twin axis (black ×, dashed) when the column exists.
    A ``kind`` column colours and hatches bars by layer type. ``horizontal`` defaults to True
    above 30 layers."""
    _require(traces, ["avg_trace", "avg_trace_se"], "traces")
    layers = [str(i) for i in traces.index]
    n = len(layers)
    horizontal = n > 30 if horizontal is None else horizontal
    val = traces["avg_trace"].to_numpy(float)
    err = n_se * traces["avg_trace_se"].fillna(0).to_numpy(float)
    kinds = traces["kind"].astype(str).tolist() if "kind" in traces.columns else ["layer"] * n
    kind_order = list(dict.fromkeys(kinds))
    palette = sns.color_palette("colorblind", len(kind_order))
    scale, kw = _scale_for(val)
    note = None
    if scale == "log":
        # keep the lower bar end positive on a log axis
        lower = np.minimum(err, val * (1 - 1e-3))
        if (err > lower).any():
            note = f"lower error bars of {(err > lower).sum()} layer(s) clipped at the axis"
        yerr = np.vstack([lower, err])
    else:
        yerr = np.vstack([err, err])
        if scale == "symlog":
            note = (f"symlog scale: {(val <= 0).sum()} layer(s) have a trace estimate ≤ 0 "
                    f"(Hutchinson noise)")
    with use_style():
        long, short = (0.16 * n + 1.6, 4.2)
        fig, ax = plt.subplots(figsize=_size(short, long) if horizontal else _size(long, short))
        pos = np.arange(n)
        colors = [palette[kind_order.index(k)] for k in kinds]
        hatches = [HATCHES[kind_order.index(k) % len(HATCHES)] for k in kinds]
        bar = ax.barh if horizontal else ax.bar
        bars = bar(pos, val, 0.75, color=colors, edgecolor="0.2", linewidth=0.4)
        for b, h in zip(bars, hatches):
            b.set_hatch(h)
        ebkw = {"fmt": "none", "ecolor": "0.1", "elinewidth": 0.7, "capsize": 1.5}
        if horizontal:
            ax.errorbar(val, pos, xerr=yerr, **ebkw)
        else:
            ax.errorbar(pos, val, yerr=yerr, **ebkw)
        vaxis, laxis = ("x", "y") if horizontal else ("y", "x")
        if scale == "log":
            kw = {"nonpositive": "clip"}
        getattr(ax, f"set_{vaxis}scale")(scale, **kw)
        getattr(ax, f"set_{vaxis}label")("avg. trace Tr(H)/n  (exact: no probe error)" if traces["avg_trace_se"].eq(0).all() else f"avg. trace Tr(H)/n  (±{n_se:g} SE)")
        getattr(ax, f"set_{laxis}ticks")(pos, layers, fontsize="x-small",
                                         **({} if horizontal else {"rotation": 90}))
        getattr(ax, f"set_{laxis}label")("layer (network order)")
        handles = []
        if len(kind_order) > 1:
            handles += [mpl.patches.Patch(facecolor=palette[i], hatch=HATCHES[i % len(HATCHES)],
                                          edgecolor="0.2", label=k)
                        for i, k in enumerate(kind_order)]
        if n_params and "n_params" in traces.columns:
            twin = ax.twiny() if horizontal else ax.twinx()
            counts = traces["n_params"].to_numpy(float)
            xy = (counts, pos) if horizontal else (pos, counts)
            side = "top" if horizontal else "right"
            (line,) = twin.plot(*xy, color="0.1", marker="x", linestyle=":", linewidth=0.8,
                                markersize=3.5, label=f"weights per layer ({side} axis)")
            getattr(twin, f"set_{vaxis}scale")("log")
            getattr(twin, f"set_{vaxis}label")("weights per layer")
            if horizontal:
                twin.spines["top"].set_visible(True)
            else:
                twin.spines["right"].set_visible(True)
            handles.append(line)
        getattr(ax, f"set_{laxis}lim")(-0.6, n - 0.4)
        if horizontal:
            ax.invert_yaxis()
        if handles or note:   # the note is the legend's title, so the layout makes room for it
            legend_kw = {"handles": handles, "fontsize": "x-small", "frameon": False,
                         "ncols": max(1, min(len(handles), 3)), "title": note,
                         "title_fontsize": "xx-small"}
            if horizontal:   # the twin axis is on top: legend below
                fig.legend(loc="outside lower center", **legend_kw)
            else:
                ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), borderaxespad=0.0,
                          **legend_kw)
        _titles(fig, title, subtitle)
    return fig


# --------------------------------------------------------------------------------------------
# 2. Ω validation (does Ω predict the measured loss increase?)
# --------------------------------------------------------------------------------------------
def plot_omega_validation(df: pd.DataFrame, *, x: str = "omega", y: str = "loss_increase",
                          hue: str = "variant", spearman: Mapping[str, float] | None = None,
                          title: str | None = "Ω vs measured loss increase",
                          subtitle: str | None = None, ncols: int = 3,
                          xlabel: str = "Σ Ω of the config (predicted)",
                          ylabel: str = "measured loss increase") -> Figure:
    """One scatter panel per ``hue`` value (order of appearance), log-log where the values are
    positive (symlog otherwise, labelled at 0 and a few powers of ten), Spearman ρ in each panel
    title. ``spearman`` gives ρ per variant; without it ρ is computed with
    ``scipy.stats.spearmanr``."""
    _require(df, [x, y, hue], "df")
    variants = list(dict.fromkeys(df[hue].astype(str)))
    if spearman is not None:
        missing = [v for v in variants if v not in spearman]
        if missing:
            raise PlotError(f"spearman has no ρ for variant(s) {missing}; give one per "
                            f"{hue!r} value or pass spearman=None to compute it")
    ncols = max(1, min(ncols, len(variants)))
    nrows = math.ceil(len(variants) / ncols)
    with use_style():
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, sharey=True,
                                 figsize=_size(2.3 * ncols + 0.4, 2.1 * nrows + 0.6))
        palette = sns.color_palette("colorblind", len(variants))
        for i, (ax, variant) in enumerate(zip(axes.flat, variants)):
            sub = df[df[hue].astype(str) == variant]
            ax.scatter(sub[x], sub[y], s=14, marker=MARKERS[i % len(MARKERS)],
                       color=palette[i], edgecolor="0.15", linewidth=0.3, alpha=0.85)
            if spearman is not None:
                rho = float(spearman[variant])
            else:
                rho = float(spearmanr(sub[x], sub[y]).statistic) if len(sub) > 1 else float("nan")
            ax.set_title(f"{variant}: ρ = {rho:.2f}", fontsize="small")
            _set_scale(ax, "x", sub[x].to_numpy(float))
            ax.set_xlabel(xlabel)
        _set_scale(axes.flat[0], "y", df[y].to_numpy(float))
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
        for ax in list(axes.flat)[len(variants):]:
            ax.set_visible(False)
        _titles(fig, title, subtitle)
    return fig


# --------------------------------------------------------------------------------------------
# 3. Search: candidates, exact frontier, picks, uniform baselines
# --------------------------------------------------------------------------------------------
def plot_frontier(candidates: pd.DataFrame | None, frontier: pd.DataFrame,
                  picks: pd.DataFrame | None = None, *, x: str = "size_mb", y: str = "omega",
                  uniform: pd.DataFrame | None = None, label_col: str = "label",
                  title: str | None = "Exact Pareto frontier of ΣΩ vs size",
                  subtitle: str | None = None) -> Figure:
    """Every candidate faint grey (α 0.15, rasterised), the exact frontier as a post-step line
    with markers, picked budgets as stars on dashed vertical lines labelled along the line, and
    uniform configs as distinct markers labelled clear of each other (:func:`_place_labels`)
    (docs/design.md §3 "Search"). Log y (symlog if some Ω ≤ 0); log x when sizes span more than 10×.
    ``picks``/``uniform`` may carry a ``label_col`` column for their labels."""
    _require(frontier, [x, y], "frontier")
    frames = {"candidates": candidates, "picks": picks, "uniform": uniform}
    for name, frame in frames.items():
        if frame is not None:
            _require(frame, [x, y], name)
    all_x = np.concatenate([f[x].to_numpy(float) for f in (frontier, *frames.values())
                            if f is not None])
    all_y = np.concatenate([f[y].to_numpy(float) for f in (frontier, *frames.values())
                            if f is not None])
    with use_style():
        fig, ax = plt.subplots(figsize=(5.0, 3.4))
        if candidates is not None:
            ax.scatter(candidates[x], candidates[y], s=3, color="0.55", alpha=0.15,
                       linewidths=0, rasterized=True, label=f"candidates ({len(candidates)})")
        front = frontier.sort_values(x)
        ax.step(front[x], front[y], where="post", color="C0", marker="o", markersize=3,
                linewidth=1.2, label=f"exact frontier ({len(front)})", zorder=3)
        labels: list[tuple[str, list[tuple[float, float]], dict]] = []
        text_kw = {"fontsize": "x-small", "bbox": LABEL_BOX}
        budget_labels = []
        if picks is not None:
            # each pick's label runs up its dashed budget line: the leftmost on the line's left,
            # the others on its right (two close budgets then label outwards, not on each other)
            for i, (_, row) in enumerate(picks.sort_values(x).iterrows()):
                label = (str(row[label_col]) if label_col in picks.columns
                         else f"{row[x]:.3g}")
                ax.axvline(row[x], color="0.25", linestyle="--", linewidth=0.8, zorder=1)
                ax.scatter(row[x], row[y], s=60, marker="*", color="C1", edgecolor="black",
                           linewidth=0.5, zorder=5, label="picked" if i == 0 else None)
                budget_labels.append(ax.text(
                    row[x], 0.02, label, transform=ax.get_xaxis_transform(), rotation=90,
                    ha="right" if i == 0 else "left", va="bottom", fontsize="x-small",
                    bbox=LABEL_BOX, zorder=2))
        if uniform is not None:
            for i, (_, row) in enumerate(uniform.iterrows()):
                label = str(row[label_col]) if label_col in uniform.columns else f"uniform {i}"
                ax.scatter(row[x], row[y], s=34, marker=MARKERS[(i + 1) % len(MARKERS)],
                           color=f"C{(i + 2) % 10}", edgecolor="black", linewidth=0.5, zorder=4)
                labels.append((label, [(row[x], row[y])], text_kw))
        _set_scale(ax, "y", all_y)
        _set_scale(ax, "x", all_x, log_span=10.0)
        ax.set_xlabel({"size_mb": "model size (MB)", "bops": "BOPs"}.get(x, x))
        ax.set_ylabel({"omega": "ΣΩ (predicted perturbation)"}.get(y, y))
        ax.legend(fontsize="x-small", frameon=False, loc="best", markerscale=1.5)
        _titles(fig, title, subtitle)
        marked = [f[[x, y]].to_numpy(float) for f in (picks, uniform) if f is not None]
        _place_labels(ax, labels, np.concatenate(marked) if marked else np.empty((0, 2)),
                      avoid=budget_labels)
    return fig


# --------------------------------------------------------------------------------------------
# 4. Bit-allocation heat map
# --------------------------------------------------------------------------------------------
def plot_bit_heatmap(configs: Mapping[str, Mapping[str, int]], layers: Sequence[str], *,
                     title: str | None = "Bit width per layer",
                     subtitle: str | None = None) -> Figure:
    """Rows = ``layers`` in network order, columns = config labels, one discrete colour per bit
    width (sequential palette, so lightness orders the widths in greyscale) and every cell
    annotated with its bit width. Each config must cover exactly ``layers``."""
    if not configs:
        raise PlotError("configs is empty; pass {label: {layer: bits}}")
    layers = list(layers)
    for label, cfg in configs.items():
        missing = [l for l in layers if l not in cfg]
        extra = [l for l in cfg if l not in set(layers)]
        if missing or extra:
            raise PlotError(f"config {label!r} does not match layers: missing {missing[:3]}, "
                            f"unknown {extra[:3]}; give bits for exactly the listed layers")
        bad = {l: b for l, b in cfg.items() if isinstance(b, bool)
               or not isinstance(b, (int, np.integer))}
        if bad:
            k, v = next(iter(bad.items()))
            raise PlotError(f"config {label!r}: layer {k!r} has bits {v!r}; bits must be ints")
    bits = pd.DataFrame({label: [int(cfg[l]) for l in layers] for label, cfg in configs.items()},
                        index=layers)
    widths = sorted(np.unique(bits.to_numpy()).tolist())
    codes = pd.DataFrame(np.searchsorted(widths, bits.to_numpy()), index=bits.index,
                         columns=bits.columns)          # colour index: position of the width
    cmap = ListedColormap(sns.color_palette("viridis", len(widths)))
    with use_style():
        fig, ax = plt.subplots(figsize=_size(0.55 * bits.shape[1] + 2.4, 0.17 * len(layers) + 1.3))
        sns.heatmap(codes, ax=ax, cmap=cmap, vmin=-0.5, vmax=len(widths) - 0.5, annot=bits,
                    fmt="d", annot_kws={"fontsize": 6 if len(layers) > 25 else 7},
                    linewidths=0.4, linecolor="white",
                    cbar_kws={"ticks": range(len(widths)), "label": "weight bits"})
        ax.collections[0].colorbar.set_ticklabels([str(b) for b in widths])
        ax.set_xlabel("configuration")
        ax.set_ylabel("layer (network order)")
        ax.tick_params(axis="y", labelsize=6 if len(layers) > 25 else 7)
        ax.tick_params(axis="x", labelrotation=30)
        _titles(fig, title, subtitle)
    return fig


# --------------------------------------------------------------------------------------------
# 5. Accuracy vs size
# --------------------------------------------------------------------------------------------
def nearest_uniform_pairs(df: pd.DataFrame, *, kind_col: str = "kind",
                          label_col: str = "label", size_col: str = "size_mb"
                          ) -> list[tuple[str, str]]:
    """``(config, uniform)`` label pairs: every config whose kind is not "uniform…" with the
    uniform config nearest to it in size (smallest |log size ratio|; exact for notebook 02's
    "HMQAT =WbAa size" picks), in the order of ``df``."""
    _require(df, [kind_col, label_col, size_col], "df")
    rows = df.drop_duplicates(label_col)
    is_uniform = rows[kind_col].astype(str).str.lower().str.contains("uniform")
    uniform = rows[is_uniform]
    if uniform.empty:
        return []
    pairs = []
    for _, row in rows[~is_uniform].iterrows():
        gap = np.abs(np.log(uniform[size_col].to_numpy(float) / float(row[size_col])))
        pairs.append((str(row[label_col]), str(uniform[label_col].iloc[int(gap.argmin())])))
    return pairs


def _paired_panel(ax: plt.Axes, runs: pd.DataFrame, pairs: Sequence[tuple[str, str]],
                  value: str, confidence: float) -> None:
    """For each (a, b): every seed's a − b as a grey dot and the mean with its interval
    (:func:`hmqat.study.reporting.paired_interval`: over seeds and test images when the runs
    carry their per-image bits, else the paired t; one seed: the dot alone), top to bottom;
    each row names the pair and a's size relative to b's."""
    wide = runs.pivot_table(index="seed", columns="label", values=value, aggfunc="first")
    size = runs.groupby("label")["size_mb"].first() if "size_mb" in runs else None
    names = []
    for i, (a, b) in enumerate(pairs):
        both = wide[[a, b]].dropna()
        d = (both[a] - both[b]).to_numpy(float)
        ax.scatter(d, np.full(len(d), i), s=12, color="0.55", zorder=2)
        if len(d) >= 2:
            ci = reporting.paired_interval(runs, a, b, value=value, confidence=confidence)
            ax.errorbar(ci.mean, i, xerr=[[ci.mean - ci.low], [ci.high - ci.mean]], fmt="D",
                        ms=5, color="C0", mec="0.15", mew=0.4, capsize=3, lw=1.2, zorder=3)
            ax.annotate(f"{ci.mean:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]", (ci.mean, i),
                        xytext=(0, 5), textcoords="offset points", ha="center", va="bottom",
                        fontsize="xx-small", color="C0")
        elif len(d):
            ax.annotate(f"{d.mean():+.2f} (1 seed: no interval)", (d.mean(), i),
                        xytext=(0, 5), textcoords="offset points", ha="center",
                        va="bottom", fontsize="xx-small")
        gap = (f", size {100 * (size[a] / size[b] - 1):+.1f} %"
               if size is not None and a in size and b in size else "")
        names.append(f"{a}\n− {b}{gap}")
    ax.axvline(0, color="0.3", lw=0.8, ls=":")
    ax.set_yticks(range(len(pairs)), names, fontsize="x-small")
    ax.set_ylim(len(pairs) - 0.4, -0.7)               # first pair on top, room for its text
    ax.margins(x=0.15)
    ax.set_xlabel("difference (points)")
    ax.set_title("config − uniform, paired by seed", fontsize="small")


def plot_accuracy_size(df: pd.DataFrame, *, x: str = "size_mb", y: str = "top1",
                       kind_col: str = "kind", label_col: str = "label",
                       fp32_top1: float | None = None, yerr: str | None = None,
                       title: str | None = "Top-1 accuracy vs model size",
                       subtitle: str | None = None, runs: pd.DataFrame | None = None,
                       pairs: Sequence[tuple[str, str]] | None = None,
                       value: str = "test_top1", confidence: float = 0.95) -> Figure:
    """Top-1 vs size. Each ``kind`` whose name contains "uniform" is drawn as separate points
    with distinct markers and direct text labels (``label_col``); every other kind (e.g. the
    mixed-precision method) is a line with markers, its points annotated with their
    ``compression`` (when that column exists). FP32 is a dashed horizontal line. Labels are
    placed clear of each other, the markers and the legend (:func:`_place_labels`).
    ``yerr``: a column of ± error (e.g. the std over seeds), drawn as error bars; ``x="bops"``
    gives the accuracy-vs-compute figure (docs/method.md §8).

    ``runs`` (one row per (label, seed), e.g. notebook 03's ``qat_results.json``; columns
    label, seed, ``value``, and size_mb for the size gap) adds a panel on the right: for each
    of ``pairs`` (default :func:`nearest_uniform_pairs` of ``df``), the difference
    config − uniform of every seed and its mean with the ``confidence`` paired t interval
    (:func:`hmqat.study.reporting.paired_interval`). That is the comparison the seeds support; ±SD
    bars on the left show each config's own spread and invite an unpaired reading, which the
    caption says."""
    _require(df, [x, y, kind_col] + ([yerr] if yerr else []), "df")
    if runs is not None:
        missing = [c for c in ("label", "seed", value) if c not in runs.columns]
        if missing:
            raise PlotError(f"runs lacks column(s) {missing}; pass one row per (label, seed) "
                            f"with label, seed and {value!r} (notebook 03's qat_results.json)")
        pairs = list(pairs) if pairs is not None else nearest_uniform_pairs(
            df, kind_col=kind_col, label_col=label_col,
            size_col="size_mb" if "size_mb" in df.columns else x)
        unknown = sorted({l for p in pairs for l in p} - set(runs["label"].astype(str)))
        if unknown:
            raise PlotError(f"pairs name label(s) {unknown} that runs does not have; its "
                            f"labels: {sorted(runs['label'].astype(str).unique())}")
    kinds = list(dict.fromkeys(df[kind_col].astype(str)))
    labels: list[tuple[str, list[tuple[float, float]], dict]] = []
    small: list[tuple[str, list[tuple[float, float]], dict]] = []
    with use_style():
        if runs is not None and pairs:
            fig, (ax, pax) = plt.subplots(1, 2, figsize=(7.0, 3.6), width_ratios=[1.45, 1])
            _paired_panel(pax, runs.assign(label=runs["label"].astype(str)), pairs, value,
                          confidence)
            _caption(fig, f"Left: mean over seeds; bars ± SD, each config's own spread (not a "
                          f"comparison). Right: the comparison, paired by seed (same seed = "
                          f"same data order and initial noise): {value} of the config minus "
                          f"that of the uniform config; grey dots: one seed each; diamond and "
                          f"bar: their mean and {confidence:.0%} interval "
                          f"(hmqat.study.reporting.paired_interval: over seeds and test "
                          f"images when the runs carry per-image results).")
        else:
            fig, ax = plt.subplots(figsize=(5.0, 3.4))
        n_line = n_point = 0
        for kind in kinds:
            sub = df[df[kind_col].astype(str) == kind].sort_values(x)
            if "uniform" in kind.lower():
                for _, row in sub.iterrows():
                    label = row[label_col] if label_col in sub.columns else None
                    label = kind if label is None or pd.isna(label) or label == "" else str(label)
                    ax.scatter(row[x], row[y], s=36, marker=MARKERS[(n_point + 1) % len(MARKERS)],
                               color="0.35", edgecolor="black", linewidth=0.5, zorder=4)
                    if yerr:
                        ax.errorbar(row[x], row[y], yerr=row[yerr], color="0.35",
                                    linewidth=0.8, capsize=2, zorder=3)
                    labels.append((label, [(row[x], row[y])],
                                   {"fontsize": "x-small", "bbox": LABEL_BOX}))
                    n_point += 1
            else:
                ax.plot(sub[x], sub[y], color=f"C{n_line}", markersize=4.5, linewidth=1.2,
                        label=kind, zorder=3, **_style(n_line))
                if yerr:
                    ax.errorbar(sub[x], sub[y], yerr=sub[yerr], color=f"C{n_line}",
                                linestyle="none", linewidth=0.8, capsize=2, zorder=3)
                if "compression" in sub.columns:
                    small += [(f"{row['compression']:.1f}×", [(row[x], row[y])],
                               {"fontsize": "xx-small", "color": f"C{n_line}",
                                "bbox": LABEL_BOX}) for _, row in sub.iterrows()]
                n_line += 1
        _set_scale(ax, "x", df[x].to_numpy(float), log_span=10.0)
        ax.margins(x=0.08, y=0.08)
        ax.set_xlabel({"size_mb": "model size (MB)", "bops": "BOPs"}.get(x, x))
        ax.set_ylabel({"top1": "top-1 (%)"}.get(y, y))
        if n_line:
            ax.legend(fontsize="x-small", frameon=False, loc="lower right")
        points = df[[x, y]].to_numpy(float)
        if fp32_top1 is not None:
            ax.axhline(fp32_top1, color="black", linestyle="--", linewidth=0.9)
            lo, hi = ax.get_xlim()
            ax.set_xlim(lo, hi)                # keep the limits the label anchors below use
            # the FP32 label sits on its line, at the right end or else at the left end
            labels.insert(0, (f"FP32 {fp32_top1:.2f}", [(hi, fp32_top1), (lo, fp32_top1)],
                              {"fontsize": "x-small", "bbox": LABEL_BOX,
                               "annotation_clip": False}))
        _titles(fig, title, subtitle)
        # the small compression labels go last: they fit in the gaps the named points leave
        _place_labels(ax, labels + small, points)
    return fig


# --------------------------------------------------------------------------------------------
# 6. Ablations
# --------------------------------------------------------------------------------------------
def _zoomed_origin(low: float, high: float) -> float:
    """Where a bar axis starts: 0, unless all values are positive and differ by less than a
    third of the smallest, then a round number below ``low`` by half the range (bars of
    78–85 % accuracy drawn from 0 hide the differences the ablation is about)."""
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 or high - low > low / 3:
        return 0.0
    step = 10 ** math.floor(math.log10(max(high - low, 1e-12)))
    return max(0.0, math.floor((low - 0.5 * (high - low)) / step) * step)


def _same_runs(df: pd.DataFrame, x: str, group_col: str | None, key: str
                ) -> dict[tuple[Any, str], list[str]]:
    """{(group, first variant): [every variant]} for variants of one group whose rows are the
    same trained runs (equal sets of ``key``, e.g. ``run_id``): two allocation methods that
    picked the same config train one model, not two."""
    merged: dict[tuple[Any, str], list[str]] = {}
    for group, sub in (df.groupby(group_col, sort=False) if group_col else [(None, df)]):
        seen: dict[frozenset, str] = {}
        for variant, rows in sub.groupby(x, sort=False):
            if rows[key].isna().any() or (rows[key].astype(str) == "").any():
                continue                  # a variant without run ids is never merged
            runs = frozenset(rows[key].astype(str))
            if runs in seen:
                merged.setdefault((group, seen[runs]), [seen[runs]]).append(str(variant))
            else:
                seen[runs] = str(variant)
    return merged


def _variant_label(variant: str) -> str:
    """``"hmqat-qerr_only (quant. error alone)"``: an ablation's ``hmqat-<Ω variant>`` row with
    the Ω's plain words (:data:`PREDICTOR_WORDS`); other variants unchanged."""
    omega = variant.split(" = ")[0].removeprefix("hmqat-")
    if not variant.startswith("hmqat-") or omega not in PREDICTOR_WORDS:
        return variant
    return f"{variant} ({PREDICTOR_WORDS[omega].removeprefix('HMQAT Ω: ')})"


def plot_ablation(df: pd.DataFrame, *, x: str = "variant", y: str = "top1",
                  group_col: str | None = "group", err: str | None = None,
                  title: str | None = "Ablations", subtitle: str | None = None,
                  run_col: str = "run_id") -> Figure:
    """Horizontal bars of ``y`` per ``x`` (variant), one panel per ``group_col`` value, one
    hatch per variant, mean value written past each bar. When the values are close, the axis
    starts at a round number below them and the x label says so (:func:`_zoomed_origin`).
    Several rows per variant (seeds) give ±SD error bars (seaborn ``errorbar="sd"``); ``err``
    names a column of precomputed SDs instead.

    Variants whose rows are the same runs (equal sets of ``run_col``, when that column exists;
    e.g. ``ilp`` and ``hmqat-joint``, which pick the same config) are one bar, labelled
    ``"hmqat-joint = ilp"``, and a caption says so. ``hmqat-<Ω variant>`` rows are named in
    plain words too (:func:`predictor_label`)."""
    _require(df, [x, y] + ([group_col] if group_col else []) + ([err] if err else []), "df")
    if err and df.groupby([group_col, x] if group_col else [x]).size().max() > 1:
        raise PlotError(f"err={err!r} gives precomputed SDs, so each variant needs one row; "
                        f"pass err=None to compute SDs over repeated rows (seeds)")
    data = df.assign(**{x: df[x].astype(str)})
    merged = _same_runs(data, x, group_col, run_col) if run_col in data.columns else {}
    notes = []
    for (group, first), variants in merged.items():
        in_group = data[group_col] == group if group_col else True
        data = data[~(in_group & data[x].isin(variants[1:]))]
        data.loc[in_group & (data[x] == first), x] = " = ".join(variants)
        notes.append(f"{' and '.join(variants)} picked the same config: one run, shown once")
    data[x] = [_variant_label(v) for v in data[x]]
    groups = list(dict.fromkeys(data[group_col].astype(str))) if group_col else [None]
    sizes = [data[data[group_col].astype(str) == g][x].nunique() if g else data[x].nunique()
             for g in groups]
    with use_style():
        fig, axes = plt.subplots(len(groups), 1, squeeze=False, sharex=True,
                                 height_ratios=sizes,
                                 figsize=_size(2.6 + 0.07 * data[x].str.len().max(),
                                               0.28 * sum(sizes) + 0.55 * len(groups) + 1))
        for ax, group in zip(axes[:, 0], groups):
            sub = data if group is None else data[data[group_col].astype(str) == group]
            order = list(dict.fromkeys(sub[x]))
            repeated = sub.groupby(x).size().max() > 1
            sns.barplot(data=sub, y=x, x=y, hue=x, order=order, hue_order=order, orient="h",
                        palette="colorblind", errorbar="sd" if repeated else None,
                        err_kws={"linewidth": 0.8}, capsize=0.25, legend=False, ax=ax,
                        edgecolor="0.2", linewidth=0.4)
            for i, container in enumerate(ax.containers):
                for bar in getattr(container, "patches", container):
                    bar.set_hatch(HATCHES[i % len(HATCHES)])
            stats = sub.groupby(x, sort=False)[y].agg(["mean", "std", "count"]).reindex(order)
            sd = (sub.set_index(x)[err].reindex(order) if err
                  else stats["std"].where(stats["count"] > 1))
            if err:
                ax.errorbar(stats["mean"], np.arange(len(order)), xerr=sd.fillna(0),
                            fmt="none", ecolor="0.1", elinewidth=0.8, capsize=2)
            for i, (mean, s, cnt) in enumerate(zip(stats["mean"], sd.fillna(0), stats["count"])):
                text = f" {mean:.2f}" + (f" ± {s:.2f} (n={cnt})" if s > 0 else "")
                ax.text(mean + s, i, text, va="center", fontsize="x-small")
            ax.set_ylabel(group or "")
            ax.set_xlabel({"top1": "top-1 (%)"}.get(y, y))
        means = data.groupby([x])[y].mean()
        spread = data.groupby([x])[y].std().fillna(0) if not err else data[err].max()
        right, low = (means + spread).max(), (means - spread).min()
        left = _zoomed_origin(low, right)
        width = right - left
        axes[0, 0].set_xlim(left, right + 0.3 * width if width > 0 else None)
        if left > 0:
            axes[-1, 0].set_xlabel(f"{axes[-1, 0].get_xlabel()} — axis starts at {left:g}")
        _titles(fig, title, subtitle)
        _caption(fig, "; ".join(notes) + "." if notes else None)
    return fig


# --------------------------------------------------------------------------------------------
# 7. Training curves
# --------------------------------------------------------------------------------------------
def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]],
                         metric: str | Sequence[str] = "val_top1", *, x: str = "epoch",
                         title: str | None = "Training curves",
                         subtitle: str | None = None,
                         start: Mapping[str, Mapping[str, float]] | None = None) -> Figure:
    """One line per config (distinct colour, marker and line style) of ``metric`` against
    ``x`` (the record's ``epoch``, else its position), from ``hmqat.train.fit`` histories.
    A list of metrics gives one panel each. Records without the metric are skipped.
    ``start``: {config: {metric: value}} drawn at epoch 0, before training (e.g. the published
    model's accuracy, so a fine-tune's first-epoch jump is visible)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not histories:
        raise PlotError("histories is empty; pass {config label: fit() history}")
    for m in metrics:
        for label, hist in histories.items():
            if not any(m in rec for rec in hist):
                keys = sorted({k for rec in hist for k in rec})
                raise PlotError(f"history {label!r} has no {m!r} values; its keys are {keys}")
    with use_style():
        fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                                 figsize=_size(3.4 * len(metrics), 2.8))
        for ax, m in zip(axes[0], metrics):
            for i, (label, hist) in enumerate(histories.items()):
                pts = [(rec.get(x, j + 1), rec[m]) for j, rec in enumerate(hist) if m in rec]
                if start and m in start.get(label, {}):
                    pts.insert(0, (0, start[label][m]))
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, color=f"C{i % 10}", markersize=3.5, linewidth=1.1,
                        markevery=max(1, len(xs) // 12), **_style(i))
            ax.set_xlabel(x)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel({"val_top1": "val. top-1 (%)", "train_loss": "train loss",
                           "val_loss": "val. loss", "train_top1": "train top-1 (%)"}.get(m, m))
        axes[0, -1].legend(fontsize="x-small", frameon=False, loc="best")
        _titles(fig, title, subtitle)
    return fig



# --------------------------------------------------------------------------------------------
# 1b. Does sensitivity tell apart from size? (hmqat.sensitivity experiments, docs/method.md §3)
# --------------------------------------------------------------------------------------------
def _identity_line(ax: plt.Axes, values: np.ndarray) -> None:
    v = values[np.isfinite(values) & (values > 0)]
    if len(v):
        lo, hi = v.min(), v.max()
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", zorder=0, label="y = x")


def _loglog_scatter(ax: plt.Axes, x: np.ndarray, y: np.ndarray, i: int, label: str,
                    log: bool = True) -> int:
    """Scatter the points with x, y > 0 on log axes (``log``; every point on linear axes when
    the panel has no positive pair); returns how many were left out."""
    ok = np.isfinite(x) & np.isfinite(y)
    if log:
        ok &= (x > 0) & (y > 0)
    palette = sns.color_palette("colorblind", 10)
    ax.scatter(x[ok], y[ok], s=14, marker=MARKERS[i % len(MARKERS)], color=palette[i % 10],
               edgecolor="0.15", linewidth=0.3, alpha=0.85, label=label)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    return int((~ok).sum())


def _any_positive_pair(x: np.ndarray, y: np.ndarray) -> bool:
    return bool(((x > 0) & (y > 0) & np.isfinite(x) & np.isfinite(y)).any())


def plot_single_layer(df: pd.DataFrame, *,
                      predictors: Sequence[str] = ("pred_trace", "pred_quad", "pred_taylor"),
                      title: str | None = "One layer at a time: measured vs predicted ΔL",
                      subtitle: str | None = None) -> Figure:
    """One log-log panel per predictor: measured loss increase (y) against the prediction (x),
    markers by bit width, y = x dashed; points with a non-positive value are counted in the
    panel title (they cannot be drawn on log axes)."""
    _require(df, ["measured", "bits", *predictors], "df")
    with use_style():
        fig, axes = plt.subplots(1, len(predictors), squeeze=False, sharey=True,
                                 figsize=_size(2.3 * len(predictors) + 0.4, 2.8))
        y = df["measured"].to_numpy(float)
        for ax, p in zip(axes.flat, predictors):
            dropped = 0
            log = _any_positive_pair(df[p].to_numpy(float), y)
            for i, (b, sub) in enumerate(df.groupby("bits", sort=True)):
                dropped += _loglog_scatter(ax, sub[p].to_numpy(float),
                                           sub["measured"].to_numpy(float), i, f"{b} bit", log)
            _identity_line(ax, np.concatenate([df[p].to_numpy(float), y]))
            ax.set_xlabel(p)
            ax.set_title(f"{p}" + (f" ({dropped} pts ≤ 0 not shown)" if dropped else ""),
                         fontsize="small")
        axes.flat[0].set_ylabel("measured ΔL")
        axes.flat[0].legend(fontsize="x-small", frameon=False)
        _titles(fig, title, subtitle)
    return fig


def plot_noise_check(df: pd.DataFrame, *,
                     title: str | None = "Matched isotropic noise: ΔL vs ½σ²Tr(H_ii)",
                     subtitle: str | None = None) -> Figure:
    """Measured antithetic ΔL per layer against ½σ²·Tr(H_ii), with the trace's SE as x error
    bars, log-log, y = x dashed."""
    _require(df, ["measured", "predicted", "predicted_se"], "df")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(3.6, 3.0))
        x, y = df["predicted"].to_numpy(float), df["measured"].to_numpy(float)
        log = _any_positive_pair(x, y)
        ok = (x > 0) & (y > 0) if log else np.isfinite(x) & np.isfinite(y)
        ax.errorbar(x[ok], y[ok], xerr=np.abs(df["predicted_se"].to_numpy(float)[ok]),
                    fmt=MARKERS[0], ms=4, lw=0.8, mec="0.15", mew=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        _identity_line(ax, np.concatenate([x, y]))
        ax.set_xlabel("½ σ² Tr(H_ii) (Hutchinson)")
        ax.set_ylabel("measured ΔL (antithetic)")
        if (~ok).any():
            ax.set_title(f"{int((~ok).sum())} layer(s) with ΔL ≤ 0 not shown", fontsize="small")
        _titles(fig, title, subtitle)
    return fig


def plot_additivity(df: pd.DataFrame, *,
                    title: str | None = "Additivity: config ΔL vs Σ single-layer ΔL",
                    subtitle: str | None = None) -> Figure:
    """Measured ΔL of each config against the sum of its single-layer ΔL, log-log, marker by
    the number of 2-bit layers."""
    _require(df, ["measured", "sum_single", "n_2bit"], "df")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(3.6, 3.0))
        log = _any_positive_pair(df["sum_single"].to_numpy(float),
                                 df["measured"].to_numpy(float))
        for i, (k, sub) in enumerate(df.groupby("n_2bit", sort=True)):
            _loglog_scatter(ax, sub["sum_single"].to_numpy(float),
                            sub["measured"].to_numpy(float), i, f"{k}× 2-bit", log)
        _identity_line(ax, np.concatenate([df["sum_single"].to_numpy(float),
                                           df["measured"].to_numpy(float)]))
        ax.set_xlabel("Σ single-layer ΔL")
        ax.set_ylabel("measured ΔL")
        ax.legend(fontsize="x-small", frameon=False)
        _titles(fig, title, subtitle)
    return fig


def plot_kendall(df: pd.DataFrame, *,
                 title: str | None = "Kendall τ at fixed size (bootstrap 95 % CI)",
                 subtitle: str | None = None,
                 xlabel: str = "Kendall τ (ΣΩ vs PTQ loss increase)",
                 caption: str | None = "default") -> Figure:
    """τ per predictor with its CI as a horizontal error bar, sorted by τ. Each row is named in
    plain words with the tables' code name (:func:`predictor_label`); the reference ``joint``
    (the Ω HMQAT allocates by) is drawn filled, the others open. ``caption`` (under the axes)
    says how to read τ and the names; ``"default"`` writes one, None leaves it out."""
    _require(df, ["predictor", "kendall_tau", "tau_low", "tau_high"], "df")
    d = df.sort_values("kendall_tau")
    codes = [str(p).removeprefix("omega_") for p in d["predictor"]]
    if caption == "default":
        caption = ("τ: how well a predictor orders the configs as the measured quantity "
                   "does (1 = the same order, 0 = unrelated); bars: bootstrap 95 % CI over "
                   "configs; bold, filled: joint, the Ω HMQAT allocates by. Each Ω is summed "
                   "over the layers; trace = the layer's average Hessian trace, quant. error = "
                   "‖Q(W) − W‖² of its weights.")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(6.2, 0.3 * len(d) + 1.9))
        yy = np.arange(len(d))
        t = d["kendall_tau"].to_numpy(float)
        err = [t - d["tau_low"].to_numpy(float), d["tau_high"].to_numpy(float) - t]
        ax.errorbar(t, yy, xerr=err, fmt="none", lw=0.9, color="0.2")
        ref = np.array([c == "joint" for c in codes])
        ax.scatter(t[~ref], yy[~ref], s=22, facecolor="white", edgecolor="0.15", zorder=3)
        ax.scatter(t[ref], yy[ref], s=26, color="C0", edgecolor="0.15", zorder=3)
        ax.axvline(0, color="0.6", lw=0.7, ls=":")
        ax.set_yticks(yy, [predictor_label(c) for c in codes])
        for tick, is_ref in zip(ax.get_yticklabels(), ref):
            tick.set_fontweight("bold" if is_ref else "normal")
        ax.set_ylim(-0.6, len(d) - 0.4)
        ax.set_xlabel(xlabel)
        _titles(fig, title, subtitle)
        _caption(fig, caption)
    return fig


def plot_qat_level(df: pd.DataFrame, *,
                   title: str | None = "Equal-size configs after QAT",
                   subtitle: str | None = None) -> Figure:
    """Experiment 7 (FIT's protocol): QAT top-1 of each config against its ΣΩ (joint) and
    against its PTQ top-1, one point per config."""
    _require(df, ["omega_joint", "ptq_top1", "qat_top1"], "df")
    with use_style():
        fig, axes = plt.subplots(1, 2, figsize=_size(6.4, 2.8), sharey=True)
        for i, (ax, x, label) in enumerate(zip(axes, ("omega_joint", "ptq_top1"),
                                               ("ΣΩ (joint)", "PTQ top-1 (%), same config"))):
            ax.scatter(df[x], df["qat_top1"], s=18, color=sns.color_palette("colorblind")[i],
                       edgecolor="0.15", linewidth=0.3)
            ax.set_xlabel(label)
        _set_scale(axes[0], "x", df["omega_joint"].to_numpy(float))   # top-1 stays linear
        axes[0].set_ylabel("top-1 after QAT (%)")
        _titles(fig, title, subtitle)
    return fig


def plot_ptq_frontier(df: pd.DataFrame, *,
                      title: str | None = "PTQ top-1: Pareto picks vs random configs of the "
                                          "same size",
                      subtitle: str | None = None, caption: str | None = "default") -> Figure:
    """One panel per target compression: top-1 against each config's **true** compression
    (``compression_actual``; without that column, the target), the random configs of that
    size as grey dots with their median as a dashed line, each variant's pick as its own open
    marker (open, so picks that coincide stay visible), one legend for all panels below them.
    Picks at the same point are also named in the panel. ``caption``: ``"default"`` explains
    the variant names (:data:`PREDICTOR_WORDS`), None leaves it out."""
    _require(df, ["target_compression", "kind", "name", "top1"], "df")
    xcol = "compression_actual" if "compression_actual" in df.columns else "target_compression"
    targets = sorted(df["target_compression"].unique())
    picks = df[df["kind"] == "pick"]
    names = list(dict.fromkeys(picks["name"].astype(str)))
    if caption == "default":
        caption = ("Each pick: the config of that size on the exact Pareto frontier of one Ω "
                   "variant; open markers on the same point nest (and are named in the panel). "
                   + ("x: each config's own compression." if xcol == "compression_actual"
                      else "x: the target compression (no compression_actual column)."))
    with use_style():
        fig, axes = plt.subplots(1, len(targets), squeeze=False,
                                 figsize=_size(2.3 * len(targets) + 0.4, 4.4))
        palette = sns.color_palette("colorblind", max(len(names), 1))
        handles: dict[str, Any] = {}
        for ax, target in zip(axes[0], targets):
            here = df[df["target_compression"] == target]
            rnd = here[here["kind"] == "random"]
            if not rnd.empty:
                handles["random"] = ax.scatter(rnd[xcol], rnd["top1"], s=10, color="0.6",
                                               alpha=0.8, zorder=1, label="random, same size")
                handles["median"] = ax.axhline(rnd["top1"].median(), color="0.45", lw=0.9,
                                               ls="--", zorder=1, label="random median")
            sub = here[here["kind"] == "pick"]
            for i, name in enumerate(names):
                row = sub[sub["name"].astype(str) == name]
                if row.empty:
                    continue
                # drawn from large to small, so markers on the same point nest, not hide
                handles[name] = ax.scatter(row[xcol], row["top1"], s=70 - 5 * i,
                                           marker=MARKERS[i % len(MARKERS)], facecolor="none",
                                           edgecolor=palette[i], linewidth=1.1, zorder=3 + i,
                                           label=predictor_label(name))
            ties = sub.groupby([sub[xcol].round(6), sub["top1"].round(6)])["name"].agg(list)
            ties = [v for v in ties if len(v) > 1]
            if ties:
                ax.text(0.02, 0.02, "same point: " + "; ".join(", ".join(v) for v in ties),
                        transform=ax.transAxes, fontsize="xx-small", va="bottom",
                        wrap=True, bbox=LABEL_BOX)
            ax.set_title(f"≈ {target:g}×", fontsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(3))
            ax.xaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%.2f"))
            ax.margins(x=0.25, y=0.12)
        axes[0, 0].set_ylabel("top-1 (%)")
        axes[0, len(targets) // 2].set_xlabel(
            "compression (×) of each config" if xcol == "compression_actual"
            else "target compression (×)")
        _titles(fig, title, subtitle)
        _legend_below(fig, list(handles.values()), [h.get_label() for h in handles.values()],
                      caption=caption)
    return fig


#: Readable parts of the transition experiment's arm names (hmqat.study.ablation:
#: ``"<re-init>/<ladder>/step_lr=<tag>"`` plus ``"+bn"``), docs/method.md §5.1 and §7.
_REINIT_WORDS = {"lsq": "plain LSQ", "range": "range re-init (Eq. T1)",
                 "data+so": "data re-init + scale-only phase (Eq. T2)"}
_WHEN_WORDS = {"transition": "transition", "scale_only_end": "scale-only end",
               "end": "end of training"}


def arm_label(name: str, *, step_lr: bool = True) -> str:
    """Plain words for a transition-experiment arm: ``"data+so/8>4>T/step_lr=lr/10+bn"`` →
    ``"data re-init + scale-only phase (Eq. T2), 8 → 4 → T bits, step lr = lr/10, BN
    re-estimated"`` (T = the layer's target width; ``step_lr=False`` leaves the step-lr part
    out, for a figure whose arms all share it). A name of another form comes back as it is."""
    base, bn = (name[:-3], True) if name.endswith("+bn") else (name, False)
    parts = base.split("/")
    if not parts or parts[0] not in _REINIT_WORDS:
        return name
    words = [_REINIT_WORDS[parts[0]]]
    rest = parts[1:]
    if rest and not rest[0].startswith("step_lr="):
        ladder = rest.pop(0)
        words.append("target from step 0" if ladder == "none"
                     else ladder.replace(">", " → ") + " bits")
    if rest and rest[0].startswith("step_lr=") and step_lr:
        words.append("step lr = " + "/".join(rest).removeprefix("step_lr="))
    if bn:
        words.append("BN re-estimated")
    return ", ".join(words)


def _step_lr_tag(arms: Sequence[str]) -> str | None:
    """The ``step_lr=…`` part every arm shares, else None."""
    tags = {a.removesuffix("+bn").partition("/step_lr=")[2] or None for a in arms}
    return tags.pop() if len(tags) == 1 else None


def plot_transition_diagnostics(diag: pd.DataFrame, layer: str, *,
                                title: str = "", subtitle: str = "") -> Figure:
    """The transition experiment (docs/method.md §7) on the screening (lowest) seed, in one
    view: (a) for ``layer`` (:func:`hmqat.study.ablation.worst_layer` picks the worst), the
    step over the MSE-optimal step of every arm at each transition, scale-only-phase end and
    the end of training, with × for what Eq. T1 would have carried; (b) its share of zero
    codes at the same points (a and b share the x axis); (c) the task-loss jump at each
    transition; (d) the BN mean drift per BN layer that the final re-estimation removes.
    Arms keep one colour and marker in every panel, are named in plain words
    (:func:`arm_label`) in one legend above the panels, and a caption explains the terms."""
    _require(diag, ["seed", "arm", "kind", "layer", "when", "step"], "diag")
    seed = diag["seed"].min()                   # the screening seed: every arm ran on it
    runs = diag[(diag["seed"] == seed) & ~diag["arm"].str.endswith("+bn")]
    w = runs[(runs["kind"] == "weight") & (runs["layer"] == layer)].copy()
    if w.empty:
        raise PlotError(f"no weight diagnostics for layer {layer!r} on seed {seed}; layers: "
                        f"{sorted(runs.loc[runs['kind'] == 'weight', 'layer'].unique())[:5]}…")
    when_rank = {"transition": 0, "scale_only_end": 1, "end": 2}
    w["step"] = w["step"].astype(int)
    events = (w.assign(r=w["when"].map(when_rank)).sort_values(["step", "r"])[["when", "step"]]
              .drop_duplicates().itertuples(index=False, name=None))
    events = list(events)
    pos = {e: i for i, e in enumerate(events)}
    bn = diag[(diag["kind"] == "bn") & (diag["when"] == "end") & (diag["seed"] == seed)]
    if "run_id" in diag.columns:    # an arm may have several runs on a seed: its first one
        first = diag.groupby("arm", sort=False)["run_id"].first()
        w = w[w["run_id"].to_numpy() == first.reindex(w["arm"]).to_numpy()]
        bn = bn[bn["run_id"].to_numpy() == first.reindex(bn["arm"]).to_numpy()]
    w = w.drop_duplicates(["arm", "when", "step"])
    bn = bn.drop_duplicates(["arm", "layer"])
    every = list(dict.fromkeys(list(w["arm"]) + list(runs.loc[runs["kind"] == "loss", "arm"])
                               + list(bn["arm"])))
    shared = _step_lr_tag(every)
    bases = list(dict.fromkeys(a.removesuffix("+bn") for a in every))
    palette = sns.color_palette("colorblind", max(len(bases), 1))
    style = {b: {"color": palette[i], "marker": MARKERS[i % len(MARKERS)]}
             for i, b in enumerate(bases)}
    handles: dict[str, Any] = {}

    def label(arm: str) -> str:
        return arm_label(arm, step_lr=shared is None)

    with use_style():
        fig = plt.figure(figsize=(7.0, 7.6))
        grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 0.9, 1.2])
        ax_step = fig.add_subplot(grid[0, :])
        ax_zero = fig.add_subplot(grid[1, :], sharex=ax_step)
        ax_loss = fig.add_subplot(grid[2, 0])
        ax_bn = fig.add_subplot(grid[2, 1])
        for arm, sub in w.groupby("arm", sort=False):
            sub = sub.assign(x=[pos[(a, b)] for a, b in zip(sub["when"], sub["step"])])
            sub = sub.sort_values("x")
            st = style[arm]
            (line,) = ax_step.plot(sub["x"], sub["step_ratio"], lw=1.1, ms=5, alpha=0.9,
                                   label=label(arm), **st)
            handles.setdefault(label(arm), line)
            ax_zero.plot(sub["x"], sub["zero_frac"], lw=1.1, ms=5, alpha=0.9, **st)
        if "range_ratio" in w:
            carried = w.dropna(subset=["range_ratio"])
            if not carried.empty:
                handles["what Eq. T1 (range) would carry"] = ax_step.scatter(
                    [pos[(a, b)] for a, b in zip(carried["when"], carried["step"])],
                    carried["range_ratio"], marker="x", color="k", s=28, zorder=5,
                    label="what Eq. T1 (range) would carry")
        ax_step.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax_step.set_yscale("log")
        ax_step.yaxis.set_major_locator(mpl.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_step.yaxis.set_major_formatter(mpl.ticker.FormatStrFormatter("%g"))
        ax_step.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        ax_step.set_ylabel("step / MSE-optimal step")
        ax_step.set_title(f"(a) {layer}: weight step size at each event (1 = optimal)",
                          fontsize="small", loc="left")
        ax_step.tick_params(axis="x", labelbottom=False)
        ax_zero.set_ylabel("share of zero codes")
        ax_zero.set_title(f"(b) {layer}: weights rounded to 0", fontsize="small", loc="left")
        ax_zero.set_xticks(range(len(events)),
                           [f"{_WHEN_WORDS.get(a, a)}\nstep {b}" for a, b in events],
                           fontsize="x-small")
        ax_zero.set_xlim(-0.5, len(events) - 0.5)

        loss = runs[runs["kind"] == "loss"].copy()
        if not loss.empty and {"loss_before", "loss_after", "bits"} <= set(loss.columns):
            loss["jump"] = (pd.to_numeric(loss["loss_after"], errors="coerce")
                            - pd.to_numeric(loss["loss_before"], errors="coerce"))
            loss = loss.dropna(subset=["jump"])
            loss["stage"] = [f"to {'T' if b == 'target' else b} bits\nstep {int(t)}"
                             for b, t in zip(loss["bits"], loss["step"])]
            stages = list(dict.fromkeys(loss.sort_values("step")["stage"]))
            arms = list(dict.fromkeys(loss["arm"]))
            width = 0.8 / max(len(arms), 1)
            for j, arm in enumerate(arms):
                sub = loss[loss["arm"] == arm]
                xs = [stages.index(st) - 0.4 + (j + 0.5) * width for st in sub["stage"]]
                bars = ax_loss.bar(xs, sub["jump"], width, color=style[arm]["color"],
                                   edgecolor="0.2", linewidth=0.4,
                                   hatch=HATCHES[bases.index(arm) % len(HATCHES)])
                handles.setdefault(label(arm), bars)
            ax_loss.set_xticks(range(len(stages)), stages, fontsize="x-small")
        ax_loss.axhline(0.0, color="0.5", lw=0.8)
        ax_loss.set_ylabel("task loss: after − before")
        ax_loss.set_title("(c) loss jump at each transition", fontsize="small", loc="left")

        if not bn.empty:
            names = list(dict.fromkeys(bn["layer"]))
            for arm, sub in bn.groupby("arm", sort=False):
                base = arm.removesuffix("+bn")
                (line,) = ax_bn.plot([names.index(n) for n in sub["layer"]], sub["mean_shift"],
                                     lw=0.9, ms=3.5, ls="--", label=label(arm), **style[base])
                handles.setdefault(label(arm), line)
            ax_bn.set_xticks(range(len(names)), [n.replace("layer", "") for n in names],
                             rotation=90, fontsize=5)
        ax_bn.set_ylabel("|Δμ| / σ")
        ax_bn.set_title("(d) BN mean drift removed by re-estimation", fontsize="small",
                        loc="left")
        _titles(fig, title, subtitle)
        caption = (f"Seed {seed} (the screening seed), each arm's first run. T = the layer's "
                   f"target bit width. Eq. T1 carries the step across a width change by the "
                   f"range ratio; Eq. T2 re-initialises it to the MSE-optimal step from data; "
                   f"the scale-only phase trains only the steps after a transition."
                   + (f" Every arm: step lr = {shared}." if shared else ""))
        _legend_below(fig, list(handles.values()), list(handles), caption=caption, max_cols=2)
    return fig


# --------------------------------------------------------------------------------------------
# The budget axis (notebook 06)
# --------------------------------------------------------------------------------------------
def plot_budget_axis(table: pd.DataFrame, *, title: str | None = "Paired differences against "
                     "the QAT budget", subtitle: str | None = None) -> Figure:
    """One panel per pair of :func:`hmqat.study.budget.budget_table`: the paired test top-1
    difference a − b at each budget with its 95 % interval (over seeds and test images where
    the runs carry per-image bits), x = optimizer steps on a symmetric-log axis so 0 (PTQ)
    sits beside the trained budgets. A dotted line marks 0."""
    _require(table, ["steps", "budget", "pair", "diff", "ci_low", "ci_high"], "table")
    pairs = list(dict.fromkeys(table["pair"]))
    with use_style():
        ncols = min(2, len(pairs))
        nrows = math.ceil(len(pairs) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=_size(3.4 * ncols, 2.6 * nrows + 0.6),
                                 squeeze=False, sharex=True)
        steps = np.sort(table["steps"].unique())
        for ax, name in zip(axes.flat, pairs):
            sub = table[table["pair"] == name].sort_values("steps")
            x = sub["steps"].to_numpy(float)
            y = sub["diff"].to_numpy(float)
            lo, hi = sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float)
            has = np.isfinite(lo)
            ax.plot(x, y, color="C0", lw=1, zorder=2)
            ax.errorbar(x[has], y[has], yerr=[y[has] - lo[has], hi[has] - y[has]], fmt="o",
                        ms=4, color="C0", capsize=3, zorder=3, label="mean, 95 % interval")
            ax.scatter(x[~has], y[~has], marker="o", facecolor="white", edgecolor="C0", s=20,
                       zorder=3, label="one seed: no interval")
            ax.axhline(0, color="0.3", lw=0.8, ls=":")
            ax.set_xscale("symlog", linthresh=max(1.0, float(steps[steps > 0].min())
                                                  if (steps > 0).any() else 1.0))
            ax.xaxis.set_major_locator(FixedLocator(steps))
            ax.set_xticklabels([str(int(s)) for s in steps], fontsize="x-small")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(wrap_to_width(fig, name, "small", 0.45), fontsize="small")
            ax.set_ylabel("a − b (points)")
        for ax in axes.flat[len(pairs):]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel("QAT steps (0 = post-training, BN re-estimated)")
        _titles(fig, title, subtitle)
        _caption(fig, "Each budget is its own cosine schedule; a point above the dotted line "
                      "favours a (the mixed or Hessian-guided config). Intervals carry the "
                      "training seeds and the finite test set (Eq. V).")
    return fig


def plot_budget_accuracy_size(runs: pd.DataFrame, *, title: str | None = "Test top-1 vs size "
                              "at each QAT budget", subtitle: str | None = None) -> Figure:
    """Test top-1 (mean over seeds, bars = range over seeds) against size for every arm, one
    colour per budget; mixed configs are circles, uniform ones squares, random ones crosses."""
    _require(runs, ["label", "seed", "steps", "budget", "size_mb", "test_top1"], "runs")
    agg = (runs.groupby(["steps", "budget", "label"], sort=True)
           .agg(mean=("test_top1", "mean"), lo=("test_top1", "min"), hi=("test_top1", "max"),
                size_mb=("size_mb", "mean")).reset_index())
    with use_style():
        fig, ax = plt.subplots(figsize=_size(5.2, 3.6))
        handles, labels = [], []
        for i, (steps, sub) in enumerate(agg.groupby("steps", sort=True)):
            color = f"C{i}"
            for _, r in sub.iterrows():
                marker = ("s" if r["label"].startswith("uniform") else
                          "x" if r["label"].startswith("random") else "o")
                ax.errorbar(r["size_mb"] * 1024, r["mean"],
                            yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt=marker,
                            color=color, ms=5, capsize=2, lw=0.8)
            handles.append(mpl.lines.Line2D([], [], color=color, marker="o", ls=""))
            labels.append(f"budget {sub['budget'].iloc[0]}")
        for m, name in (("o", "mixed (HMQAT picks)"), ("s", "uniform"), ("x", "random")):
            handles.append(mpl.lines.Line2D([], [], color="0.3", marker=m, ls=""))
            labels.append(name)
        ax.set_xlabel("model size (KB)")
        ax.set_ylabel("test top-1 (%)")
        _titles(fig, title, subtitle)
        _legend_below(fig, handles, labels, caption="Mean over seeds; bars span the seeds.",
                      max_cols=4)
    return fig


def plot_walk(runs: pd.DataFrame, *, value: str = "test_top1", caption: str | None = None,
              title: str | None = "The frontier walk against separate QAT runs",
              subtitle: str | None = None) -> Figure:
    """Top-1 against model size for the frontier walk (notebook 07) and its two direct arms:
    one series per ``arm`` (marker and line style differ), the mean over seeds with bars of ±
    one standard deviation over seeds (none with one seed), the arms drawn side by side at each
    point's size, each point named above its highest mean. ``runs``: one row per (point, arm,
    seed) with ``size_mb`` and ``value`` (:func:`hmqat.study.walk_study.run_row`).
    ``caption``: text under the legend (e.g. the compute of each arm)."""
    _require(runs, ["point", "arm", "seed", "size_mb", value], "runs")
    agg = (runs.groupby(["arm", "point"], sort=False)
           .agg(mean=(value, "mean"), std=(value, "std"), size_mb=("size_mb", "first"))
           .reset_index())
    agg["std"] = agg["std"].fillna(0.0)
    arms = list(dict.fromkeys(runs["arm"]))
    sizes = np.sort(agg["size_mb"].unique()) * 1024
    dodge = 0.06 * (float(np.diff(sizes).min()) if len(sizes) > 1 else float(sizes[0]))
    with use_style():
        fig, ax = plt.subplots(figsize=_size(5.2, 3.6))
        handles = []
        for i, arm in enumerate(arms):
            sub = agg[agg["arm"] == arm].sort_values("size_mb")
            x = sub["size_mb"].to_numpy(float) * 1024 + (i - (len(arms) - 1) / 2) * dodge
            handles.append(ax.errorbar(x, sub["mean"], yerr=sub["std"], marker=MARKERS[i],
                                       ls=LINESTYLES[i], color=f"C{i}", ms=5, capsize=2,
                                       lw=1.0))
        for point, sub in agg.groupby("point", sort=False):
            top = float((sub["mean"] + sub["std"]).max())
            ax.annotate(str(point).removeprefix("HMQAT "),
                        (float(sub["size_mb"].iloc[0]) * 1024, top), xytext=(0, 5),
                        textcoords="offset points", ha="center", va="bottom",
                        fontsize="x-small", color="0.25")
        ax.margins(y=0.15)
        ax.set_xlabel("model size (KB)")
        ax.set_ylabel(f"{'test' if value.startswith('test') else 'validation'} top-1 (%)")
        _titles(fig, title, subtitle)
        note = "Mean over seeds; bars: ± 1 std over seeds; arms drawn side by side at each size."
        _legend_below(fig, handles, arms, caption=f"{note} {caption}" if caption else note,
                      max_cols=3)
    return fig


def plot_across_models(points: pd.DataFrame, *, title: str | None = "Test top-1 vs size "
                       "across models", subtitle: str | None = None) -> Figure:
    """Test top-1 against model size (KB, log scale) for every model of notebook 08: one colour
    per model, mixed configs (HMQAT picks) as circles joined by a line, uniform ones as squares,
    the FP32 model as a star; bars are ± one standard deviation over seeds. ``points``:
    :func:`hmqat.study.across_models.accuracy_points`."""
    _require(points, ["model", "config", "kind", "size MB", "test top-1", "± std"], "points")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(5.6, 3.8))
        handles, labels = [], []
        for i, (model, sub) in enumerate(points.groupby("model", sort=False)):
            color = f"C{i}"
            for kind, marker in (("mixed", "o"), ("uniform", "s"), ("fp32", "*")):
                part = sub[sub["kind"] == kind].sort_values("size MB")
                if part.empty:
                    continue
                ax.errorbar(part["size MB"] * 1024, part["test top-1"],
                            yerr=part["± std"].fillna(0.0), fmt=marker,
                            ls="-" if kind == "mixed" else "", color=color, ms=5 if
                            kind != "fp32" else 8, capsize=2, lw=0.8)
            handles.append(mpl.lines.Line2D([], [], color=color, lw=1.5))
            labels.append(str(model))
        for m, name in (("o", "mixed (HMQAT picks)"), ("s", "uniform"), ("*", "FP32")):
            handles.append(mpl.lines.Line2D([], [], color="0.3", marker=m, ls=""))
            labels.append(name)
        ax.set_xscale("log")
        ax.set_xlabel("model size (KB, log scale)")
        ax.set_ylabel("test top-1 (%)")
        _titles(fig, title, subtitle)
        _legend_below(fig, handles, labels, caption="Mean over seeds; bars: ± one standard "
                      "deviation over seeds. Each model is read from its own results folder.",
                      max_cols=3)
    return fig
