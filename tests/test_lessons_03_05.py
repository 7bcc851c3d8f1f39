"""The exercise checks of notebooks 03-05 (hmqat.study.lessons, sections 03-05) and the early
check of notebook 04's QAT-level input (hmqat.study.ablation.read_fixed_size): a right answer
passes with a tick, the placeholder is "not attempted" without raising, and each common wrong
answer raises one ExerciseError that names the slip."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as st

from hmqat import models, quant
from hmqat.study import ablation, lessons
from hmqat.study.lessons import ExerciseError


# ---------------------------------------------------------------------------------------- 03
def _step_grad(w: torch.Tensor, s: torch.Tensor, b: int) -> torch.Tensor:
    v = w / s
    qn, qp = -2 ** (b - 1), 2 ** (b - 1) - 1
    return torch.where(v <= qn, float(qn), torch.where(v >= qp, float(qp), torch.round(v) - v))


@pytest.fixture
def weights() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * 0.1
    return w, quant.init_step(w, 3, method="mse").view(-1, 1, 1, 1)


def test_03_step_grad_right_answer_passes(weights, capsys):
    w, s = weights
    assert lessons.check_03_step_grad(_step_grad, w, s, 3) is True
    out = capsys.readouterr().out
    assert out.startswith("✓ exercise 03.1: ∂q/∂s matches LSQ's autograd")
    assert f"N = {w[0].numel()} weights per step" in out


def test_03_step_grad_placeholder_is_not_attempted(weights, capsys):
    def lsq_step_grad(w, s, b):
        raise NotImplementedError

    assert lessons.check_03_step_grad(lsq_step_grad, *weights, 3) is False
    out = capsys.readouterr().out
    assert out.startswith("○ exercise 03.1 not attempted yet: lsq_step_grad() still raises "
                          "NotImplementedError")


def test_03_step_grad_without_clipping_names_the_clipping_ends(weights):
    with pytest.raises(ExerciseError) as err:
        lessons.check_03_step_grad(lambda w, s, b: torch.round(w / s) - w / s, *weights, 3)
    msg = str(err.value)
    assert msg.startswith("✗ exercise 03.1: on the notebook's weights ((8, 4, 3, 3), 3 bits), at "
                          "the clipping ends (w/s <= Q_N or >= Q_P)")
    assert "∂q/∂s is Q_N = -4 below the range and Q_P = 3 above it" in msg


def test_03_step_grad_summed_per_channel_names_the_shape(weights):
    with pytest.raises(ExerciseError, match=r"returned shape \(8,\); return one value per element "
                                            r"of w, shape \(8, 4, 3, 3\)"):
        lessons.check_03_step_grad(
            lambda w, s, b: _step_grad(w, s, b).reshape(w.shape[0], -1).sum(1), *weights, 3)


def _kd(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    lp, lq = F.log_softmax(zt / T, 1), F.log_softmax(zs / T, 1)
    return (lp.exp() * (lp - lq)).sum(1).mean() * T * T


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)


def test_03_distillation_right_answer_passes(logits, capsys):
    assert lessons.check_03_distillation(_kd, *logits, 4.0) is True
    assert "equal to hmqat.transitions.distillation_loss" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, slip", [
    (lambda zs, zt, T: _kd(zs, zt, T) / T ** 2, "it lacks the factor T²"),
    (lambda zs, zt, T: _kd(zt, zs, T), "it is KL(student ‖ teacher)"),
    (lambda zs, zt, T: _kd(zs, zt, T) * zs.shape[0], "it sums over the 16 images"),
    (lambda zs, zt, T: _kd(zs, zt, 1.0), "it uses T = 1"),
])
def test_03_distillation_names_the_slip(logits, wrong, slip):
    with pytest.raises(ExerciseError) as err:
        lessons.check_03_distillation(wrong, *logits, 4.0)
    assert str(err.value).startswith("✗ exercise 03.2: kd_term = ")
    assert slip in str(err.value)


# ---------------------------------------------------------------------------------------- 04
def _tau(x, y):
    n = len(x)
    s = sum(((x[i] - x[j]) * (y[i] - y[j]) > 0) - ((x[i] - x[j]) * (y[i] - y[j]) < 0)
            for i in range(n) for j in range(i + 1, n))
    return s / (n * (n - 1) / 2)


def test_04_kendall_right_answer_checks_the_run_and_the_table(capsys):
    x, y = [0.4, 0.1, 0.9, 0.5, 0.3], [12.0, 10.5, 14.0, 11.0, 13.5]
    reported = st.kendalltau(x, y).statistic
    assert lessons.check_04_kendall(_tau, x, y, reported=reported) is True
    assert (f"on this run's 5 configs: τ = {_tau(x, y):+.3f}, as the table reports"
            in capsys.readouterr().out)


def test_04_kendall_with_ties_checks_the_fixed_cases_only(capsys):
    assert lessons.check_04_kendall(_tau, [1.0, 2.0, 3.0], [5.0, 5.0, 6.0]) is True
    assert "hold tied values (τ-b ≠ the plain pair count), so they were not compared" in \
        capsys.readouterr().out


def test_04_kendall_names_a_flipped_sign_and_a_wrong_denominator():
    with pytest.raises(ExerciseError, match="the sign is flipped; a pair is concordant when x "
                                            "and y move the same way"):
        lessons.check_04_kendall(lambda x, y: -_tau(x, y))
    with pytest.raises(ExerciseError, match=r"divide by the number of pairs n\(n−1\)/2 = 10, "
                                            r"not by n²"):
        lessons.check_04_kendall(lambda x, y: _tau(x, y) * (len(x) - 1) / (2 * len(x)))


def test_04_random_z_names_the_population_std():
    r = [84.1, 85.3, 84.9]
    mean, sd0 = sum(r) / 3, pd.Series(r).std(ddof=0)
    with pytest.raises(ExerciseError) as err:
        lessons.check_04_random_z((89.0 - mean) / sd0, 89.0, r)
    assert "divides by the population std (ddof=0, numpy's default)" in str(err.value)
    assert lessons.check_04_random_z((89.0 - mean) / pd.Series(r).std(), 89.0, r) is True


def test_04_random_z_with_one_seed_is_not_checked(capsys):
    assert lessons.check_04_random_z(float("nan"), 89.0, [85.0]) is True
    assert "z not checked: 1 random seed(s) with no spread" in capsys.readouterr().out
    assert lessons.check_04_random_z(..., 89.0, [85.0]) is False     # the placeholder still


def test_04_read_fixed_size_fails_before_training(tmp_path):
    missing = tmp_path / "data" / "sensitivity" / "fixed_size.csv"
    cmd = lessons.pipeline_command(["01_sensitivity"], "lab")
    with pytest.raises(ablation.AblationError) as err:
        ablation.read_fixed_size(missing, 4, rerun=cmd)
    assert str(err.value) == (
        f"{missing} not found: the QAT-level check (qat_level_configs=4) trains configs of "
        "notebook 01's fixed-size comparison, which 01 writes only with a validation split "
        "(val_size > 0). Run `python -m hmqat.study.pipeline --profile lab --only "
        "01_sensitivity` with val_size > 0, or set qat_level_configs = 0 to skip the check")
    missing.parent.mkdir(parents=True)
    frame = pd.DataFrame({"config_id": range(3), "omega_joint": [0.3, 0.1, 0.2],
                          "config": [json.dumps({"a": 2})] * 3})
    frame.to_csv(missing, index=False)
    with pytest.raises(ablation.AblationError, match=r"n=4; choose 3 <= n <= 3"):
        ablation.read_fixed_size(missing, 4, rerun=cmd)
    assert len(ablation.read_fixed_size(missing, 3, rerun=cmd)) == 3


# ---------------------------------------------------------------------------------------- 05
@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    return models.create_model("resnet20")


def test_05_fp32_bops(resnet20, capsys):
    macs = sum(i.macs for i in models.quantizable_layers(resnet20))
    assert lessons.check_05_fp32_bops(macs * 32 * 32, resnet20, (1, 3, 32, 32)) is True
    assert "40.6 M MACs · 32 · 32), equal to hmqat.quant.bops" in capsys.readouterr().out
    with pytest.raises(ExerciseError, match="is the MAC count; Eq. B weighs each MAC"):
        lessons.check_05_fp32_bops(macs, resnet20, (1, 3, 32, 32))
    with pytest.raises(ExerciseError, match="is in GBOPs; give BOPs per image"):
        lessons.check_05_fp32_bops(macs * 1024 / 1e9, resnet20, (1, 3, 32, 32))


def test_05_seeds_needed(capsys):
    def seeds_needed(diff, sd):
        n = 2
        while st.t.ppf(0.975, n - 1) * sd / n ** 0.5 >= diff:
            n += 1
        return n

    assert lessons.check_05_seeds_needed(seeds_needed) is True
    assert ("4 for 0.2 points at s_d = 0.1; 7 for 0.2 points at s_d = 0.2; 12 for 0.2 points "
            "at s_d = 0.3") in capsys.readouterr().out

    def normal(diff, sd):
        n = 2
        while 1.96 * sd / n ** 0.5 >= diff:
            n += 1
        return n

    with pytest.raises(ExerciseError, match=r"seeds_needed\(0.2, 0.1\) = 2, expected 4: that is "
                                            r"the normal quantile 1.96"):
        lessons.check_05_seeds_needed(normal)
