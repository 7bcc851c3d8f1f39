"""Tests for hmqat.study.plotting (docs/design.md §2): every figure draws from small synthetic
frames and saves as PNG + PDF atomically with stable bytes; greyscale cues and titles are present;
bad input gives one clear error."""
from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from hmqat.study import plotting as P
from hmqat.study.plotting import PlotError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]


# --------------------------------------------------------------------------------------------
# small synthetic inputs
# --------------------------------------------------------------------------------------------
def traces(values=(2.0, 0.5, 0.05, 1.0, 8.0)) -> pd.DataFrame:
    df = pd.DataFrame({"avg_trace": values, "n_params": [432, 2304, 2304, 4608, 640]},
                      index=pd.Index(LAYERS, name="layer"))
    df["avg_trace_se"] = 0.2 * df["avg_trace"].abs()
    df["kind"] = ["conv"] * 4 + ["linear"]
    return df


def omega_frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    om = rng.lognormal(size=12)
    return pd.DataFrame({"variant": ["joint"] * 6 + ["random"] * 6, "omega": om,
                         "loss_increase": om * rng.lognormal(0, 0.3, 12)})


def frontier_frames():
    rng = np.random.default_rng(1)
    cand = pd.DataFrame({"size_mb": rng.uniform(0.03, 0.27, 200)})
    cand["omega"] = np.exp(-10 * cand["size_mb"]) * rng.lognormal(0.5, 0.5, 200)
    xs = np.linspace(0.03, 0.27, 8)
    front = pd.DataFrame({"size_mb": xs, "omega": 0.5 * np.exp(-10 * xs)})
    picks = front.iloc[[2, 5]].assign(label=["≥ 10×", "≥ 6×"])
    uniform = pd.DataFrame({"size_mb": [0.035, 0.07, 0.27], "omega": [2.0, 0.3, 1e-3],
                            "label": ["W2", "W4", "W8"]})
    return cand, front, picks, uniform


def bit_configs() -> dict[str, dict[str, int]]:
    return {"W4": {l: 4 for l in LAYERS},
            "mixed 10×": dict(zip(LAYERS, [8, 3, 2, 4, 8])),
            "random": dict(zip(LAYERS, [8, 6, 2, 3, 8]))}


def accuracy_frame() -> pd.DataFrame:
    return pd.DataFrame({"size_mb": [0.03, 0.05, 0.08, 0.035, 0.07, 0.27],
                         "top1": [85.0, 89.0, 90.5, 70.0, 89.5, 91.2],
                         "kind": ["mixed"] * 3 + ["uniform"] * 3,
                         "label": ["", "", "", "W2", "W4", "W8"],
                         "compression": [36.0, 21.0, 13.0, 30.0, 15.0, 4.0]})


def ablation_frame() -> pd.DataFrame:
    return pd.DataFrame({"group": ["sensitivity"] * 5 + ["search"] * 2,
                         "variant": ["joint", "trace", "random", "random", "random", "dp",
                                     "greedy"],
                         "top1": [90.5, 90.1, 87.0, 86.0, 88.0, 90.5, 90.2]})


def kendall_frame() -> pd.DataFrame:
    return pd.DataFrame({"predictor": ["omega_joint", "omega_qerr_only", "n_2bit", "avg_bits"],
                         "kendall_tau": [0.47, 0.50, 0.58, 0.10],
                         "tau_low": [0.32, 0.36, 0.45, -0.09],
                         "tau_high": [0.59, 0.62, 0.71, 0.30]})


def ptq_frontier_frame() -> pd.DataFrame:
    """Two targets; at 10.34× the joint and qerr_only picks are the same point."""
    rows = []
    for target, actual, top in ((6.0, 6.0136, 87.4), (10.34, 10.3500, 82.3)):
        for j in range(4):
            rows.append({"target_compression": target, "kind": "random", "name": str(j),
                         "compression_actual": target * (0.99 + 0.005 * j), "top1": top - 3 - j})
        rows += [{"target_compression": target, "kind": "pick", "name": "joint",
                  "compression_actual": actual, "top1": top},
                 {"target_compression": target, "kind": "pick", "name": "qerr_only",
                  "compression_actual": actual if target > 10 else 6.0040,
                  "top1": top if target > 10 else top + 0.5},
                 {"target_compression": target, "kind": "pick", "name": "param_size",
                  "compression_actual": actual, "top1": top - 6}]
    return pd.DataFrame(rows)


def seeded_runs() -> pd.DataFrame:
    """Three seeds of two mixed configs and two uniform ones (notebook 03's qat_results)."""
    top = {"HMQAT =W3A4 size": [86.5, 86.8, 86.6], "uniform W3A4": [86.7, 86.8, 86.7],
           "HMQAT 13.11x": [85.2, 85.5, 85.6], "uniform W2A4": [84.5, 84.6, 84.7]}
    size = {"HMQAT =W3A4 size": 0.1049, "uniform W3A4": 0.1049, "HMQAT 13.11x": 0.0782,
            "uniform W2A4": 0.0727}
    return pd.DataFrame([{"label": lab, "kind": "uniform" if lab.startswith("uniform")
                          else "mixed", "seed": k, "test_top1": v, "size_mb": size[lab],
                          "compression": 1.0 / size[lab]}
                         for lab, vals in top.items() for k, v in enumerate(vals)])


def seeded_means(runs: pd.DataFrame) -> pd.DataFrame:
    return (runs.groupby(["label", "kind"], sort=False)
            .agg(size_mb=("size_mb", "first"), compression=("compression", "first"),
                 top1=("test_top1", "mean"), top1_std=("test_top1", "std")).reset_index())


def transition_frame() -> pd.DataFrame:
    """The diagnostics of two ladder arms, plain LSQ + BN and a ladder arm + BN, seed 0 (and
    one seed-1 row that must be ignored)."""
    rows = []
    arms = {"range/8>T/step_lr=lr/10": [(0, "transition", 0.3, 0.3, 0.02),
                                        (50, "transition", 2.2, 2.2, 0.7),
                                        (300, "end", 2.1, None, 0.7)],
            "data+so/8>4>T/step_lr=lr/10": [(0, "transition", 1.0, 0.3, 0.05),
                                            (20, "scale_only_end", 1.0, None, 0.05),
                                            (25, "transition", 1.0, 1.4, 0.2),
                                            (50, "transition", 1.0, 3.0, 0.4),
                                            (300, "end", 1.02, None, 0.4)]}
    for i, (arm, events) in enumerate(arms.items()):
        for step, when, ratio, carried, zero in events:
            rows.append({"step": step, "when": when, "kind": "weight", "layer": "layer3.1.conv2",
                         "step_ratio": ratio, "range_ratio": carried, "zero_frac": zero,
                         "arm": arm, "seed": 0, "run_id": f"r{i}"})
        for step, bits, jump in ((0, "8", None), (50, "target", 0.25 + 0.05 * i)):
            rows.append({"step": step, "when": "transition", "kind": "loss", "layer": None,
                         "bits": bits, "loss_before": None if jump is None else 0.1,
                         "loss_after": 0.2 if jump is None else 0.1 + jump, "arm": arm,
                         "seed": 0, "run_id": f"r{i}"})
    for j, arm in enumerate(["lsq/step_lr=lr/10+bn", "data+so/8>4>T/step_lr=lr/10+bn"]):
        for k, layer in enumerate(["bn1", "layer1.0.bn1", "layer1.0.bn2"]):
            rows.append({"step": 300, "when": "end", "kind": "bn", "layer": layer,
                         "mean_shift": 0.02 / (k + 1) + 0.001 * j, "arm": arm, "seed": 0,
                         "run_id": f"b{j}"})
    rows.append({"step": 0, "when": "transition", "kind": "weight", "layer": "layer3.1.conv2",
                 "step_ratio": 9.0, "range_ratio": 9.0, "zero_frac": 0.9,
                 "arm": "range/8>T/step_lr=lr/10", "seed": 1, "run_id": "r9"})
    return pd.DataFrame(rows)


def histories() -> dict[str, list[dict]]:
    return {name: [{"epoch": e + 1, "val_top1": 80 + e + i, "train_loss": 1.0 / (e + 1)}
                   for e in range(4)] for i, name in enumerate(["W4", "mixed 10×"])}


BUILDERS = {
    "layer_traces": lambda: P.plot_layer_traces(traces(), subtitle="synthetic; smoke"),
    "omega_validation": lambda: P.plot_omega_validation(omega_frame(), subtitle="s"),
    "frontier": lambda: P.plot_frontier(*frontier_frames()[:3], uniform=frontier_frames()[3]),
    "bit_heatmap": lambda: P.plot_bit_heatmap(bit_configs(), LAYERS, subtitle="s"),
    "accuracy_size": lambda: P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5),
    "ablation": lambda: P.plot_ablation(ablation_frame(), subtitle="s"),
    "training_curves": lambda: P.plot_training_curves(histories(), ["val_top1", "train_loss"]),
    "kendall": lambda: P.plot_kendall(kendall_frame(), subtitle="s"),
    "ptq_frontier": lambda: P.plot_ptq_frontier(ptq_frontier_frame(), subtitle="s"),
    "accuracy_size_paired": lambda: P.plot_accuracy_size(
        seeded_means(seeded_runs()), yerr="top1_std", fp32_top1=87.6, runs=seeded_runs()),
    "transition_diagnostics": lambda: P.plot_transition_diagnostics(
        transition_frame(), "layer3.1.conv2", title="t", subtitle="s"),
}


# --------------------------------------------------------------------------------------------
# every figure draws and saves
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_plot_saves_png_and_pdf(tmp_path, name):
    fig = BUILDERS[name]()
    assert isinstance(fig, mpl.figure.Figure)
    w, h = fig.get_size_inches()
    assert 3.4 <= w <= 7.0 and 2.4 <= h <= 9.0
    paths = P.savefig(fig, tmp_path / "figures" / name)
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    assert not plt.fignum_exists(fig.number)                   # closed
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        [f"{name}.png", f"{name}.pdf"])                        # no temporary files left


def test_savefig_bytes_are_stable_across_reruns(tmp_path):
    a = P.savefig(P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5), tmp_path / "a")
    b = P.savefig(P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5), tmp_path / "b")
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.suffix
    assert b"/CreationDate" not in a[1].read_bytes()
    assert b"/FontFile2" in a[1].read_bytes()                  # TrueType (fonttype 42), not Type 3


def test_savefig_rejects_unknown_format_before_writing(tmp_path):
    fig = P.plot_bit_heatmap(bit_configs(), LAYERS)
    with pytest.raises(PlotError, match="unsupported figure format.*'jpg'"):
        P.savefig(fig, tmp_path / "x", formats=("png", "jpg"))
    assert list(tmp_path.iterdir()) == []
    assert plt.fignum_exists(fig.number)                       # still open: save it again
    assert [p.name for p in P.savefig(fig, tmp_path / "x", formats=("svg",))] == ["x.svg"]
    assert not plt.fignum_exists(fig.number)


def test_use_style_restores_rcparams():
    before = dict(mpl.rcParams)
    with P.use_style():
        assert mpl.rcParams["pdf.fonttype"] == 42
        assert mpl.rcParams["figure.constrained_layout.use"] is True
    assert mpl.rcParams["pdf.fonttype"] == before["pdf.fonttype"]
    assert mpl.rcParams["axes.prop_cycle"] == before["axes.prop_cycle"]


# --------------------------------------------------------------------------------------------
# content of each figure
# --------------------------------------------------------------------------------------------
def test_layer_traces_log_scale_hatches_twin_axis_and_titles():
    fig = P.plot_layer_traces(traces(), title="T", subtitle="CIFAR-10 (JPEG q75 mirror); quick")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and fig.axes[1].get_yscale() == "log"    # twin n_params
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    assert {b.get_hatch() or "" for b in ax.patches} == {"", "///"}          # conv vs linear
    assert fig.get_suptitle() == "T\nCIFAR-10 (JPEG q75 mirror); quick"
    plt.close(fig)


def test_layer_traces_nonpositive_estimates_use_symlog_with_note():
    fig = P.plot_layer_traces(traces((2.0, -0.1, 0.05, 1.0, 8.0)), n_params=False)
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    assert "1 layer(s) have a trace estimate ≤ 0" in ax.get_legend().get_title().get_text()
    plt.close(fig)


def test_layer_traces_horizontal_above_30_layers():
    big = pd.concat([traces()] * 7)
    big.index = [f"l{i}" for i in range(len(big))]
    fig = P.plot_layer_traces(big)
    assert fig.axes[0].get_xscale() == "log"                                 # values on x
    assert fig.axes[0].get_yticklabels()[0].get_text() == "l0"
    plt.close(fig)


def test_layer_traces_requires_columns():
    with pytest.raises(PlotError, match=r"traces lacks column\(s\) \['avg_trace_se'\]"):
        P.plot_layer_traces(traces().drop(columns="avg_trace_se"))


def test_omega_validation_panel_titles_carry_rho():
    fig = P.plot_omega_validation(omega_frame(), spearman={"joint": 0.91, "random": 0.12})
    assert [ax.get_title() for ax in fig.axes] == ["joint: ρ = 0.91", "random: ρ = 0.12"]
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_yscale() == "log"
    plt.close(fig)
    mono = pd.DataFrame({"variant": ["a"] * 4, "omega": [1, 2, 3, 4],
                         "loss_increase": [0.1, 0.5, 0.7, 2.0]})
    fig = P.plot_omega_validation(mono)                       # ρ computed with scipy
    assert fig.axes[0].get_title() == "a: ρ = 1.00"
    plt.close(fig)


def test_omega_validation_needs_rho_for_every_variant():
    with pytest.raises(PlotError, match=r"no ρ for variant\(s\) \['random'\]"):
        P.plot_omega_validation(omega_frame(), spearman={"joint": 0.9})


def test_frontier_layers_and_labels():
    cand, front, picks, uniform = frontier_frames()
    fig = P.plot_frontier(cand, front, picks, uniform=uniform)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"         # span < 10×
    texts = {t.get_text() for t in ax.texts}
    assert {"W2", "W4", "W8", "≥ 10×", "≥ 6×"} <= texts
    faint = ax.collections[0]
    assert faint.get_alpha() == pytest.approx(0.15) and faint.get_rasterized()
    dashed = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert sorted(l.get_xdata()[0] for l in dashed) == pytest.approx(sorted(picks["size_mb"]))
    plt.close(fig)


def test_frontier_requires_columns():
    cand, front, _, _ = frontier_frames()
    with pytest.raises(PlotError, match=r"candidates lacks column\(s\) \['omega'\]"):
        P.plot_frontier(cand.drop(columns="omega"), front)


def test_bit_heatmap_annotates_bits_in_network_order():
    fig = P.plot_bit_heatmap(bit_configs(), LAYERS)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == LAYERS
    annots = [int(t.get_text()) for t in ax.texts]
    assert annots == [bit_configs()[c][l] for l in LAYERS for c in bit_configs()]
    cbar_labels = [t.get_text() for t in ax.collections[0].colorbar.ax.get_yticklabels()]
    assert cbar_labels == ["2", "3", "4", "6", "8"]                           # one colour per width
    codes = np.asarray(ax.collections[0].get_array()).reshape(len(LAYERS), -1)
    assert codes[:, 1].tolist() == [4, 1, 0, 2, 4]             # "mixed 10×": 8,3,2,4,8 -> index
    plt.close(fig)


@pytest.mark.parametrize("configs,match", [
    ({"a": dict(zip(LAYERS[:-1], [4] * 4))}, r"config 'a' does not match layers: missing \['fc'\]"),
    ({"a": {**{l: 4 for l in LAYERS}, "extra": 4}}, r"unknown \['extra'\]"),
    ({"a": {**{l: 4 for l in LAYERS}, "fc": 4.5}}, "layer 'fc' has bits 4.5; bits must be ints"),
    ({}, "configs is empty"),
])
def test_bit_heatmap_rejects_bad_configs(configs, match):
    with pytest.raises(PlotError, match=match):
        P.plot_bit_heatmap(configs, LAYERS)


def test_accuracy_size_fp32_line_uniform_labels_and_compression():
    fig = P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5)
    ax = fig.axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"W2", "W4", "W8", "FP32 91.50", "36.0×", "13.0×"} <= texts
    fp32 = [l for l in ax.lines if l.get_linestyle() == "--"]
    assert len(fp32) == 1 and fp32[0].get_ydata()[0] == 91.5
    assert [l.get_label() for l in ax.get_legend().get_lines()] == ["mixed"]
    plt.close(fig)


def _assert_labels_clear(fig, n: int) -> None:
    """The first axes' n text labels lie inside it and do not overlap each other or the legend."""
    ax = fig.axes[0]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    frame = ax.get_window_extent(r)
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in ax.texts]
    if ax.get_legend() is not None:
        boxes.append(("<legend>", ax.get_legend().get_window_extent(r)))
    assert len(ax.texts) == n
    for i, (a, box) in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, a
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, a
        for b, other in boxes[i + 1:]:
            assert not box.overlaps(other), (a, b)


def test_frontier_labels_do_not_collide():
    """The quick run's crowding: two picks and a uniform point within 0.04 MB of each other."""
    cand, front, _, _ = frontier_frames()
    picks = pd.DataFrame({"size_mb": [0.0994, 0.1049], "omega": [0.33, 0.26],
                          "label": ["HMQAT 10.34x", "HMQAT =W3 size"]})
    uniform = pd.DataFrame({"size_mb": [0.073, 0.1049, 0.1365, 0.264],
                            "omega": [1.6, 0.5, 0.15, 7e-4], "label": ["W2", "W3", "W4", "W8"]})
    fig = P.plot_frontier(cand, front, picks, uniform=uniform)
    _assert_labels_clear(fig, 6)
    along = {t.get_text(): t for t in fig.axes[0].texts if t.get_rotation() == 90}
    assert set(along) == {"HMQAT 10.34x", "HMQAT =W3 size"}   # budget labels run up their lines
    assert along["HMQAT 10.34x"].get_ha() == "right" and along["HMQAT =W3 size"].get_ha() == "left"
    plt.close(fig)


@pytest.mark.parametrize("top1", [[85.94, 86.45, 83.04, 86.25, 86.81, 87.82],    # quick, LSQ
                                  [86.76, 87.01, 85.55, 86.80, 87.04, 87.88]])   # quick, LSQ+KD
def test_accuracy_size_labels_do_not_collide(top1):
    """The study's own layouts: W8A8 sits on the FP32 line at the right edge and a uniform point
    sits between two mixed points; every label stays inside the axes, clear of the others."""
    df = pd.DataFrame({"size_mb": [0.0994, 0.1049, 0.0730, 0.1049, 0.1365, 0.2640],
                       "top1": top1,
                       "kind": ["mixed"] * 2 + ["uniform"] * 4,
                       "label": ["", "", "uniform W2A4", "uniform W3A4", "uniform W4A4",
                                 "uniform W8A8"],
                       "compression": [10.35, 9.83, 14.1, 9.83, 7.5, 3.9]})
    fig = P.plot_accuracy_size(df, fp32_top1=87.62, subtitle="CIFAR-10 (JPEG q75 mirror); quick")
    assert {"FP32 87.62", "9.8×", "uniform W8A8"} <= {t.get_text() for t in fig.axes[0].texts}
    _assert_labels_clear(fig, 7)
    plt.close(fig)


def test_ablation_hatches_and_seed_error_bars():
    fig = P.plot_ablation(ablation_frame())
    top, bottom = fig.axes
    assert top.get_ylabel() == "sensitivity" and bottom.get_ylabel() == "search"
    assert len({b.get_hatch() or "" for b in top.patches}) == 3             # one hatch per variant
    assert any("87.00 ± 1.00 (n=3)" in t.get_text() for t in top.texts)      # mean ± SD of seeds
    assert len(top.lines) >= 1                                               # the SD error bar
    plt.close(fig)


def test_ablation_axis_zooms_on_close_values_and_says_so():
    fig = P.plot_ablation(ablation_frame())          # 86-90.5: bars from 0 would hide it
    left = fig.axes[0].get_xlim()[0]
    assert 80 <= left < 86 and fig.axes[-1].get_xlabel().endswith(f"axis starts at {left:g}")
    plt.close(fig)
    spread = ablation_frame().assign(top1=[90.5, 20.0, 87.0, 86.0, 88.0, 90.5, 90.2])
    fig = P.plot_ablation(spread)                    # values far apart: the axis starts at 0
    assert fig.axes[0].get_xlim()[0] == 0 and "starts" not in fig.axes[-1].get_xlabel()
    plt.close(fig)


def test_ablation_without_groups_is_one_panel():
    fig = P.plot_ablation(ablation_frame(), group_col=None, title=None)
    assert len(fig.axes) == 1 and fig.get_suptitle() == ""
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        "joint", "trace", "random", "dp", "greedy"]
    plt.close(fig)


def test_ablation_precomputed_err_needs_one_row_per_variant():
    df = ablation_frame().assign(sd=0.5)
    with pytest.raises(PlotError, match="err='sd' gives precomputed SDs"):
        P.plot_ablation(df, err="sd")
    fig = P.plot_ablation(df.drop_duplicates(["group", "variant"]), err="sd")
    assert any("± 0.50" in t.get_text() for t in fig.axes[0].texts)
    plt.close(fig)


def test_training_curves_lines_per_config_and_missing_metric():
    fig = P.plot_training_curves(histories(), "val_top1")
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ["W4", "mixed 10×"]
    assert ax.lines[0].get_linestyle() != ax.lines[1].get_linestyle()        # greyscale-safe
    assert ax.lines[0].get_marker() != ax.lines[1].get_marker()
    assert list(ax.lines[1].get_ydata()) == [81, 82, 83, 84]
    plt.close(fig)
    with pytest.raises(PlotError, match="history 'W4' has no 'val_loss' values; its keys are"):
        P.plot_training_curves(histories(), "val_loss")


def test_savefig_displays_inline_in_a_kernel_before_closing(tmp_path, monkeypatch):
    """In a Jupyter kernel the figure goes to the cell output (image/png) before it is closed."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda fig: shown.append(plt.fignum_exists(fig.number)))
    monkeypatch.setattr(P, "in_notebook", lambda: True)
    P.savefig(P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5), tmp_path / "a")
    assert shown == [True]                 # displayed while still open
    monkeypatch.setattr(P, "in_notebook", lambda: False)
    fig = P.plot_accuracy_size(accuracy_frame(), fp32_top1=91.5)
    P.savefig(fig, tmp_path / "b")
    assert shown == [True] and not plt.fignum_exists(fig.number)   # scripts: saved, closed


def _overlaps(labels) -> bool:
    boxes = [t.get_window_extent() for t in labels if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_omega_validation_symlog_labels_do_not_collide_and_axes_are_named():
    rng = np.random.default_rng(0)
    n = 32
    df = pd.DataFrame({"variant": ["joint"] * n, "omega": 10 ** rng.uniform(-6, 1, n),
                       "loss_increase": np.r_[-1e-5, 0.0, 10 ** rng.uniform(-5, 0.5, n - 2)]})
    fig = P.plot_omega_validation(df, spearman={"joint": 0.7})
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_yscale() == "symlog"
    assert not _overlaps(ax.get_yticklabels()) and len(ax.get_yticks()) <= 7
    assert ax.get_xlabel() == "Σ Ω of the config (predicted)"
    assert ax.get_ylabel() == "measured loss increase"
    plt.close(fig)


def test_training_curves_start_point_at_epoch_zero():
    hist = [{"epoch": 1, "val_top1": 87.0}, {"epoch": 2, "val_top1": 87.5}]
    fig = P.plot_training_curves({"ft": hist}, start={"ft": {"val_top1": 81.0}})
    xs, ys = fig.axes[0].lines[0].get_data()
    assert list(xs) == [0, 1, 2] and list(ys) == [81.0, 87.0, 87.5]
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# sensitivity experiments (docs/method.md §3.1)
# --------------------------------------------------------------------------------------------
def test_sensitivity_figures_draw_and_count_undrawable_points(tmp_path):
    rng = np.random.default_rng(0)
    single = pd.DataFrame({"bits": [2, 3, 4] * 4, "measured": [-0.01] + list(rng.random(11)),
                           "pred_trace": rng.random(12), "pred_quad": rng.random(12),
                           "pred_taylor": rng.random(12)})
    fig = P.plot_single_layer(single, subtitle="synthetic")
    assert len(fig.axes) == 3 and "1 pts ≤ 0 not shown" in fig.axes[0].get_title()
    noise = pd.DataFrame({"measured": rng.random(5), "predicted": rng.random(5),
                          "predicted_se": 0.1 * rng.random(5)})
    add = pd.DataFrame({"measured": rng.random(6), "sum_single": rng.random(6),
                        "n_2bit": [0, 0, 1, 1, 2, 2]})
    kendall = pd.DataFrame({"predictor": ["omega_joint", "n_2bit"], "kendall_tau": [0.5, 0.2],
                            "tau_low": [0.3, 0.0], "tau_high": [0.7, 0.4]})
    front = pd.DataFrame({"target_compression": [6.0] * 4 + [10.0] * 4,
                          "kind": ["pick", "random", "random", "random"] * 2,
                          "name": ["joint", "0", "1", "2"] * 2, "top1": rng.random(8) * 90})
    figs = [P.plot_noise_check(noise), P.plot_additivity(add), P.plot_kendall(kendall),
            P.plot_ptq_frontier(front)]
    assert [t.get_text() for t in figs[2].axes[0].get_yticklabels()] == [
        "count of 2-bit layers (n_2bit)", "HMQAT Ω: trace × quant. error (joint)"]
    for i, f in enumerate([fig] + figs):
        paths = P.savefig(f, tmp_path / f"f{i}")
        assert paths[0].read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(PlotError, match=r"lacks column\(s\) \['sum_single'\]"):
        P.plot_additivity(add.drop(columns="sum_single"))


def test_qat_level_figure_plots_each_config_against_omega_and_ptq_top1():
    runs = pd.DataFrame({"omega_joint": [0.01, 0.1, 1.0], "ptq_top1": [80.0, 70.0, 60.0],
                         "qat_top1": [89.0, 88.0, 86.0]})
    fig = P.plot_qat_level(runs)
    left, right = fig.axes
    assert list(left.collections[0].get_offsets()[:, 1]) == [89.0, 88.0, 86.0]
    assert left.get_xscale() == "log" and right.get_xscale() == "linear"
    assert right.get_xlabel().startswith("PTQ top-1")
    plt.close(fig)
    with pytest.raises(PlotError, match=r"lacks column\(s\) \['ptq_top1'\]"):
        P.plot_qat_level(runs.drop(columns="ptq_top1"))
    k = P.plot_kendall(pd.DataFrame({"predictor": ["omega_joint"], "kendall_tau": [0.5],
                                     "tau_low": [0.3], "tau_high": [0.7]}), xlabel="τ after QAT")
    assert k.axes[0].get_xlabel() == "τ after QAT"
    plt.close(k)


# --------------------------------------------------------------------------------------------
# readable figures (issue 27 item 8, issue 24 item 6)
# --------------------------------------------------------------------------------------------
#: The quick run's subtitle that squeezed sensitivity_kendall.png into a 2,161-px-wide canvas.
LONG_SUBTITLE = ("CIFAR-10 (JPEG q75 mirror), quick profile; measured on the 5,000-image "
                 "validation hold-out of the train split (seed 0); calibration from train minus "
                 "validation")


def _canvas_share(fig) -> tuple[float, float]:
    """(saved canvas width / figure width, union of the axes' widths / saved canvas width):
    the canvas is the tight bounding box that savefig(bbox_inches="tight") writes."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    canvas = fig.get_tightbbox(r).width * fig.dpi           # inches -> display pixels
    boxes = [ax.get_window_extent(r) for ax in fig.axes if ax.get_visible()]
    axes = max(b.x1 for b in boxes) - min(b.x0 for b in boxes)
    return canvas / (fig.get_figwidth() * fig.dpi), axes / canvas


@pytest.mark.parametrize("name,build", [
    ("kendall", lambda sub: P.plot_kendall(kendall_frame(), subtitle=sub)),
    ("ptq_frontier", lambda sub: P.plot_ptq_frontier(ptq_frontier_frame(), subtitle=sub)),
    ("accuracy_size", lambda sub: P.plot_accuracy_size(accuracy_frame(), subtitle=sub)),
    ("accuracy_size_paired", lambda sub: P.plot_accuracy_size(
        seeded_means(seeded_runs()), runs=seeded_runs(), subtitle=sub)),
    ("ablation", lambda sub: P.plot_ablation(ablation_frame(), subtitle=sub)),
    ("transition_diagnostics", lambda sub: P.plot_transition_diagnostics(
        transition_frame(), "layer3.1.conv2", title="Precision-transition diagnostics",
        subtitle=sub)),
])
def test_long_subtitle_wraps_instead_of_widening_the_canvas(name, build):
    fig = build(LONG_SUBTITLE)
    widening, share = _canvas_share(fig)
    assert widening <= 1.02, name              # the title block fits the figure's width
    assert share >= 0.5, name                  # the plot keeps at least half the canvas
    suptitle = fig.get_suptitle()
    assert suptitle.count("\n") >= 2 and suptitle.replace("\n", " ").endswith(LONG_SUBTITLE)
    plt.close(fig)


def test_wrap_to_width_keeps_every_word_and_each_line_fits():
    with P.use_style():
        fig, _ = plt.subplots(figsize=(3.4, 2.4))
        text = P.wrap_to_width(fig, LONG_SUBTITLE + "\nsecond paragraph", "medium")
        r = fig.canvas.get_renderer()
        prop = mpl.font_manager.FontProperties(size="medium")
        widths = [r.get_text_width_height_descent(line, prop, ismath=False)[0]
                  for line in text.split("\n")]
    assert text.split() == (LONG_SUBTITLE + " second paragraph").split()
    assert text.split("\n")[-1] == "second paragraph"            # an existing break is kept
    assert len(widths) >= 4 and max(widths) <= 0.92 * 3.4 * fig.dpi
    plt.close(fig)


def test_kendall_rows_are_named_in_plain_words_with_a_caption():
    fig = P.plot_kendall(kendall_frame())
    ticks = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in ticks] == [
        "average bits (avg_bits)", "HMQAT Ω: trace × quant. error (joint)",
        "quant. error alone (qerr_only)", "count of 2-bit layers (n_2bit)"]
    assert [t.get_fontweight() for t in ticks] == ["normal", "bold", "normal", "normal"]
    caption = fig._supxlabel.get_text().replace("\n", " ")
    assert caption.startswith("τ: how well a predictor orders the configs")
    assert "quant. error = ‖Q(W) − W‖²" in caption
    plt.close(fig)
    fig = P.plot_kendall(kendall_frame(), caption=None)
    assert fig._supxlabel is None
    plt.close(fig)
    assert P.predictor_label("omega_permuted_trace") == "error × shuffled traces (permuted_trace)"
    assert P.predictor_label("my_own") == "my_own"


def test_ptq_frontier_draws_picks_at_their_true_compression():
    fig = P.plot_ptq_frontier(ptq_frontier_frame())
    left, right = fig.axes
    assert [ax.get_title() for ax in (left, right)] == ["≈ 6×", "≈ 10.34×"]
    picks = {c.get_label(): c.get_offsets()[0].tolist() for c in left.collections
             if c.get_label().endswith(")")}
    assert picks == {"HMQAT Ω: trace × quant. error (joint)": [6.0136, 87.4],
                     "quant. error alone (qerr_only)": [6.004, 87.9],
                     "layer size alone (param_size)": [6.0136, 81.4]}
    rnd = next(c for c in left.collections if c.get_label() == "random, same size")
    assert rnd.get_offsets()[:, 0].tolist() == [6.0 * (0.99 + 0.005 * j) for j in range(4)]
    assert [t.get_text() for t in right.texts] == ["same point: joint, qerr_only"]
    assert left.texts == [] or all("same point" not in t.get_text() for t in left.texts)
    legend = fig.legends[0]
    assert "x: each config's own compression." in legend.get_title().get_text().replace("\n", " ")
    plt.close(fig)


def _ablation_runs() -> pd.DataFrame:
    return pd.DataFrame({"group": ["allocation"] * 5,
                         "variant": ["hmqat-joint", "hmqat-qerr_only", "random", "random", "ilp"],
                         "top1": [89.68, 89.32, 85.42, 83.54, 89.68],
                         "run_id": ["d98e", "7e89", "3e3e", "fe0f", "d98e"]})


def test_ablation_shows_a_run_shared_by_two_variants_once_and_says_so():
    fig = P.plot_ablation(_ablation_runs())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "hmqat-joint = ilp (trace × quant. error)", "hmqat-qerr_only (quant. error alone)",
        "random"]
    assert len(ax.patches) == 3
    assert fig._supxlabel.get_text() == ("hmqat-joint and ilp picked the same config: one run, "
                                         "shown once.")
    plt.close(fig)
    distinct = _ablation_runs().assign(run_id=["a", "b", "c", "d", "e"])   # different runs
    unknown = _ablation_runs().assign(run_id=[None, "b", "c", "d", None])  # ids not recorded
    for frame in (distinct, unknown):
        fig = P.plot_ablation(frame)
        assert [t.get_text() for t in fig.axes[0].get_yticklabels()][-1] == "ilp"
        assert fig._supxlabel is None
        plt.close(fig)


def test_accuracy_size_paired_panel_matches_a_hand_computed_interval():
    runs = seeded_runs()
    assert P.nearest_uniform_pairs(seeded_means(runs)) == [
        ("HMQAT =W3A4 size", "uniform W3A4"), ("HMQAT 13.11x", "uniform W2A4")]
    fig = P.plot_accuracy_size(seeded_means(runs), yerr="top1_std", runs=runs)
    main, paired = fig.axes
    assert main.get_xlabel() == "model size (MB)"               # the first axes stay the main plot
    # =W3A4 size − W3A4 per seed: -0.2, 0.0, -0.1 -> mean -0.1, sd 0.1,
    # half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    dots = paired.collections[0].get_offsets()[:, 0]
    assert dots.tolist() == pytest.approx([-0.2, 0.0, -0.1], abs=1e-9)
    texts = [t.get_text() for t in paired.texts]
    assert texts[0] == "-0.10 [-0.35, +0.15]"
    # 13.11x − W2A4: 0.7, 0.9, 0.9 -> mean 0.8333, sd 0.11547, half 0.286835
    assert texts[1] == "+0.83 [+0.55, +1.12]"
    assert [t.get_text() for t in paired.get_yticklabels()] == [
        "HMQAT =W3A4 size\n− uniform W3A4, size +0.0 %",
        "HMQAT 13.11x\n− uniform W2A4, size +7.6 %"]
    assert "reporting.paired_interval" in fig._supxlabel.get_text().replace("\n", " ")
    plt.close(fig)
    one = runs[runs["seed"] == 0]
    fig = P.plot_accuracy_size(seeded_means(runs), runs=one)
    assert fig.axes[1].texts[0].get_text() == "-0.20 (1 seed: no interval)"
    plt.close(fig)
    with pytest.raises(PlotError, match=r"runs lacks column\(s\) \['seed'\]"):
        P.plot_accuracy_size(seeded_means(runs), runs=runs.drop(columns="seed"))
    with pytest.raises(PlotError, match=r"pairs name label\(s\) \['uniform W4A4'\]"):
        P.plot_accuracy_size(seeded_means(runs), runs=runs,
                             pairs=[("HMQAT 13.11x", "uniform W4A4")])


def test_arm_label_spells_out_the_transition_arms():
    assert P.arm_label("data+so/8>4>T/step_lr=lr/10") == (
        "data re-init + scale-only phase (Eq. T2), 8 → 4 → T bits, step lr = lr/10")
    assert P.arm_label("range/8>T/step_lr=lr/10", step_lr=False) == (
        "range re-init (Eq. T1), 8 → T bits")
    assert P.arm_label("data+so/none/step_lr=lr") == (
        "data re-init + scale-only phase (Eq. T2), target from step 0, step lr = lr")
    assert P.arm_label("lsq/step_lr=lr/10+bn") == "plain LSQ, step lr = lr/10, BN re-estimated"
    assert P.arm_label("something else") == "something else"


def test_transition_diagnostics_is_one_view_with_its_legend_clear_of_the_data():
    fig = P.plot_transition_diagnostics(transition_frame(), "layer3.1.conv2")
    assert len(fig.axes) == 4
    step_ax = fig.axes[0]
    # seed 0 only: the seed-1 row (ratio 9) is not drawn
    ys = np.concatenate([l.get_ydata() for l in step_ax.lines if l.get_label() != "_nolegend_"])
    assert 9.0 not in ys
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == [
        "transition\nstep 0", "scale-only end\nstep 20", "transition\nstep 25",
        "transition\nstep 50", "end of training\nstep 300"]
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["range re-init (Eq. T1), 8 → T bits",
                      "data re-init + scale-only phase (Eq. T2), 8 → 4 → T bits",
                      "what Eq. T1 (range) would carry",
                      "plain LSQ, BN re-estimated",
                      "data re-init + scale-only phase (Eq. T2), 8 → 4 → T bits, BN re-estimated"]
    assert "Every arm: step lr = lr/10." in legend.get_title().get_text().replace("\n", " ")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = legend.get_window_extent(r)
    assert not any(box.overlaps(ax.get_window_extent(r)) for ax in fig.axes)
    every_text = [t.get_text() for ax in fig.axes for t in ax.texts + ax.get_xticklabels()]
    assert not any("step_lr=" in t or "data+so/" in t for t in every_text + labels)
    plt.close(fig)
    with pytest.raises(PlotError, match="no weight diagnostics for layer 'fc'"):
        P.plot_transition_diagnostics(transition_frame(), "fc")
