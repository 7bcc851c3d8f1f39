"""Result files: tables (CSV + Markdown + LaTeX) and ``manifest.json``.

Every result file is written atomically with :mod:`hmqat.runtime`, and every table names the
data it came from (docs/design.md §2). A table written by
:func:`write_table` is three files next to each other:

* ``<stem>.csv`` – the source of truth, full precision. Its first line is a comment
  ``# <caption> — data: <data label>; profile: <profile>``, so read it with
  ``pandas.read_csv(path, comment="#")`` (or :func:`read_table`). Cells therefore may not
  contain ``#``.
* ``<stem>.md`` – the caption line, then ``DataFrame.to_markdown(index=False)``.
* ``<stem>.tex`` – a ``table`` environment with caption and ``\\label{tab:<stem name>}``
  (pandas' Styler; needs jinja2).

Markdown and LaTeX share one number formatter, :func:`format_numbers`.

    >>> import pandas as pd
    >>> from pathlib import Path
    >>> from hmqat.study import reporting
    >>> df = pd.DataFrame({"config": ["W8", "W4"], "top1": [91.234, 90.1]})
    >>> paths = reporting.write_table(df, Path("results/smoke/tables/demo"), caption="Top-1",
    ...                               data_label=reporting.describe_data("synthetic", ""),
    ...                               profile="smoke")          # doctest: +SKIP
    >>> reporting.read_table(Path("results/smoke/tables/demo"))  # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .. import stats
from ..runtime import atomic_write_json, atomic_write_text, manifest, read_json
from .runs import correct_matrix

__all__ = [
    "HEADLINE_COLUMNS",
    "HEADLINE_FORMATS",
    "ReportingError",
    "describe_data",
    "headline_pairs",
    "format_numbers",
    "headline_table",
    "describe_comparison",
    "equal_size_pairs",
    "paired_comparisons",
    "paired_interval",
    "seeded_headline",
    "read_table",
    "step_finished",
    "update_manifest",
    "write_table",
]

Formatter = str | Callable[[Any], str]
FloatFormat = Formatter | Mapping[str, Formatter]

#: Columns of :func:`headline_table`'s result, in order.
HEADLINE_COLUMNS = ["config", "avg bits", "size MB", "compression", "BOPs (G)", "top-1",
                    "% of FP32", "search ms"]
#: Per-column number formats for the headline table (pass as ``float_format``).
HEADLINE_FORMATS: dict[str, Formatter] = {
    "avg bits": "{:.2f}", "size MB": "{:.3f}", "compression": "{:.1f}×", "BOPs (G)": "{:.2f}",
    "top-1": "{:.2f}", "% of FP32": "{:.1f}", "search ms": "{:.1f}",
}
MISSING = "–"   # how NaN shows in Markdown/LaTeX
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                   "^": r"\textasciicircum{}"}


class ReportingError(ValueError):
    """A table, manifest or JSON object cannot be written as asked."""


# --------------------------------------------------------------------------------------------
# Which data a result came from
# --------------------------------------------------------------------------------------------
def _provenance_mentions_jpeg(source: str) -> bool:
    """True when ``source`` or one of its two parents holds a PROVENANCE.md mentioning JPEG."""
    try:
        start = Path(source).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    for folder in [start, *start.parents][:3]:
        prov = folder / "PROVENANCE.md"
        if prov.is_file():
            return "JPEG" in prov.read_text(encoding="utf-8", errors="replace")
    return False


def describe_data(dataset: str, source: str) -> str:
    """The human label of a dataset, used in every table and figure (docs/design.md §5).

    ``source`` is ``TensorImages.source`` (an ImageFolder split folder, ``torchvision:<dir>`` or
    ``synthetic(...)``). An ImageFolder root whose PROVENANCE.md (in the folder or up to two
    parents) mentions JPEG is the JPEG q75 mirror."""
    dataset_l, source = dataset.lower(), str(source)
    if dataset_l == "synthetic" or source.startswith("synthetic"):
        return "synthetic data (smoke test)"
    if source.startswith("torchvision:"):
        return "CIFAR-10 (original, torchvision)"
    if dataset_l == "imagenet":
        return "ImageNet (ImageFolder)"
    if source and _provenance_mentions_jpeg(source):
        return "CIFAR-10 (JPEG q75 mirror)"
    # the folder's name only: a table names its data, never a build machine's absolute path
    return f"{dataset} (ImageFolder {Path(source).name})" if source else dataset


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _apply(fmt: Formatter, value: Any, column: str) -> str:
    try:
        return fmt(value) if callable(fmt) else fmt.format(value)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ReportingError(f"number format {fmt!r} for column {column!r} failed on {value!r} "
                             f"({exc}); use a format like '{{:.2f}}'") from exc


def format_numbers(df: pd.DataFrame, float_format: FloatFormat = "{:.2f}") -> pd.DataFrame:
    """The one number formatter for Markdown and LaTeX tables: a copy of ``df`` as strings.

    ``float_format`` is a ``str.format`` pattern (``"{:.2f}"``) or callable for every float
    column, or a mapping ``{column: format}`` (float columns not named use ``"{:.2f}"``; a
    named column is formatted even if integer). Integers print as integers, NaN as "–"."""
    if isinstance(float_format, Mapping):
        unknown = [c for c in float_format if c not in df.columns]
        if unknown:
            raise ReportingError(f"float_format names column(s) {unknown} that the table does "
                                 f"not have; its columns are {list(df.columns)}")
        formats, default = dict(float_format), "{:.2f}"
    else:
        formats, default = {}, float_format
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        values = df[col]
        fmt = formats.get(col)
        if fmt is None and pd.api.types.is_float_dtype(values):
            fmt = default
        if fmt is None:
            out[col] = [MISSING if _is_missing(v) else str(v) for v in values]
        else:
            out[col] = [MISSING if _is_missing(v) else _apply(fmt, v, str(col)) for v in values]
    return out


def _is_missing(value: Any) -> bool:
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def _header(caption: str, data_label: str, profile: str) -> str:
    return f"{caption} — data: {data_label}; profile: {profile}"


def write_table(df: pd.DataFrame, stem: str | os.PathLike, *, caption: str, data_label: str,
                profile: str, float_format: FloatFormat = "{:.2f}") -> dict[str, Path]:
    """Write ``df`` as ``stem.csv`` (full precision, first line ``# <caption> — data: <label>;
    profile: <profile>``; read with ``pandas.read_csv(..., comment="#")``), ``stem.md`` and
    ``stem.tex`` (numbers via :func:`format_numbers`), each atomically (docs/design.md §4).

    Returns ``{"csv": path, "md": path, "tex": path}``."""
    stem = Path(stem)
    header = _header(caption, data_label, profile)
    if "\n" in header or "\r" in header:
        raise ReportingError(f"caption, data_label and profile must be one line each, got "
                             f"{header!r}")
    if any(name is not None for name in df.index.names):
        df = df.reset_index()          # a named index (e.g. layer) becomes the first column
    for col in df.columns:
        if "#" in str(col):
            raise ReportingError(f"column name {col!r} contains '#', which CSV readers using "
                                 f"comment='#' would cut off; rename the column")
        if not pd.api.types.is_numeric_dtype(df[col]):
            bad = [v for v in df[col] if "#" in str(v)]
            if bad:
                raise ReportingError(f"column {col!r} holds {bad[0]!r}: '#' would start a "
                                     f"comment for readers using comment='#'; replace it "
                                     f"(e.g. 'no.')")
    shown = format_numbers(df, float_format)
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]

    csv_text = f"# {header}\n" + df.to_csv(index=False, lineterminator="\n")
    md_text = f"{header}\n\n" + shown.to_markdown(
        index=False, disable_numparse=True,
        colalign=["right" if n else "left" for n in numeric]) + "\n"
    styler = shown.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis=1)
    tex_text = styler.to_latex(caption=_latex_escape(header), label=f"tab:{stem.name}",
                               hrules=True, position_float="centering",
                               column_format="".join("r" if n else "l" for n in numeric))
    return {"csv": atomic_write_text(stem.with_name(stem.name + ".csv"), csv_text),
            "md": atomic_write_text(stem.with_name(stem.name + ".md"), md_text),
            "tex": atomic_write_text(stem.with_name(stem.name + ".tex"), tex_text)}


def read_table(stem: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (``stem`` with or without ``.csv``)."""
    stem = Path(stem)
    path = stem if stem.suffix == ".csv" else stem.with_name(stem.name + ".csv")
    if not path.is_file():
        raise FileNotFoundError(f"no table at {path}; write it with write_table(df, {stem!s}, ...) "
                                f"or check the results folder")
    return pd.read_csv(path, comment="#")


# --------------------------------------------------------------------------------------------
# manifest.json
# --------------------------------------------------------------------------------------------
def update_manifest(path: str | os.PathLike, step: str, **fields: Any) -> dict[str, Any]:
    """Merge ``{"steps": {step: fields}}`` into ``manifest.json`` atomically and return it.

    A missing manifest starts from :func:`hmqat.runtime.manifest` (git sha, versions, device).
    Fields already recorded for ``step`` are kept unless given again. A read-modify-write: call
    it only while holding the results folder's lock (:func:`hmqat.locking.results_lock`), as
    :func:`hmqat.study.pipeline.run_pipeline` does for all its steps."""
    path = Path(path)
    if not step:
        raise ReportingError("update_manifest needs a non-empty step name, e.g. '01_sensitivity'")
    if path.exists():
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("steps", {}), dict):
            raise ReportingError(f"{path} is not a manifest (expected a JSON object whose "
                                 f"'steps' is an object); move it away and rerun")
    else:
        data = manifest()
    steps = data.setdefault("steps", {})
    steps[step] = {**steps.get(step, {}), **fields}
    atomic_write_json(path, data)
    return data


#: Manifest statuses of a step whose files are not this run's results: ``stale`` (a step it
#: reads has rerun since, :meth:`hmqat.study.pipeline._Steps.mark_readers_stale`), or a failed
#: or unfinished attempt.
UNFINISHED = ("running", "failed", "stale")


def step_finished(manifest_data: Mapping[str, Any], step: str) -> bool:
    """True when a manifest (its parsed JSON) records ``step`` and not as one of
    :data:`UNFINISHED`: the step's files are then this run's results, not an earlier run's or a
    failed attempt's (notebook 05's report and :mod:`hmqat.study.summary` both ask)."""
    steps = manifest_data.get("steps", {})
    return step in steps and steps[step].get("status") not in UNFINISHED


# --------------------------------------------------------------------------------------------
# The headline table
# --------------------------------------------------------------------------------------------
def headline_table(rows: pd.DataFrame, fp32_top1: float) -> pd.DataFrame:
    """The study's headline table: one row per config, largest first.

    ``rows`` has columns config, avg_bits, size_mb, compression, bops, top1 and optionally
    search_ms (NaN where not applicable). Output columns: :data:`HEADLINE_COLUMNS`, with
    ``BOPs (G) = bops / 1e9`` and ``% of FP32 = 100 · top1 / fp32_top1``."""
    required = ["config", "avg_bits", "size_mb", "compression", "bops", "top1"]
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise ReportingError(f"headline_table rows lack column(s) {missing}; they need "
                             f"{required} (+ optional search_ms)")
    if not (isinstance(fp32_top1, (int, float)) and math.isfinite(fp32_top1) and fp32_top1 > 0):
        raise ReportingError(f"fp32_top1 must be a positive accuracy in percent, got "
                             f"{fp32_top1!r}")
    search = rows["search_ms"] if "search_ms" in rows.columns else float("nan")
    out = pd.DataFrame({
        "config": rows["config"].astype(str),
        "avg bits": rows["avg_bits"].astype(float),
        "size MB": rows["size_mb"].astype(float),
        "compression": rows["compression"].astype(float),
        "BOPs (G)": rows["bops"].astype(float) / 1e9,
        "top-1": rows["top1"].astype(float),
        "% of FP32": 100.0 * rows["top1"].astype(float) / float(fp32_top1),
        "search ms": pd.Series(search, index=rows.index, dtype=float),
    })
    return out.sort_values("size MB", ascending=False, kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Seeded runs: mean ± std per config and paired differences with a CI (docs/method.md §8)
# --------------------------------------------------------------------------------------------
#: Per-column number formats for :func:`seeded_headline`'s table (pass as ``float_format``).
SEEDED_FORMATS: dict[str, Formatter] = {
    "avg bits": "{:.2f}", "size MB": "{:.3f}", "compression": "{:.1f}×", "BOPs (G)": "{:.2f}",
    "test top-1": "{:.2f}", "± std": "{:.2f}", "seeds": "{:.0f}", "% of FP32": "{:.1f}",
    "val top-1": "{:.2f}",
}


def _check_runs(runs: pd.DataFrame, value: str) -> None:
    need = ["label", "seed", "avg_bits", "size_mb", "compression", "bops", value]
    missing = [c for c in need if c not in runs.columns]
    if missing:
        raise ReportingError(f"seeded runs lack column(s) {missing}; one row per (label, seed) "
                             f"with {need}")


def seeded_headline(runs: pd.DataFrame, fp32_top1: float, *, value: str = "test_top1"
                    ) -> pd.DataFrame:
    """One row per config over its seeds: avg bits, size, compression (of the whole model, Eq. S)
    and the weights-only compression 32 / avg bits (HAWQ's count), BOPs (G) next to size
    (Eq. S, Eq. B; docs/design.md §3.1), the mean and std of ``value`` over seeds, the seed
    count, ``% of FP32`` of the mean, and the mean validation top-1 when ``val_top1`` is a
    column (a ranking score, optimistic in absolute terms: docs/method.md §8). Largest first."""
    _check_runs(runs, value)
    if not (isinstance(fp32_top1, (int, float)) and math.isfinite(fp32_top1) and fp32_top1 > 0):
        raise ReportingError(f"fp32_top1 must be a positive accuracy in percent, got "
                             f"{fp32_top1!r}")
    summary = stats.seed_summary(runs, "label", value)
    first = runs.groupby("label", sort=False)[["avg_bits", "size_mb", "compression",
                                                "bops"]].first()
    out = pd.DataFrame({
        "config": summary["label"].astype(str),
        "avg bits": first.loc[summary["label"], "avg_bits"].to_numpy(float),
        "size MB": first.loc[summary["label"], "size_mb"].to_numpy(float),
        "compression": first.loc[summary["label"], "compression"].to_numpy(float),
        # weights only (32 / average weight bits), the way HAWQ counts its 13.11x
        "W-only compression": 32.0 / first.loc[summary["label"], "avg_bits"].to_numpy(float),
        "BOPs (G)": first.loc[summary["label"], "bops"].to_numpy(float) / 1e9,
        "test top-1": summary["mean"].to_numpy(float),
        "± std": summary["std"].to_numpy(float),
        "seeds": summary["seeds"].to_numpy(int),
        "% of FP32": 100.0 * summary["mean"].to_numpy(float) / float(fp32_top1),
    })
    if "val_top1" in runs.columns:
        out["val top-1"] = runs.groupby("label", sort=False)["val_top1"].mean().loc[
            summary["label"]].to_numpy(float)
    return out.sort_values("size MB", ascending=False, kind="stable").reset_index(drop=True)


#: The per-image column (:func:`hmqat.study.runs.pack_correct`) and image count behind a score.
PER_IMAGE = {"test_top1": ("test_correct", "n_test"), "val_top1": ("correct", "n_val")}


def paired_comparisons(runs: pd.DataFrame, pairs: Sequence[tuple[str, str]], *,
                       value: str = "test_top1", confidence: float = 0.95,
                       size_tol: float = 0.01) -> pd.DataFrame:
    """``a − b`` of ``value`` paired by seed, with a ``confidence`` interval, for each
    ``(a, b)`` label pair. Columns: a, b, seeds, images, size gap % and BOPs ratio of a to b,
    diff, ci_low, ci_high, half_width, interval, significant (the CI excludes 0), equal_size
    (|size gap| <= ``size_tol``).

    When ``runs`` carries the per-image bits of ``value`` (:data:`PER_IMAGE`: e.g.
    ``test_correct`` and ``n_test`` for ``test_top1``) for every paired seed, the interval is
    :func:`hmqat.stats.crossed_paired_difference` over seeds *and* images (``interval`` =
    "seeds × images"); otherwise the seed-only paired t interval, which treats the evaluation
    images as fixed (``interval`` = "seeds only"). With fewer than 2 shared seeds the difference
    is shown and the interval is NaN: one seed screens, it does not decide."""
    _check_runs(runs, value)
    bits_col, n_col = PER_IMAGE.get(value, (None, None))
    rows = []
    for a, b in pairs:
        wide = runs[runs["label"].isin([a, b])].pivot_table(index="seed", columns="label",
                                                             values=value, aggfunc="first")
        if a not in wide.columns or b not in wide.columns:
            raise ReportingError(f"paired comparison {a!r} vs {b!r}: no runs labelled "
                                 f"{[x for x in (a, b) if x not in wide.columns]}; labels: "
                                 f"{sorted(runs['label'].unique())}")
        both = wide[[a, b]].dropna()
        ra = runs[runs["label"] == a].iloc[0]
        rb = runs[runs["label"] == b].iloc[0]
        gap = float(ra["size_mb"]) / float(rb["size_mb"]) - 1.0
        row = {"a": a, "b": b, "seeds": len(both), "images": 0, "size gap %": 100 * gap,
               "BOPs ratio": float(ra["bops"]) / float(rb["bops"]),
               "diff": float((both[a] - both[b]).mean()) if len(both) else math.nan,
               "ci_low": math.nan, "ci_high": math.nan, "half_width": math.nan,
               "interval": "", "significant": False, "equal_size": abs(gap) <= size_tol}
        if len(both) >= 2:
            d = paired_interval(runs, a, b, value=value, confidence=confidence)
            row.update(images=d.n_images,
                       interval="seeds × images" if d.n_images else "seeds only",
                       diff=d.mean, ci_low=d.low, ci_high=d.high, half_width=d.half_width,
                       significant=d.excludes_zero)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_interval(runs: pd.DataFrame, a: str, b: str, *, value: str = "test_top1",
                    confidence: float = 0.95) -> stats.PairedDifference:
    """The interval of label ``a`` − label ``b`` over the seeds both ran (≥ 2): over seeds and
    images when every run carries its per-image bits (:data:`PER_IMAGE`), else the seed-only
    paired t interval. The one place tables and figures get a comparison's interval from."""
    wide = runs[runs["label"].isin([a, b])].pivot_table(index="seed", columns="label",
                                                         values=value, aggfunc="first")
    both = wide[[a, b]].dropna()
    bits_col, n_col = PER_IMAGE.get(value, (None, None))
    mats = _per_image(runs, (a, b), list(both.index), bits_col, n_col)
    if mats is not None:
        return stats.crossed_paired_difference(mats[0], mats[1], confidence)
    return stats.paired_difference(both[a], both[b], confidence)


def _per_image(runs: pd.DataFrame, labels: Sequence[str], seeds: Sequence[Any],
               bits_col: str | None, n_col: str | None) -> list | None:
    """Each label's (seeds, images) matrix of 100 × correct over ``seeds``, or None when a
    run lacks its per-image bits."""
    if bits_col is None or bits_col not in runs.columns or n_col not in runs.columns:
        return None
    out = []
    for label in labels:
        sub = runs[runs["label"] == label].drop_duplicates("seed").set_index("seed")
        recs = [{bits_col: sub.at[s, bits_col], n_col: sub.at[s, n_col]} for s in seeds]
        if any(not isinstance(r[bits_col], str) for r in recs):
            return None
        out.append(correct_matrix(recs, bits_col, n_col))
    if out[0].shape != out[1].shape:
        raise ReportingError(f"{labels[0]!r} and {labels[1]!r} were scored on different "
                             f"image counts ({out[0].shape[1]} vs {out[1].shape[1]})")
    return out


def equal_size_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """``(mixed, uniform)`` label pairs at equal size: notebook 02's ``"HMQAT =W{w}A{a} size"``
    pick with notebook 03's ``"uniform W{w}A{a}"`` run, for every such pair present."""
    present = set(labels)
    pairs = []
    for label in dict.fromkeys(labels):
        if label.startswith("HMQAT =W") and label.endswith(" size"):
            uniform = "uniform " + label[len("HMQAT ="):-len(" size")]
            if uniform in present:
                pairs.append((label, uniform))
    return pairs


def headline_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """The study's paired comparisons of notebook 03's runs: every equal-size pair
    (:func:`equal_size_pairs`), then the 13.11× pick against uniform W2A4 (the trade of size
    for accuracy) when both ran."""
    pairs = equal_size_pairs(labels)
    if {"HMQAT 13.11x", "uniform W2A4"} <= set(labels):
        pairs.append(("HMQAT 13.11x", "uniform W2A4"))
    return pairs


def describe_comparison(row: Mapping[str, Any]) -> str:
    """One sentence for a :func:`paired_comparisons` row that says only what its interval
    supports: with one seed "a screen, not a result"; else the CI and whether it excludes 0."""
    head = (f"{row['a']} − {row['b']}: {row['diff']:+.2f} points test top-1 "
            f"(size gap {row['size gap %']:+.2f} %, BOPs ×{row['BOPs ratio']:.2f})")
    if int(row["seeds"]) < 2 or not math.isfinite(float(row["ci_low"])):
        return head + f", {int(row['seeds'])} seed, no interval: a screen, not a result."
    verdict = ("the interval excludes 0" if row["significant"]
               else "the interval includes 0: no difference shown")
    over = f"{int(row['seeds'])} seeds"
    if int(row.get("images", 0) or 0):
        over += f" and {int(row['images'])} test images"
    return (head + f", 95 % CI [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] over "
                   f"{over}; {verdict}.")
