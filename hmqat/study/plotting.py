"""The study's standard figures (docs/design.md §5: every figure names its data), saved as PNG + PDF.

Every ``plot_*`` function returns a matplotlib Figure drawn under :func:`use_style` (seaborn
"paper" context, "ticks" style, colour-blind palette, constrained layout, sizes 3.4–7 in) and
takes ``title`` and ``subtitle``; put the data label and profile in the subtitle so each figure
names its data (``reporting.describe_data``). Figures stay readable in greyscale: series differ
by marker, line style or hatch, and heat-map cells carry their number. Save with
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

__all__ = [
    "HATCHES",
    "LINESTYLES",
    "MARKERS",
    "PlotError",
    "plot_ablation",
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
    "savefig",
    "use_style",
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


def _titles(fig: Figure, title: str | None, subtitle: str | None) -> None:
    """Title (bold) and subtitle (data label + profile) as the figure's suptitle."""
    lines = [t for t in (title, subtitle) if t]
    if lines:
        fig.suptitle("\n".join(lines), fontsize="medium")


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
        getattr(ax, f"set_{vaxis}label")(f"avg. trace Tr(H)/n  (±{n_se:g} SE)")
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
def plot_accuracy_size(df: pd.DataFrame, *, x: str = "size_mb", y: str = "top1",
                       kind_col: str = "kind", label_col: str = "label",
                       fp32_top1: float | None = None, yerr: str | None = None,
                       title: str | None = "Top-1 accuracy vs model size",
                       subtitle: str | None = None) -> Figure:
    """Top-1 vs size. Each ``kind`` whose name contains "uniform" is drawn as separate points
    with distinct markers and direct text labels (``label_col``); every other kind (e.g. the
    mixed-precision method) is a line with markers, its points annotated with their
    ``compression`` (when that column exists). FP32 is a dashed horizontal line. Labels are
    placed clear of each other, the markers and the legend (:func:`_place_labels`).
    ``yerr``: a column of ± error (e.g. the std over seeds), drawn as error bars; ``x="bops"``
    gives the accuracy-vs-compute figure (docs/method.md §8)."""
    _require(df, [x, y, kind_col] + ([yerr] if yerr else []), "df")
    kinds = list(dict.fromkeys(df[kind_col].astype(str)))
    labels: list[tuple[str, list[tuple[float, float]], dict]] = []
    small: list[tuple[str, list[tuple[float, float]], dict]] = []
    with use_style():
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


def plot_ablation(df: pd.DataFrame, *, x: str = "variant", y: str = "top1",
                  group_col: str | None = "group", err: str | None = None,
                  title: str | None = "Ablations", subtitle: str | None = None) -> Figure:
    """Horizontal bars of ``y`` per ``x`` (variant), one panel per ``group_col`` value, one
    hatch per variant, mean value written past each bar. When the values are close, the axis
    starts at a round number below them and the x label says so (:func:`_zoomed_origin`).
    Several rows per variant (seeds) give ±SD error bars (seaborn ``errorbar="sd"``); ``err``
    names a column of precomputed SDs instead."""
    _require(df, [x, y] + ([group_col] if group_col else []) + ([err] if err else []), "df")
    if err and df.groupby([group_col, x] if group_col else [x]).size().max() > 1:
        raise PlotError(f"err={err!r} gives precomputed SDs, so each variant needs one row; "
                        f"pass err=None to compute SDs over repeated rows (seeds)")
    data = df.assign(**{x: df[x].astype(str)})
    groups = list(dict.fromkeys(data[group_col].astype(str))) if group_col else [None]
    sizes = [data[data[group_col].astype(str) == g][x].nunique() if g else data[x].nunique()
             for g in groups]
    with use_style():
        fig, axes = plt.subplots(len(groups), 1, squeeze=False, sharex=True,
                                 height_ratios=sizes,
                                 figsize=_size(4.6, 0.28 * sum(sizes) + 0.55 * len(groups) + 1))
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
                 xlabel: str = "Kendall τ (ΣΩ vs PTQ loss increase)") -> Figure:
    """τ per predictor with its CI as a horizontal error bar, sorted by τ."""
    _require(df, ["predictor", "kendall_tau", "tau_low", "tau_high"], "df")
    d = df.sort_values("kendall_tau")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(4.2, 0.28 * len(d) + 1.2))
        yy = np.arange(len(d))
        t = d["kendall_tau"].to_numpy(float)
        ax.errorbar(t, yy, xerr=[t - d["tau_low"].to_numpy(float),
                                 d["tau_high"].to_numpy(float) - t],
                    fmt="o", ms=4, lw=0.9, color="0.2")
        ax.axvline(0, color="0.6", lw=0.7, ls=":")
        ax.set_yticks(yy, [str(p).removeprefix("omega_") for p in d["predictor"]])
        ax.set_xlabel(xlabel)
        _titles(fig, title, subtitle)
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
                      subtitle: str | None = None) -> Figure:
    """Top-1 against the target compression: the random configs as a grey strip (median line),
    each variant's pick as its own marker (slightly offset so ties stay visible)."""
    _require(df, ["target_compression", "kind", "name", "top1"], "df")
    with use_style():
        fig, ax = plt.subplots(figsize=_size(6.0, 3.6))
        rnd = df[df["kind"] == "random"]
        targets = sorted(df["target_compression"].unique())
        ax.scatter(rnd["target_compression"], rnd["top1"], s=8, color="0.65", alpha=0.7,
                   label="random, same size", zorder=1)
        med = rnd.groupby("target_compression")["top1"].median()
        ax.plot(med.index, med.to_numpy(), color="0.45", lw=1, ls="--", label="random median")
        picks = df[df["kind"] == "pick"]
        names = list(dict.fromkeys(picks["name"]))
        span = (max(targets) - min(targets)) if len(targets) > 1 else 1.0
        palette = sns.color_palette("colorblind", len(names))
        for i, v in enumerate(names):
            sub = picks[picks["name"] == v].sort_values("target_compression")
            off = (i - (len(names) - 1) / 2) * 0.012 * span
            ax.plot(sub["target_compression"] + off, sub["top1"], marker=MARKERS[i % 10],
                    ls=LINESTYLES[i % len(LINESTYLES)], lw=0.8, ms=5, color=palette[i],
                    mec="0.15", mew=0.3, label=v, zorder=3)
        ax.set_xlabel("target compression (×)")
        ax.set_ylabel("top-1 (%)")
        ax.legend(fontsize="x-small", frameon=False, ncol=2)
        _titles(fig, title, subtitle)
    return fig


def plot_transition_diagnostics(diag: pd.DataFrame, layer: str, *,
                                title: str = "", subtitle: str = "") -> Figure:
    """Four panels of the transition experiment (docs/method.md §7), on the screening (lowest)
    seed: for ``layer`` (:func:`hmqat.study.ablation.worst_layer` picks the worst) the step / MSE-optimal step of every arm at each transition, scale-only-phase end and the
    end of training (× what Eq. T1 would have carried) and its zero-code fraction; the task-loss
    jump at each transition; the BN mean drift per BN layer removed by the final
    re-estimation."""
    seed = diag["seed"].min()                   # the screening seed: every arm ran on it
    runs = diag[(diag["seed"] == seed) & ~diag["arm"].str.endswith("+bn")]
    w = runs[(runs["kind"] == "weight") & (runs["layer"] == layer)].copy()
    when_rank = {"transition": 0, "scale_only_end": 1, "end": 2}
    w["point"] = w["when"] + "@" + w["step"].astype(int).astype(str)
    order = (w.assign(r=w["when"].map(when_rank)).sort_values(["step", "r"])["point"]
             .drop_duplicates().tolist())
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    sns.pointplot(data=w, x="point", y="step_ratio", hue="arm", ax=axes[0], errorbar=None,
                  order=order)
    carried = w.dropna(subset=["range_ratio"])
    if not carried.empty:
        axes[0].scatter([order.index(p) for p in carried["point"]], carried["range_ratio"],
                        marker="x", color="k", label="carried by range (Eq. T1)", zorder=5)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(yscale="log", ylabel="step / MSE-optimal step", xlabel="",
                title=f"{layer}: step vs Eq. T2 optimum")
    axes[0].legend(fontsize=7)
    sns.pointplot(data=w, x="point", y="zero_frac", hue="arm", ax=axes[1], errorbar=None,
                  order=order, legend=False)
    axes[1].set(ylabel="fraction of zero codes", xlabel="", title=f"{layer}: zero codes")
    loss = runs[runs["kind"] == "loss"].copy()
    if not loss.empty:
        loss["jump"] = (pd.to_numeric(loss["loss_after"], errors="coerce")
                        - pd.to_numeric(loss["loss_before"], errors="coerce"))
        loss["stage_bits"] = loss["bits"].astype(str) + "@" + loss["step"].astype(int).astype(str)
        sns.barplot(data=loss.dropna(subset=["jump"]), x="stage_bits", y="jump", hue="arm",
                    ax=axes[2], errorbar=None)
    axes[2].axhline(0.0, color="grey", lw=0.8)
    axes[2].set(ylabel="task loss: step at new width − step before", xlabel="stage@step",
                title="loss jump at each transition")
    bn = diag[(diag["kind"] == "bn") & (diag["when"] == "end") & (diag["seed"] == seed)]
    if not bn.empty:
        sns.barplot(data=bn, x="layer", y="mean_shift", hue="arm", ax=axes[3], errorbar=None)
        axes[3].tick_params(axis="x", rotation=90, labelsize=6)
    axes[3].set(ylabel="|Δμ| / σ (running mean drift)", xlabel="",
                title="BN drift fixed by the final re-estimation")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return fig
