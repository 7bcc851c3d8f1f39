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
    assert [t.get_text() for t in figs[2].axes[0].get_yticklabels()] == ["n_2bit", "joint"]
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
