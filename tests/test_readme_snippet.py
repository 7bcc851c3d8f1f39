"""The README's "your own model in ten lines" block, executed on synthetic data so it cannot rot."""
import re
from pathlib import Path

import torch

from hmqat import data, export, quant

README = Path(__file__).resolve().parent.parent / "README.md"


def _snippet() -> str:
    text = README.read_text()
    block = re.search(r"<!-- snippet:own-model -->\n```python\n(.*?)```", text, re.S).group(1)
    return block


def test_snippet_is_short():
    assert len([l for l in _snippet().splitlines() if l.strip()]) <= 13


def test_snippet_runs_end_to_end(tmp_path, monkeypatch):
    root = data.write_synthetic_imagefolder(tmp_path / "imgs", num_classes=4, per_class=8,
                                           image_size=32, splits=("train", "val"))
    code = _snippet()
    # Only the data-size knobs change: offline weights, 4 synthetic classes of 32 px images.
    subs = {'weights="DEFAULT"': "weights=None, num_classes=4",
            '"path/to/imagefolder"': repr(str(root)),
            # batch 64 > the 32 images: the loader must still give one batch
            "batch_size=64": "batch_size=64, workers=0, image_size=32, num_classes=4",
            "hessian.layer_traces(model, calib)": "hessian.layer_traces(model, calib, max_probes=4)",
            # MSE step init grid-searches 100 steps per channel: ~18 s per pass over ResNet18's
            # 11 M weights on one CPU core, 7 passes here. The test uses LSQ's closed form
            # (same code path otherwise; MSE itself is tested in test_quant.py).
            'method="mse"': 'method="lsq"', 'init="mse"': 'init="lsq"'}
    for old, new in subs.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README-snippet", "exec"), scope)
    reloaded, config, history = scope["qmodel"], scope["config"], scope["history"]
    assert len(scope["calib"]) == 1 and len(history) == 1     # one (partial) batch of 32
    assert len(scope["kd"]) == 1                                # the distillation callback
    assert quant.is_quantized(reloaded) and quant.bit_config_of(reloaded) == config
    assert quant.compression_ratio(reloaded) >= 10
    assert all(q.init_method == "lsq" for q in reloaded.modules()
               if isinstance(q, quant.LSQQuantizer))   # the substitution above took effect
    again = export.load_packed(tmp_path / "resnet18_mixed.hmq", scope["model"])
    x = next(iter(scope["val_loader"]))[0]
    with torch.no_grad():
        assert torch.equal(again(x), reloaded(x))


def test_default_workers_follow_the_cpus():
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert data.default_workers() == min(8, n) and data.default_workers(cap=1) == 1
