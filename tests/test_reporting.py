"""Tests for hmqat.study.reporting (docs/design.md §2): data labels, tables, manifest, headline
table."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmqat.runtime import read_json
from hmqat.study import reporting
from hmqat.study.reporting import (
    HEADLINE_COLUMNS,
    HEADLINE_FORMATS,
    ReportingError,
    describe_data,
    format_numbers,
    headline_table,
    read_table,
    update_manifest,
    write_table,
)


def _no_tmp(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# describe_data
# --------------------------------------------------------------------------------------------
def test_describe_data_finds_jpeg_provenance_up_to_two_parents(tmp_path):
    root = tmp_path / "cifar10-jpeg"
    (root / "cifar10" / "test").mkdir(parents=True)
    (root / "PROVENANCE.md").write_text("# CIFAR-10\nre-encoded as baseline JPEG, quality 75\n")
    for source in (root, root / "cifar10", root / "cifar10" / "test"):
        assert describe_data("cifar10", str(source)) == "CIFAR-10 (JPEG q75 mirror)"
    deeper = root / "cifar10" / "test" / "airplane"
    deeper.mkdir()
    # three levels: no; the label names the folder only, never an absolute path
    assert describe_data("cifar10", str(deeper)) == "cifar10 (ImageFolder airplane)"


def test_describe_data_provenance_without_jpeg_falls_back(tmp_path):
    (tmp_path / "PROVENANCE.md").write_text("PNG files")
    assert describe_data("cifar10", str(tmp_path)) == f"cifar10 (ImageFolder {tmp_path.name})"


@pytest.mark.parametrize("dataset,source,label", [
    ("cifar10", "torchvision:/home/u/.cache/hmqat/cifar10", "CIFAR-10 (original, torchvision)"),
    ("synthetic", "synthetic(n=512,seed=0)", "synthetic data (smoke test)"),
    ("cifar10", "synthetic(n=64,seed=1)", "synthetic data (smoke test)"),
    ("imagenet", "/data/imagenet/train", "ImageNet (ImageFolder)"),
    ("cifar10", "/no/such/dir", "cifar10 (ImageFolder dir)"),
    ("svhn", "", "svhn"),
])
def test_describe_data_cases(dataset, source, label):
    assert describe_data(dataset, source) == label


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _frame() -> pd.DataFrame:
    return pd.DataFrame({"config": ["W8 (uniform)", "mixed_10x"], "bits": [8, 3],
                         "top1": [91.2345, 90.5], "ms": [float("nan"), 12.25]})


def test_write_table_writes_three_files_with_caption_data_and_profile(tmp_path):
    df = _frame()
    paths = write_table(df, tmp_path / "tables" / "headline", caption="Top-1 at 10% budget",
                        data_label="CIFAR-10 (JPEG q75 mirror)", profile="quick")
    assert set(paths) == {"csv", "md", "tex"}
    assert [p.name for p in paths.values()] == ["headline.csv", "headline.md", "headline.tex"]
    header = "Top-1 at 10% budget — data: CIFAR-10 (JPEG q75 mirror); profile: quick"
    csv, md, tex = (p.read_text(encoding="utf-8") for p in paths.values())
    assert csv.splitlines()[0] == f"# {header}"
    assert md.splitlines()[0] == header
    assert "| W8 (uniform) |" in md and "91.23" in md and "–" in md   # formatted, NaN as dash
    assert re.search(r"\|\s+8\s+\|", md) and "8.00" not in md            # ints stay ints
    assert (r"\caption{Top-1 at 10\% budget — data: CIFAR-10 (JPEG q75 mirror); profile: quick}"
            in tex)
    assert r"\label{tab:headline}" in tex and r"mixed\_10x" in tex and "91.23" in tex
    pd.testing.assert_frame_equal(read_table(tmp_path / "tables" / "headline"), df)
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"], comment="#"), df)
    _no_tmp(tmp_path)


def test_write_table_per_column_formats_and_named_index(tmp_path):
    df = pd.DataFrame({"avg_trace": [1.23456, 0.5]}, index=pd.Index(["conv1", "fc"], name="layer"))
    paths = write_table(df, tmp_path / "traces", caption="c", data_label="d", profile="smoke",
                        float_format={"avg_trace": "{:.3e}"})
    md = paths["md"].read_text(encoding="utf-8")
    assert "1.235e+00" in md and "| layer" in md
    back = read_table(paths["csv"])
    assert list(back.columns) == ["layer", "avg_trace"]
    assert back["avg_trace"].tolist() == [1.23456, 0.5]


def test_format_numbers_is_the_one_formatter():
    out = format_numbers(pd.DataFrame({"a": [1.0, float("nan")], "n": [3, 4], "s": ["x", None]}),
                         {"n": "{:03d}"})
    assert out.to_dict("list") == {"a": ["1.00", "–"], "n": ["003", "004"], "s": ["x", "–"]}
    assert format_numbers(pd.DataFrame({"a": [2.0]}), lambda v: f"<{v:g}>")["a"][0] == "<2>"


@pytest.mark.parametrize("kwargs,match", [
    ({"float_format": {"nope": "{:.1f}"}}, "names column.*'nope'"),
    ({"float_format": "{:d}"}, "number format '\\{:d\\}' for column 'top1'"),
    ({"caption": "two\nlines"}, "one line each"),
])
def test_write_table_rejects_bad_arguments(tmp_path, kwargs, match):
    args = {"caption": "c", "data_label": "d", "profile": "p", **kwargs}
    with pytest.raises(ReportingError, match=match):
        write_table(_frame(), tmp_path / "t", **args)
    _no_tmp(tmp_path)


def test_write_table_rejects_hash_in_cells_and_columns(tmp_path):
    with pytest.raises(ReportingError, match="column 'config' holds 'run #3'"):
        write_table(pd.DataFrame({"config": ["run #3"]}), tmp_path / "t", caption="c",
                    data_label="d", profile="p")
    with pytest.raises(ReportingError, match="column name '# layers'"):
        write_table(pd.DataFrame({"# layers": [3]}), tmp_path / "t", caption="c",
                    data_label="d", profile="p")


def test_read_table_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no table at .*missing.csv"):
        read_table(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------
def test_update_manifest_creates_with_provenance_and_merges_steps(tmp_path):
    path = tmp_path / "results" / "manifest.json"
    update_manifest(path, "00_fp32_baseline", wall_s=12.5)
    first = read_json(path)
    assert {"git_sha", "python", "torch", "device", "time_utc"} <= set(first)
    update_manifest(path, "01_sensitivity", wall_s=np.float64(3.0))
    data = update_manifest(path, "00_fp32_baseline", top1=91.0)
    assert data == read_json(path)
    assert data["steps"] == {"00_fp32_baseline": {"wall_s": 12.5, "top1": 91.0},
                             "01_sensitivity": {"wall_s": 3.0}}
    assert data["git_sha"] == first["git_sha"] and data["time_utc"] == first["time_utc"]
    _no_tmp(tmp_path)


def test_update_manifest_rejects_bad_input(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("[1, 2]")
    with pytest.raises(ReportingError, match="is not a manifest.*move it away"):
        update_manifest(path, "x", wall_s=1.0)
    with pytest.raises(ReportingError, match="non-empty step name"):
        update_manifest(path, "", wall_s=1.0)


# --------------------------------------------------------------------------------------------
# headline table
# --------------------------------------------------------------------------------------------
def _rows(search: bool = True) -> pd.DataFrame:
    rows = pd.DataFrame({"config": ["W4", "FP32", "mixed 10x"], "avg_bits": [4.0, 32.0, 3.1],
                         "size_mb": [0.035, 1.04, 0.027], "compression": [30.0, 1.0, 38.5],
                         "bops": [2.6e9, 41.0e9, 2.0e9], "top1": [90.0, 92.0, 91.08]})
    if search:
        rows["search_ms"] = [float("nan"), float("nan"), 4.5]
    return rows


def test_headline_table_math_and_order():
    out = headline_table(_rows(), fp32_top1=92.0)
    assert list(out.columns) == HEADLINE_COLUMNS
    assert out["config"].tolist() == ["FP32", "W4", "mixed 10x"]         # size descending
    assert out["% of FP32"].tolist() == pytest.approx([100.0, 100 * 90 / 92, 99.0])
    assert out["BOPs (G)"].tolist() == pytest.approx([41.0, 2.6, 2.0])
    assert math.isnan(out["search ms"][0]) and out["search ms"][2] == 4.5
    assert set(HEADLINE_FORMATS) <= set(out.columns)
    assert headline_table(_rows(search=False), 92.0)["search ms"].isna().all()


def test_headline_table_rejects_bad_input():
    with pytest.raises(ReportingError, match=r"lack column\(s\) \['top1'\]"):
        headline_table(_rows().drop(columns="top1"), 92.0)
    with pytest.raises(ReportingError, match="fp32_top1 must be a positive accuracy.*nan"):
        headline_table(_rows(), float("nan"))


def test_headline_table_through_write_table(tmp_path):
    out = headline_table(_rows(), fp32_top1=92.0)
    paths = write_table(out, tmp_path / "headline", caption="Headline", data_label="synthetic",
                        profile="smoke", float_format=HEADLINE_FORMATS)
    assert "38.5×" in paths["md"].read_text(encoding="utf-8")
    assert r"\% of FP32" in paths["tex"].read_text(encoding="utf-8")
    pd.testing.assert_frame_equal(read_table(tmp_path / "headline"), out)
    assert os.listdir(tmp_path) and all(not n.endswith(".tmp") for n in os.listdir(tmp_path))


def _seeded_runs():
    rows = []
    for seed, (m, u, w2m, w2u) in enumerate([(90.0, 89.0, 80.0, 78.0), (91.0, 89.8, 81.0, 80.5),
                                              (89.5, 88.7, 79.0, 77.0)]):
        rows += [
            {"label": "HMQAT =W3A4 size", "seed": seed, "avg_bits": 3.0, "size_mb": 0.0995,
             "compression": 10.3, "bops": 6.7e8, "test_top1": m, "val_top1": m + 5},
            {"label": "uniform W3A4", "seed": seed, "avg_bits": 3.0, "size_mb": 0.1000,
             "compression": 10.2, "bops": 5.1e8, "test_top1": u, "val_top1": u + 5},
            {"label": "HMQAT =W2A4 size", "seed": seed, "avg_bits": 2.0, "size_mb": 0.0700,
             "compression": 14.0, "bops": 3.6e8, "test_top1": w2m, "val_top1": w2m + 5},
            {"label": "uniform W2A4", "seed": seed, "avg_bits": 2.0, "size_mb": 0.0701,
             "compression": 14.1, "bops": 3.4e8, "test_top1": w2u, "val_top1": w2u + 5},
        ]
    return pd.DataFrame(rows)


def test_seeded_headline_mean_std_and_bops_next_to_size():
    runs = _seeded_runs()
    table = reporting.seeded_headline(runs, fp32_top1=92.0)
    row = table.set_index("config").loc["uniform W3A4"]
    assert row["test top-1"] == pytest.approx((89.0 + 89.8 + 88.7) / 3)
    assert row["± std"] == pytest.approx(np.std([89.0, 89.8, 88.7], ddof=1))
    assert row["seeds"] == 3 and row["BOPs (G)"] == pytest.approx(0.51)
    assert row["% of FP32"] == pytest.approx(100 * row["test top-1"] / 92.0)
    assert row["W-only compression"] == pytest.approx(32 / row["avg bits"])   # HAWQ's count
    assert row["val top-1"] == pytest.approx(row["test top-1"] + 5)
    assert list(table["size MB"]) == sorted(table["size MB"], reverse=True)
    with pytest.raises(reporting.ReportingError, match="test_top1"):
        reporting.seeded_headline(runs.drop(columns="test_top1"), 92.0)


def test_paired_comparisons_match_a_hand_computed_t_interval():
    runs = _seeded_runs()
    pairs = reporting.equal_size_pairs(list(runs["label"]))
    assert pairs == [("HMQAT =W3A4 size", "uniform W3A4"), ("HMQAT =W2A4 size", "uniform W2A4")]
    table = reporting.paired_comparisons(runs, pairs).set_index("a")
    d = np.array([1.0, 1.2, 0.8])                 # mixed − uniform at W3A4 size, per seed
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)   # t(0.975, 2) by hand
    row = table.loc["HMQAT =W3A4 size"]
    assert row["diff"] == pytest.approx(1.0) and row["seeds"] == 3
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((1.0 - half, 1.0 + half))
    assert bool(row["significant"]) and bool(row["equal_size"])
    assert row["size gap %"] == pytest.approx(-0.5) and row["BOPs ratio"] == pytest.approx(6.7 / 5.1)
    assert "95 % CI" in reporting.describe_comparison({**row.to_dict(), "a": row.name})
    one = reporting.paired_comparisons(runs[runs.seed == 0], pairs).iloc[0]
    assert np.isnan(one["ci_low"]) and not one["significant"]
    assert "a screen, not a result" in reporting.describe_comparison(one)
    with pytest.raises(reporting.ReportingError, match="no runs labelled"):
        reporting.paired_comparisons(runs, [("HMQAT =W4A4 size", "uniform W4A4")])


def test_paired_comparisons_carry_the_test_images_when_runs_keep_their_bits():
    """With per-image bits (runs.pack_correct) the interval is the crossed seeds × images one
    of hmqat.stats, computed from the same matrices by hand; without them, the seed-only t."""
    from hmqat import stats
    from hmqat.study import runs as runs_mod
    rng = np.random.default_rng(0)
    m = 50
    base = rng.random((3, m)) < 0.8
    flips = rng.random((3, m)) < 0.1
    other = np.where(flips, ~base, base)
    rows = []
    for label, bits in (("HMQAT =W3A4 size", base), ("uniform W3A4", other)):
        for k in range(3):
            rows.append({"label": label, "seed": k, "avg_bits": 3.0, "size_mb": 0.1,
                         "compression": 10.0, "bops": 1e9, "test_top1": 100 * bits[k].mean(),
                         "test_correct": runs_mod.pack_correct(bits[k]), "n_test": m})
    frame = pd.DataFrame(rows)
    row = reporting.paired_comparisons(frame, [("HMQAT =W3A4 size", "uniform W3A4")]).iloc[0]
    want = stats.crossed_paired_difference(100.0 * base, 100.0 * other)
    assert row["interval"] == "seeds × images" and row["images"] == m
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((want.low, want.high))
    assert "50 test images" in reporting.describe_comparison(row)
    seed_only = reporting.paired_comparisons(frame.drop(columns="test_correct"),
                                             [("HMQAT =W3A4 size", "uniform W3A4")]).iloc[0]
    t = stats.paired_difference(100 * base.mean(1), 100 * other.mean(1))
    assert seed_only["interval"] == "seeds only"
    assert (seed_only["ci_low"], seed_only["ci_high"]) == pytest.approx((t.low, t.high))


def test_step_finished_reads_the_manifests_status():
    m = {"steps": {"a": {"status": "ran"}, "b": {"status": "skipped (unchanged)"},
                   "c": {"status": "running"}, "d": {"status": "failed"}, "e": {}}}
    assert [reporting.step_finished(m, s) for s in "abcdef"] == [True, True, False, False,
                                                                 True, False]
    assert not reporting.step_finished({}, "a")
