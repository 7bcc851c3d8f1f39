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


def test_snippet_is_at_most_ten_lines():
    assert len([l for l in _snippet().splitlines() if l.strip()]) <= 10


def test_snippet_runs_end_to_end(tmp_path, monkeypatch):
    root = data.write_synthetic_imagefolder(tmp_path / "imgs", num_classes=4, per_class=8,
                                           image_size=32, splits=("train", "val"))
    code = _snippet()
    # Only the data-size knobs change: offline weights, 4 synthetic classes of 32 px images.
    subs = {'weights="DEFAULT"': "weights=None, num_classes=4",
            '"path/to/imagefolder"': repr(str(root)),
            "batch_size=64": "batch_size=8, workers=0, image_size=32, num_classes=4",
            "range(8)": "range(2)",
            "hessian.layer_traces(model, calib)": "hessian.layer_traces(model, calib, max_probes=4)"}
    for old, new in subs.items():
        assert old in code, old
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README-snippet", "exec"), scope)
    qmodel, config = scope["qmodel"], scope["config"]
    assert quant.is_quantized(qmodel) and quant.bit_config_of(qmodel) == config
    assert quant.compression_ratio(qmodel) >= 10
    packed = tmp_path / "resnet18_mixed.hmq"
    reloaded = export.load_packed(packed)
    x = next(iter(scope["val_loader"]))[0]
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), qmodel(x))
