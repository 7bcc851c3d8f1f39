"""Tests for hmqat.runtime: the one atomic writer (bytes, text, JSON, torch.save), read_json, the
progress bar and provenance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hmqat import runtime
from hmqat.runtime import (atomic_torch_save, atomic_write_bytes, atomic_write_json,
                           atomic_write_text, read_json)


def _no_tmp(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


# --------------------------------------------------------------------------------------------
# atomic files, JSON
# --------------------------------------------------------------------------------------------
def test_atomic_write_json_round_trips_numpy_torch_and_paths(tmp_path):
    obj = {"b": np.float32(0.5), "a": np.int64(3), "arr": np.arange(3), "path": tmp_path / "x",
           "t": torch.tensor(2.5), "tv": torch.tensor([1, 2]), "nested": {"z": [1, 2], "y": None},
           "s": {3, 1}}
    path = tmp_path / "deep" / "er" / "obj.json"
    assert atomic_write_json(path, obj) == path
    back = read_json(path)
    assert back == {"a": 3, "arr": [0, 1, 2], "b": 0.5, "nested": {"y": None, "z": [1, 2]},
                    "path": str(tmp_path / "x"), "s": [1, 3], "t": 2.5, "tv": [1, 2]}
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")   # sorted, indented
    assert '\n  "a": 3' in text
    _no_tmp(tmp_path)


def test_atomic_write_json_rejects_unserialisable(tmp_path):
    with pytest.raises(ValueError, match="type object.*convert it"):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    _no_tmp(tmp_path)


def test_atomic_write_text_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runtime.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    _no_tmp(tmp_path)


def test_atomic_write_text_honours_umask(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert atomic.stat().st_mode == plain.stat().st_mode


def test_atomic_torch_save_and_bytes_share_the_writer(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "m.pt"
    atomic_torch_save({"w": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    calls = []
    real = runtime.atomic_write_bytes
    monkeypatch.setattr(runtime, "atomic_write_bytes", lambda p, b: calls.append(p) or real(p, b))
    atomic_write_text(tmp_path / "t.txt", "x")
    atomic_torch_save({}, tmp_path / "e.pt")
    assert calls == [tmp_path / "t.txt", tmp_path / "e.pt"]
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    _no_tmp(tmp_path)


def test_progress_is_plain_text_when_headless(monkeypatch, capsys):
    monkeypatch.setenv("HMQAT_HEADLESS", "1")
    monkeypatch.setenv("TQDM_MININTERVAL", "7")
    bar = runtime.progress(range(3), desc="x", disable=False)
    assert bar.mininterval == 7.0 and bar.ascii is True
    assert list(bar) == [0, 1, 2]

