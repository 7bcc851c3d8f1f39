"""Browser check of the lab (issue 27): one notebook, run in JupyterLab by a headless Chromium.

    apt-get install -y chromium chromium-driver        # Debian/Ubuntu: the browser and its driver
    .venv/bin/python -m pip install selenium           # in requirements.txt (dev-only)
    .venv/bin/python benchmarks/lab_e2e.py          # notebooks/02_bit_allocation, ../results/lab
    .venv/bin/python benchmarks/lab_e2e.py notebooks/02_bit_allocation.ipynb --results-dir /tmp/lab
    .venv/bin/python benchmarks/lab_e2e.py /tmp/tiny.ipynb --timeout 300 --out /tmp/e2e.txt

Not a speed benchmark and not in CI (`make bench` leaves it out): it checks what a student sees.
It starts JupyterLab (this Python's) on a free localhost port with a random token,
``--no-browser`` and, when run as root, ``--allow-root``; opens the notebook in headless
Chromium via Selenium; clicks Run → Run All Cells (``runmenu:run-all``); waits until no cell is queued or running and
the kernel is idle; saves the notebook; and then checks

* that every code cell ran (a cell left unrun means Run All stopped at an error),
* that no output is an error (in the saved notebook: ``output_type == "error"``; in the page: a
  stderr output holding a traceback),
* that at least one figure was rendered in the page (an ``<img>`` in an output area).

It writes a screenshot (scrolled to the first figure, else the first error) and a short text
report (notebook, wall time, cells, figures, errors, verdict), then shuts JupyterLab down. The
exit status is 0 when every check passes, 1 when one fails (the report says which), 2 when a
prerequisite is missing.

The notebook is never modified: JupyterLab serves a temporary mirror of the repository (symbolic
links) in which only the notebook is a copy, so relative paths such as the notebooks' default
``results_dir = "../results/lab"`` (git-ignored) mean what they mean in ``make lab``.
``--results-dir DIR`` adds a cell ``results_dir = "<DIR, absolute>"`` after the notebook's
``parameters`` cell, as papermill does. Set ``HMQAT_DATA_DIR`` / ``HMQAT_WEIGHTS_DIR`` as for
``make lab`` (relative paths are resolved against the current folder here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hmqat.runtime import atomic_write_bytes, atomic_write_text  # noqa: E402

DEFAULT_NOTEBOOK = ROOT / "notebooks" / "02_bit_allocation.ipynb"
INSTALL_HINT = ("install the browser with `apt-get update && apt-get install -y chromium "
                "chromium-driver` (Debian/Ubuntu) and Selenium with `.venv/bin/python -m pip "
                "install selenium`")
#: JupyterLab settings for the check only (a private user-settings folder): every cell in the
#: DOM (no windowing), no news or update pop-ups over the notebook.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}
#: A traceback in a rendered stderr/error output (IPython prints "...Error  Traceback (most
#: recent call last)"; a SyntaxError shows only its last line).
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^\s*\w*(Error|Exception): ", re.M)


class LabCheckError(RuntimeError):
    """A check failed, or JupyterLab / the browser did not do what the check needs."""


class MissingPrerequisite(RuntimeError):
    """Chromium, its driver or Selenium is not installed."""


@dataclass
class Outcome:
    """What the run found; ``failures`` empty means every check passed."""

    notebook: str
    results_dir: str
    wall_s: float = float("nan")
    code_cells: int = 0
    executed: int = 0
    figures: int = 0
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    versions: str = ""


# --------------------------------------------------------------------------------------------
# The notebook JupyterLab serves: a copy inside a symlink mirror of its tree
# --------------------------------------------------------------------------------------------
def mirror(notebook: Path, base: Path, into: Path) -> Path:
    """Mirror ``base`` into ``into`` with symbolic links, except along the path to
    ``notebook``: its folders are real and the notebook is a copy. Returns the copy's path.
    So the kernel's working folder (the copy's folder) sees the same neighbours as the
    original, and nothing the browser saves reaches the original. The notebook's jupytext
    pair (same stem: ``05_report.py``) is not linked: saving would write through the link."""
    rel = notebook.relative_to(base)
    src, dst = base, into
    for part in rel.parts:
        for entry in src.iterdir():
            paired = src == notebook.parent and Path(entry.name).stem == notebook.stem
            if entry.name != part and not paired:
                (dst / entry.name).symlink_to(entry)
        src, dst = src / part, dst / part
        if src.is_dir():
            dst.mkdir()
    shutil.copyfile(src, dst)
    return dst


def prepare(path: Path, results_dir: Path | None) -> None:
    """Clear the copy's outputs and execution counts (so every prompt and figure the check sees
    comes from this run) and, for ``results_dir``, insert ``results_dir = "<absolute>"`` after
    the cell tagged ``parameters`` (papermill's convention), tagged ``injected-parameters``."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if results_dir is not None:
        where = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
        if not where:
            raise LabCheckError(f"{path.name} has no cell tagged 'parameters', so --results-dir "
                                f"cannot be set; leave --results-dir out to use its own default")
        cell = nbformat.v4.new_code_cell(f"results_dir = {str(results_dir.resolve())!r}",
                                         metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(where[0] + 1, cell)
    nbformat.write(nb, path)


def saved_errors(path: Path) -> tuple[int, int, list[str]]:
    """(code cells, cells with an execution count, error outputs "Cell n: Name: value") of the
    notebook as JupyterLab saved it."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    errors = [f"cell {i + 1}: {o.get('ename')}: {o.get('evalue')}"
              for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    return len(code), sum(c.get("execution_count") is not None for c in code), errors


# --------------------------------------------------------------------------------------------
# JupyterLab
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lab_args(port: int, token: str, root_dir: Path, settings: Path, uid: int) -> list[str]:
    """`jupyter lab` options of the check: localhost only, this token, no browser, a private
    settings and workspaces folder, ``--allow-root`` when ``uid`` is 0 (jupyter refuses root
    otherwise)."""
    args = ["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
            f"--LabApp.user_settings_dir={settings / 'user-settings'}",
            f"--LabApp.workspaces_dir={settings / 'workspaces'}",
            "--LabApp.news_url=None"]
    return args + (["--allow-root"] if uid == 0 else [])


def write_settings(settings: Path) -> None:
    for name, value in LAB_SETTINGS.items():
        plugin, _, file = name.rpartition("/")
        target = settings / "user-settings" / plugin / file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(value))


def api(port: int, token: str, path: str, method: str = "GET") -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


def wait_for_lab(proc: subprocess.Popen, port: int, token: str, log: Path, timeout: float) -> str:
    """Poll /api/status until JupyterLab answers; returns its version. Raises with the end of
    its log if it exits or does not answer within ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise LabCheckError(f"JupyterLab exited with status {proc.returncode} before it "
                                f"answered; the end of its log:\n{tail(log)}")
        try:
            return str(api(port, token, "/api")["version"])
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    raise LabCheckError(f"JupyterLab did not answer on port {port} within {timeout:.0f} s; the "
                        f"end of its log:\n{tail(log)}")


def lab_release() -> str:
    """The JupyterLab version this Python runs (the server's /api reports only its own)."""
    try:
        from jupyterlab import __version__
    except ImportError:
        return "(not installed)"
    return __version__


def kernels_idle(port: int, token: str) -> bool:
    """True when the server runs at least one kernel and every kernel is idle."""
    kernels = api(port, token, "/api/kernels")
    return bool(kernels) and all(k.get("execution_state") == "idle" for k in kernels)


def wait_ready(drv, port: int, token: str, timeout: float) -> None:
    """Wait until the notebook's cells are on the page and its kernel has started and is idle
    (Run All before that is a no-op: the menu item is disabled)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        cells = drv.execute_script(
            "return document.querySelectorAll('.jp-Notebook .jp-Cell').length")
        if cells and kernels_idle(port, token):
            return
        time.sleep(0.5)
    raise LabCheckError(f"the notebook's page or its kernel was not ready within {timeout:.0f} s "
                        f"(cells on the page: {cells}; kernels: {api(port, token, '/api/kernels')})")


def stop_lab(proc: subprocess.Popen, port: int, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then terminate, then kill the
    process group this script started."""
    try:
        api(port, token, "/api/shutdown", method="POST")
        proc.wait(timeout=20)
        return
    except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
        pass
    for sig, wait in ((15, 10), (9, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------
def prerequisites() -> tuple[str, str]:
    """(browser, driver) paths; raises MissingPrerequisite naming what is missing, before
    anything is started."""
    try:
        import selenium  # noqa: F401
    except ImportError as exc:
        raise MissingPrerequisite(f"Selenium is not installed in {sys.prefix} ({exc}); "
                                  f"{INSTALL_HINT}") from None
    binary = shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        missing = [n for n, p in (("chromium", binary), ("chromedriver", driver)) if not p]
        raise MissingPrerequisite(f"{' and '.join(missing)} not found on PATH; {INSTALL_HINT}")
    return binary, driver


def browser(width: int, height: int):
    """Headless Chromium driven by the system chromedriver (no download: Selenium Manager is
    not used, so this works offline)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = prerequisites()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def click_menu(drv, menu: str, command: str, timeout: float) -> None:
    """Open the menu-bar entry ``menu`` and click its item bound to ``command`` (JupyterLab 4:
    Run → Run All Cells is ``runmenu:run-all``, File → Save Notebook ``docmanager:save``)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(drv, timeout)
    bar = wait.until(ec.presence_of_all_elements_located(
        (By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")))
    item = next((b for b in bar if b.text.strip() == menu), None)
    if item is None:
        raise LabCheckError(f"no '{menu}' menu in JupyterLab's menu bar "
                            f"({[b.text for b in bar]})")
    item.click()
    selector = f'.lm-Menu-item[data-command="{command}"]:not(.lm-mod-disabled)'
    try:
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, selector))).click()
    except TimeoutException:
        items = drv.execute_script("return [...document.querySelectorAll('.lm-Menu-item')]"
                                   ".map(e => e.dataset.command).filter(c => c)")
        raise LabCheckError(f"the '{menu}' menu has no enabled item {command!r} within "
                            f"{timeout:.0f} s; its items: {items}") from None


PAGE_STATE = """
const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
  .map(p => p.textContent.trim());
const outs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')];
return {
  prompts: prompts,
  figures: document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img').length,
  stderr: outs.filter(o => o.dataset.mimeType === 'application/vnd.jupyter.stderr')
              .map(o => o.textContent),
  status: (document.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}})
            .dataset.status || null,
};
"""


def run_all(drv, port: int, token: str, timeout: float, stable: int = 3) -> dict:
    """Run → Run All Cells, then poll until no prompt shows ``[*]`` and the kernel is idle in
    ``stable`` consecutive polls (1 s apart) after some cell ran. Returns the page state."""
    click_menu(drv, "Run", "runmenu:run-all", 30)
    end, quiet = time.monotonic() + timeout, 0
    while time.monotonic() < end:
        time.sleep(1.0)
        state = drv.execute_script(PAGE_STATE)
        ran = any(re.fullmatch(r"\[\d+\]:", p) for p in state["prompts"])
        running = any("*" in p for p in state["prompts"])
        quiet = quiet + 1 if ran and not running and kernels_idle(port, token) else 0
        if quiet >= stable:
            return state
    raise LabCheckError(f"the notebook was still running after {timeout:.0f} s (--timeout); "
                        f"prompts: {state['prompts']}")


def save(drv, path: Path, timeout: float = 30) -> None:
    """File → Save Notebook, then wait until the file on disk holds execution counts."""
    before = path.stat().st_mtime_ns
    click_menu(drv, "File", "docmanager:save", 30)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.stat().st_mtime_ns != before:
            time.sleep(0.5)                       # let the write finish
            return
        time.sleep(0.5)
    raise LabCheckError(f"JupyterLab did not save {path.name} within {timeout:.0f} s")


def screenshot(drv, out: Path) -> None:
    """Scroll the first figure (else the first stderr output) into view and save the page."""
    drv.execute_script("""
const el = document.querySelector('.jp-Notebook .jp-OutputArea-output img')
  || document.querySelector('.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]');
if (el) el.scrollIntoView({block: 'center'});""")
    time.sleep(0.5)
    atomic_write_bytes(out, drv.get_screenshot_as_png())


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------
def check(args: argparse.Namespace) -> Outcome:
    notebook = args.notebook.resolve()
    if not notebook.is_file() or notebook.suffix != ".ipynb":
        raise LabCheckError(f"{args.notebook} is not a notebook file (.ipynb)")
    prerequisites()
    base = ROOT if notebook.is_relative_to(ROOT) else notebook.parent
    results = (str(args.results_dir.resolve()) if args.results_dir
               else "the notebook's own results_dir (notebooks: ../results/lab, git-ignored)")
    outcome = Outcome(notebook=str(notebook.relative_to(base) if base == ROOT else notebook),
                      results_dir=results)
    with tempfile.TemporaryDirectory(prefix="hmqat-lab-e2e-") as tmp:
        tmp = Path(tmp)
        served, settings = tmp / "tree", tmp / "lab"
        served.mkdir()
        copy = mirror(notebook, base, served)
        prepare(copy, args.results_dir)
        if args.results_dir:
            args.results_dir.mkdir(parents=True, exist_ok=True)
        write_settings(settings)
        port, token = free_port(), secrets.token_hex(16)
        env = {**os.environ, "HMQAT_HEADLESS": "", "JUPYTER_PREFER_ENV_PATH": "1"}
        for var in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR", "HMQAT_CACHE_DIR"):
            if env.get(var):
                env[var] = str(Path(env[var]).expanduser().resolve())
        log = tmp / "jupyterlab.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab",
                 *lab_args(port, token, served, settings, os.getuid())],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        drv = None
        try:
            lab_version = wait_for_lab(proc, port, token, log, args.start_timeout)
            drv = browser(args.width, args.height)
            outcome.versions = (f"JupyterLab {lab_release()}, Jupyter Server {lab_version}, "
                                f"{drv.capabilities.get('browserName')} "
                                f"{drv.capabilities.get('browserVersion')}, "
                                f"Python {platform.python_version()}")
            url_path = "/".join(copy.relative_to(served).parts)
            drv.get(f"http://127.0.0.1:{port}/lab/tree/{url_path}?reset&token={token}")
            wait_ready(drv, port, token, args.start_timeout)
            start = time.monotonic()
            state = run_all(drv, port, token, args.timeout)
            outcome.wall_s = time.monotonic() - start
            save(drv, copy)
            outcome.code_cells, outcome.executed, outcome.errors = saved_errors(copy)
            outcome.figures = state["figures"]
            page_errors = [s for s in state["stderr"] if TRACEBACK.search(s)]
            if outcome.executed < outcome.code_cells:
                outcome.failures.append(f"{outcome.code_cells - outcome.executed} of "
                                        f"{outcome.code_cells} code cells did not run "
                                        f"(Run All stops at the first error)")
            if outcome.errors or page_errors:
                first = (outcome.errors or [page_errors[0].strip().splitlines()[-1]])[0]
                outcome.failures.append(f"{max(len(outcome.errors), len(page_errors))} error "
                                        f"output(s); first: {first}")
            if outcome.figures < 1:
                outcome.failures.append("no figure was rendered (no <img> in any output area)")
            if args.screenshot:
                screenshot(drv, args.screenshot)
        finally:
            if drv is not None:
                drv.quit()
            stop_lab(proc, port, token)
    return outcome


def report(o: Outcome) -> str:
    verdict = "PASS" if not o.failures else "FAIL: " + "; ".join(o.failures)
    return "\n".join([
        "# benchmarks/lab_e2e.py: one notebook run in JupyterLab by headless Chromium "
        "(Run > Run All Cells)",
        f"# {o.versions}; {platform.platform()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"notebook      {o.notebook}",
        f"results_dir   {o.results_dir}",
        f"wall_s        {o.wall_s:.1f}   (Run All clicked -> kernel idle)",
        f"code_cells    {o.code_cells}",
        f"executed      {o.executed}",
        f"figures       {o.figures}   (<img> in output areas)",
        f"errors        {len(o.errors)}" + "".join(f"\n  {e}" for e in o.errors),
        f"verdict       {verdict}",
    ]) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebook", nargs="?", type=Path, default=DEFAULT_NOTEBOOK,
                   help="the .ipynb to run (default notebooks/02_bit_allocation.ipynb: seconds, two "
                        "figures; it reads notebook 00/01 results from results_dir)")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="set the notebook's results_dir (default: its own, ../results/lab)")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds Run All may take (default 1800)")
    p.add_argument("--start-timeout", type=float, default=120,
                   help="seconds JupyterLab may take to start (default 120)")
    p.add_argument("--out", type=Path, default=ROOT / "results/bench/lab_e2e.txt",
                   help="the text report (default results/bench/lab_e2e.txt)")
    p.add_argument("--screenshot", type=Path, default=ROOT / "results/bench/lab_e2e.png",
                   help="the screenshot (default results/bench/lab_e2e.png)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        outcome = check(args)
    except MissingPrerequisite as exc:
        print(f"lab_e2e: cannot run: {exc}", file=sys.stderr)
        return 2
    except LabCheckError as exc:
        print(f"lab_e2e: FAIL: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:            # Selenium / WebDriver: its message, without the stack
        if type(exc).__module__.split(".")[0] != "selenium":
            raise
        msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()
        print(f"lab_e2e: FAIL: the browser: {type(exc).__name__}: "
              f"{msg[0] if msg else '(no message)'}", file=sys.stderr)
        return 1
    text = report(outcome)
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    if outcome.failures:
        print(f"lab_e2e: FAIL: {'; '.join(outcome.failures)} (report: {args.out}, screenshot: "
              f"{args.screenshot})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
