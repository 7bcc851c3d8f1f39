"""Hostile runs of the pipeline and the command lines (issue 28: items 1, 5, 8, 9).

Step state that cannot lie (a stale stamp after a failed rerun), the results lock through a
symbolic link, read-only and full disks, command-line misuse before any set-up, and a profile
file that is a link to something else. Every failure is one ``[hmqat] ERROR`` line naming the
fix, and each command an error suggests is run as written.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import textwrap
from pathlib import Path

import pytest

from hmqat import locking, runtime
from hmqat.locking import LockError, results_lock
from hmqat.study import cli, params, pipeline, reporting

ROOT = Path(__file__).resolve().parent.parent
STEP = "00_fp32_baseline"

# Loaded by the notebook kernel (PYTHONPATH): os.replace, the last call of every atomic write
# (hmqat.runtime.atomic_write_bytes), fails with ENOSPC for files matching $HMQAT_TEST_ENOSPC.
_FAULT = textwrap.dedent("""
    import errno, fnmatch, os
    _pattern = os.environ.get("HMQAT_TEST_ENOSPC")
    if _pattern:
        _replace = os.replace

        def _full_disk_replace(src, dst, *args, **kwargs):
            if fnmatch.fnmatch(os.fspath(dst), _pattern):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _replace(src, dst, *args, **kwargs)

        os.replace = _full_disk_replace
""")


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m hmqat.study.pipeline argv``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = pipeline.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str) -> str:
    """The single ``[hmqat] ERROR: ...`` line of ``err`` (and nothing else: no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("[hmqat] ERROR: "), err
    return lines[0]


def _suggested(line: str, marker: str) -> list[str]:
    """The arguments of the ``python -m hmqat.study.pipeline ...`` command that ``line``
    suggests after ``marker``, as a shell would split them."""
    cmd = shlex.split(line.split(marker, 1)[1].strip())
    assert cmd[:3] == ["python", "-m", "hmqat.study.pipeline"], cmd
    return cmd[3:]


def _executed_exception(root: Path) -> bool:
    nb = json.loads((root / "executed" / f"{STEP}.ipynb").read_text())
    return bool(nb["metadata"]["papermill"]["exception"])


# --------------------------------------------------------------------------------------------
# 1. Stale stamps: disk full during --force, then the rerun the error suggests
# --------------------------------------------------------------------------------------------
def test_disk_full_during_force_then_plain_rerun(tmp_path, capsys, monkeypatch):
    # other changes to the hmqat sources while this test runs must not change the digests
    monkeypatch.setattr(pipeline, "_sources_digest", lambda: "sources")
    res = (tmp_path / "results").resolve()
    root = res / "smoke"
    base = ["--profile", "smoke", "--results-root", str(res), "--only", STEP]
    stamp = root / ".stamps" / f"{STEP}.json"

    rc, out, _ = _main(capsys, *base)                                   # a finished step 00
    assert rc == 0 and stamp.exists() and not _executed_exception(root)
    fp32_json = root / "data" / "fp32.json"
    before = fp32_json.stat().st_mtime_ns

    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(_FAULT)
    monkeypatch.setenv("PYTHONPATH", str(fault))
    monkeypatch.setenv("HMQAT_TEST_ENOSPC", "*/figures/fp32_finetune.png")
    rc, out, err = _main(capsys, *base, "--force")                      # disk full in the step
    line = _one_error_line(err)
    assert rc == 1
    assert (f"notebook {STEP}.ipynb failed in cell" in line and "WriteError: cannot write "
            in line and "fp32_finetune.png: the disk is full (No space left on device); free "
            "space on the disk holding" in line)
    assert f"executed copy of the failed attempt: {root / 'executed' / STEP}.ipynb" in line
    assert not stamp.exists()                                # removed when the rerun started
    assert _executed_exception(root)                         # the record of the failure
    assert fp32_json.stat().st_mtime_ns > before             # the failed attempt rewrote it...
    entry = json.loads((root / "manifest.json").read_text())["steps"][STEP]
    assert entry["status"] == "failed"                       # ...and it is not presented as
    assert "data/fp32.json" in entry["failure"]["stale_outputs"]          # current
    assert "No space left on device" in entry["failure"]["error"]
    assert "file(s) it wrote are listed as stale in manifest.json" in line

    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("HMQAT_TEST_ENOSPC")
    # a later step will not run on top of the partial files; its advice is a command
    rc, out, err = _main(capsys, "--profile", "smoke", "--results-root", str(res),
                         "--only", "01_sensitivity")
    refused = _one_error_line(err)
    assert rc == 1 and f"{STEP}'s last attempt did not finish" in refused
    assert "data/fp32.json" in refused and not (root / "executed" / "01_sensitivity.ipynb").exists()
    assert _suggested(refused, "Run it first: ")[-3:] == ["--only", STEP, "01_sensitivity"]

    # the plain rerun, exactly as the failure's message wrote it
    rerun = _suggested(line, "finished steps are skipped): ")
    assert rerun == base
    rc, out, err = _main(capsys, *rerun)
    assert rc == 0, err
    assert "unchanged" not in out and f"{STEP}: running (smoke profile; no finished run " \
                                      "recorded)" in out
    assert stamp.exists() and not _executed_exception(root)
    entry = json.loads((root / "manifest.json").read_text())["steps"][STEP]
    assert entry["status"] == "ran" and entry["failure"] is None and entry["attempts"] == 2
    assert not (root / ".stamps" / f"{STEP}.attempts.json").exists()

    # `make clean-cache` removes the FP32 checkpoint: 01's error suggests rerunning 00, and
    # that command reruns it (the step is not "unchanged" while its checkpoint is missing)
    (root / "checkpoints" / "fp32-resnet20.pt").unlink()
    study = pipeline.Study(str(root), profile="smoke", dataset="synthetic", device="cpu")
    with pytest.raises(pipeline.PipelineError, match="fp32-resnet20.pt not found") as info:
        study.fp32_model()
    advice = _suggested(str(info.value), "first (")
    advice[-1] = advice[-1].rstrip(")")
    assert advice == base
    ran = []
    monkeypatch.setattr(pipeline, "_run_notebook", lambda nb_in, *a, **k: ran.append(nb_in.stem))
    rc, out, err = _main(capsys, *advice)
    assert ran == [STEP] and "its output(s) checkpoints/fp32-resnet20.pt are missing" in out


def test_a_step_is_skipped_only_when_its_record_is_whole(tmp_path):
    """The skip decision: digest, unfinished attempt, executed copy and key outputs."""
    root = tmp_path / "smoke"
    steps = pipeline._Steps({"common": {"arch": "resnet20"}}, "smoke", root, "cmd")
    assert steps.why_run(STEP, "d") == "no finished run recorded"
    runtime.atomic_write_json(steps.stamp(STEP), {"digest": "d", "parts": {
        "notebook": "n", "parameters": "p", "hmqat sources": "s"}})
    assert steps.why_run(STEP, "other", {"notebook": "n", "parameters": "p2",
                                         "hmqat sources": "s2"}) == \
        "its parameters, hmqat sources changed"
    assert steps.why_run(STEP, "d") == f"its executed copy executed/{STEP}.ipynb is missing"
    nb = {"metadata": {"papermill": {"exception": True}}, "cells": []}
    runtime.atomic_write_json(steps.executed(STEP), nb)
    assert steps.why_run(STEP, "d") == f"its executed copy executed/{STEP}.ipynb shows a failed run"
    nb = {"metadata": {"papermill": {"exception": None}},
          "cells": [{"outputs": [{"output_type": "error", "ename": "OSError"}]}]}
    runtime.atomic_write_json(steps.executed(STEP), nb)
    assert "shows a failed run" in steps.why_run(STEP, "d")
    nb["cells"] = []
    runtime.atomic_write_json(steps.executed(STEP), nb)
    assert steps.why_run(STEP, "d") == ("its output(s) checkpoints/fp32-resnet20.pt, "
                                         "data/fp32.json are missing")
    for rel in pipeline.KEY_OUTPUTS[STEP]:
        runtime.atomic_write_bytes(root / rel.format(arch="resnet20"), b"x")
    assert steps.why_run(STEP, "d") is None
    runtime.atomic_write_json(steps.attempts(STEP), {"current": {"started_ns": 1}})
    assert steps.why_run(STEP, "d") == "its last attempt did not finish"


def test_upstream_refusal_command_runs_both_steps(tmp_path, capsys, monkeypatch):
    """The command the refusal suggests is accepted and runs the failed step, then the
    requested one (the notebooks are replaced by a recorder here)."""
    res = tmp_path / "results"
    attempts = res / "smoke" / ".stamps" / f"{STEP}.attempts.json"
    runtime.atomic_write_json(attempts, {"earlier_s": [], "current": {"elapsed_s": 1.0,
                                                                      "started_ns": 1}})
    rc, _, err = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only",
                       "02_bit_allocation")
    line = _one_error_line(err)
    ran = []

    def record(nb_in, nb_out, *args, **kwargs):
        ran.append(nb_in.stem)
        runtime.atomic_write_json(nb_out, {"metadata": {"papermill": {}}, "cells": []})

    monkeypatch.setattr(pipeline, "_run_notebook", record)
    assert _main(capsys, *_suggested(line, "Run it first: "))[0] == 0
    assert ran == [STEP, "02_bit_allocation"] and not attempts.exists()


def test_a_partial_rerun_marks_the_steps_that_read_it_stale(tmp_path, capsys, monkeypatch):
    """A fresh clone holds a whole committed run (every step's manifest entry and files, no
    stamps). Rerunning 01 alone leaves 02-07's files from the earlier run: their entries say
    stale (the cause and the command that reruns them), 00's entry stays, and notebook 05's
    report and the summary then leave 04's files out. A stale step whose stamp survived is not
    'unchanged, skipped': it reruns, and its entry is current again."""
    monkeypatch.setattr(pipeline, "_sources_digest", lambda: "sources")
    res = (tmp_path / "results").resolve()
    root = res / "smoke"
    committed = {n: {"status": "ran", "wall_s": 1.0} for n in params.NOTEBOOKS[:8]}
    runtime.atomic_write_json(root / "manifest.json", {"steps": committed})
    ran = []

    def record(nb_in, nb_out, *args, **kwargs):
        ran.append(nb_in.stem)
        runtime.atomic_write_json(nb_out, {"metadata": {"papermill": {}}, "cells": []})

    monkeypatch.setattr(pipeline, "_run_notebook", record)
    rc, out, err = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only",
                         "01_sensitivity", "05_report")
    assert rc == 0, err
    assert ran == ["01_sensitivity", "05_report"]
    readers = ("02_bit_allocation", "03_qat", "04_ablations", "05_report", "06_budget",
               "07_frontier_walk")
    assert params.readers("01_sensitivity") == readers
    assert params.readers("04_ablations") == ("05_report",) and not params.readers("05_report")
    assert (f"[hmqat] 01_sensitivity reruns, so the results of {', '.join(readers)} are an "
            f"earlier run's: marked stale in manifest.json until they rerun") in out
    steps = json.loads((root / "manifest.json").read_text())["steps"]
    assert steps["00_fp32_baseline"] == committed["00_fp32_baseline"]        # not a reader
    assert steps["01_sensitivity"]["status"] == "ran"
    assert steps["05_report"]["status"] == "ran" and steps["05_report"]["stale"] is None
    for name in ("02_bit_allocation", "03_qat", "04_ablations", "06_budget", "07_frontier_walk"):
        entry = steps[name]
        assert entry["status"] == "stale", name
        assert entry["stale"]["because"] == "01_sensitivity reran after it"
        assert shlex.split(entry["stale"]["rerun"])[3:] == [
            "--profile", "smoke", "--results-root", str(res), "--only", name]
    manifest = json.loads((root / "manifest.json").read_text())
    assert not reporting.step_finished(manifest, "04_ablations")
    assert reporting.step_finished(manifest, "05_report")

    # 04 finished, then 00 reruns: 04 loses its stamp and reruns when asked, not "unchanged"
    ran.clear()
    assert _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only",
                 "04_ablations")[0] == 0
    for rel in pipeline.KEY_OUTPUTS["04_ablations"]:
        runtime.atomic_write_bytes(root / rel.format(arch="resnet20"), b"x")
    assert (root / ".stamps" / "04_ablations.json").exists()
    rc, out, _ = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only",
                       "00_fp32_baseline")
    assert rc == 0 and not (root / ".stamps" / "04_ablations.json").exists()
    steps = json.loads((root / "manifest.json").read_text())["steps"]
    assert steps["04_ablations"]["status"] == "stale"
    assert steps["04_ablations"]["stale"]["because"] == "00_fp32_baseline reran after it"
    ran.clear()
    rc, out, _ = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only",
                       "04_ablations")
    assert rc == 0 and ran == ["04_ablations"] and "unchanged" not in out
    entry = json.loads((root / "manifest.json").read_text())["steps"]["04_ablations"]
    assert entry["status"] == "ran" and entry["stale"] is None


def test_attempt_bookkeeping_on_a_full_disk_never_hides_the_error(tmp_path, monkeypatch):
    path = tmp_path / "step.attempts.json"
    attempt = pipeline._Attempts(path, beat_s=0.01)
    with pytest.raises(RuntimeError, match="the step's own error"):
        with attempt:
            def full(*args, **kwargs):
                raise runtime.WriteError("cannot write x: the disk is full", errno.ENOSPC, "x")
            monkeypatch.setattr(pipeline, "atomic_write_json", full)
            raise RuntimeError("the step's own error")
    assert json.loads(path.read_text())["current"]["started_ns"] == attempt.started_ns


# --------------------------------------------------------------------------------------------
# 5. The lock never follows a symbolic link
# --------------------------------------------------------------------------------------------
def test_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / "results" / "smoke"
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(victim)
    with pytest.raises(LockError, match=rf"{folder / '.lock'} is a symbolic link \(to {victim}\); "
                                        r"hmqat refuses to lock through a link.*Remove the link"):
        with results_lock(folder):
            pass
    rc, _, err = _main(capsys, "--profile", "smoke", "--results-root", str(tmp_path / "results"),
                       "--only", STEP)
    assert rc == 1 and "is a symbolic link" in _one_error_line(err)
    assert victim.read_text() == "precious\n"
    (folder / ".lock").unlink()
    (folder / ".lock").mkdir()
    with pytest.raises(LockError, match=r"cannot open the lock file .*\(Is a directory\); remove"):
        with results_lock(folder):
            pass


# --------------------------------------------------------------------------------------------
# 8. Read-only and full disks, command-line misuse: one line each
# --------------------------------------------------------------------------------------------
def _failing(monkeypatch, name: str, code: int, matches) -> None:
    """Make ``os.<name>`` fail with ``code`` when one of its path arguments ``matches``."""
    real = getattr(os, name)

    def fake(*args, **kwargs):
        for a in args:
            if isinstance(a, (str, os.PathLike)) and matches(os.fspath(a)):
                raise OSError(code, os.strerror(code), os.fspath(a))
        return real(*args, **kwargs)
    monkeypatch.setattr(os, name, fake)


def test_read_only_results_folder_is_one_line(tmp_path, capsys, monkeypatch):
    res = tmp_path / "results"
    (res / "smoke").mkdir(parents=True)
    _failing(monkeypatch, "open", errno.EROFS, lambda p: p.endswith("/.lock"))
    rc, _, err = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only", STEP)
    assert rc == 1 and _one_error_line(err) == (
        f"[hmqat] ERROR: results folder: cannot write {res / 'smoke' / '.lock'}: the file system "
        "is read-only; remount it read-write, or use a folder on a writable disk")


def test_results_folder_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    res = tmp_path / "results"
    res.mkdir()
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == res / "smoke":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, _, err = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only", STEP)
    assert rc == 1 and _one_error_line(err) == (
        f"[hmqat] ERROR: results folder: cannot write {res / 'smoke'}: permission denied; make "
        f"{res} writable by this user (e.g. `chmod u+w {res}`) and rerun")


def test_disk_full_at_the_manifest_write_is_one_line(tmp_path, capsys, monkeypatch):
    res = tmp_path / "results"
    _failing(monkeypatch, "replace", errno.ENOSPC, lambda p: p.endswith("manifest.json"))
    rc, _, err = _main(capsys, "--profile", "smoke", "--results-root", str(res), "--only", STEP)
    manifest = res / "smoke" / "manifest.json"
    assert rc == 1 and _one_error_line(err) == (
        f"[hmqat] ERROR: cannot write {manifest}: the disk is full (No space left on device); "
        f"free space on the disk holding {manifest.parent} (`df -h {manifest.parent}` shows it) "
        "and rerun")
    assert not manifest.exists() and not list((res / "smoke").glob(".manifest.json.*"))


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")
    _failing(monkeypatch, "replace", errno.ENOSPC, lambda p: True)
    with pytest.raises(runtime.WriteError) as info:
        runtime.atomic_write_bytes(target, b"new")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(info.value).startswith(f"cannot write {target}: the disk is full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("argv, message", [
    (["qat", "--profile", "smoke", "--uniform", "4", "--batch-size", "0"],
     "--batch-size = 0 (int): expected an integer >= 1 (training batch size)"),
    (["qat", "--profile", "smoke", "--uniform", "1"],
     "--uniform = 1 (int): expected a bit width in [2, 3, 4, 5, 6, 7, 8] (uniform weight bits "
     "instead of --config)"),
    (["qat", "--profile", "nosuch", "--uniform", "4"],
     f"unknown profile 'nosuch': there is no {ROOT / 'params' / 'nosuch.yaml'}; choose one of"),
    (["qat", "--profile", "smoke", "--uniform", "4", "--recipe", "{distillation: on}"],
     "--recipe is not valid JSON (Expecting property name enclosed in double quotes at "
     "character 1); give a JSON object, e.g. --recipe '{\"distillation\": {\"enabled\": true}}'"),
    (["qat", "--profile", "smoke", "--uniform", "4", "--recipe", '{"distil": true}'],
     "--recipe = {'distil': True} (dict): expected a valid recipe (unknown recipe key(s) "
     "['distil']"),
    (["qat", "--profile", "smoke", "--uniform", "4", "--seed", "-7"],
     "--seed = -7 (int): expected an integer >= 0 (global seed"),
    (["finetune", "--profile", "smoke", "--lr", "0"],
     "--lr = 0.0 (float): expected a number > 0 (FP32 learning rate)"),
    (["qat", "--profile", "smoke", "--uniform", "4", "--device", "gpu"],
     "--device = 'gpu' (str): expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' (torch device)"),
    (["qat", "--profile", "smoke", "--config", "/nonexistent/bits.json"],
     "--config /nonexistent/bits.json not found; pass a bit config JSON file"),
    (["qat", "--profile", "smoke", "--uniform", "4", "--checkpoint", "x.pt"],
     "qat keeps its checkpoint in its run folder"),
])
def test_cli_misuse_is_one_line_before_any_set_up(argv, message, capsys, monkeypatch):
    """The same rules as the profile schema, checked before the process group, data or model
    exist (reaching the set-up fails the test)."""
    def no_set_up(*args, **kwargs):
        raise AssertionError("set-up reached")
    monkeypatch.setattr(cli, "_train", no_set_up)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"[hmqat] ERROR: {message}"), line


def test_cli_bad_config_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_train", lambda *a, **k: pytest.fail("set-up reached"))
    bits = tmp_path / "bits.json"
    for text, message in [("{oops", f"--config {bits} is not a readable JSON file"),
                          ('{"conv1": 1}', f"--config {bits}: layer 'conv1' has 1; expected a "
                                           "bit width in [2, 3, 4, 5, 6, 7, 8]")]:
        bits.write_text(text)
        assert cli.main(["qat", "--profile", "smoke", "--config", str(bits)]) == 1
        assert message in _one_error_line(capsys.readouterr().err)


def test_cli_takes_the_results_lock(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_train", lambda *a, **k: pytest.fail("ran without the lock"))
    monkeypatch.delenv("RANK", raising=False)
    res = tmp_path / "smoke"
    with results_lock(res):
        assert cli.main(["finetune", "--profile", "smoke", "--results", str(res)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"{res} is in use by pid {os.getpid()}" in line
    held = []
    monkeypatch.setattr(cli, "_train", lambda *a, **k: held.append(
        (res / locking.LOCK_NAME).read_text().strip()) or [])
    assert cli.main(["finetune", "--profile", "smoke", "--results", str(res)]) == 0
    assert held == [str(os.getpid())]           # held while training


# --------------------------------------------------------------------------------------------
# 9. A profile file that is a link to another file: named, never echoed
# --------------------------------------------------------------------------------------------
SECRET = "s3cr3t-" + "x" * 40


@pytest.mark.parametrize("content, match", [
    (f"{SECRET}\n" * 200, r"the file holds 's3cr3t-x+… \(str, 9599 characters\); expected a mapping"),
    ("".join(f"key{i}_{SECRET}: 1\n" for i in range(50)),
     r"unknown top-level section\(s\) \['key0_s3cr3t-x+…, 'key1_.*, and 47 more\]"),
])
def test_profile_symlink_is_named_and_its_target_never_printed(tmp_path, content, match):
    target = tmp_path / "elsewhere" / "notes.txt"
    target.parent.mkdir()
    target.write_text(content)
    d = tmp_path / "params"
    d.mkdir()
    (d / "mine.yaml").symlink_to(target)
    with pytest.raises(pipeline.PipelineError, match=match) as info:
        pipeline.load_params("mine", d)
    msg = str(info.value)
    assert msg.startswith(f"{d / 'mine.yaml'} (a link to {target}): ")
    assert msg.count(SECRET[:20]) <= 3 and SECRET not in msg and len(msg) < 500


def test_profile_that_is_not_a_small_utf8_file(tmp_path):
    d = tmp_path / "params"
    d.mkdir()
    (d / "dev.yaml").symlink_to(os.devnull)
    with pytest.raises(pipeline.PipelineError, match=r"dev.yaml \(a link to /dev/null\): not a "
                                                     r"regular file"):
        pipeline.load_params("dev", d)
    (d / "gone.yaml").symlink_to(tmp_path / "missing.yaml")
    with pytest.raises(pipeline.PipelineError, match=r"gone.yaml \(a link to .*missing.yaml\): "
                                                     r"cannot read the profile \(No such file"):
        pipeline.load_params("gone", d)
    (d / "big.yaml").write_bytes(b"#" * (params.MAX_PROFILE_BYTES + 1))
    with pytest.raises(pipeline.PipelineError, match=r"big.yaml: 1,048,577 bytes, more than"):
        pipeline.load_params("big", d)
    (d / "bin.yaml").write_bytes(b"common:\n  arch: \xff\xfe\n")
    with pytest.raises(pipeline.PipelineError, match=r"bin.yaml: not UTF-8 text \(byte 0xff at "
                                                     r"offset 16\)"):
        pipeline.load_params("bin", d)
    with pytest.raises(pipeline.PipelineError, match=r"profile '../x' is not a profile name"):
        pipeline.load_params("../x", d)
