"""Test-wide settings: headless, no data/weights from ../shared, an isolated cache dir."""
import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["HMQAT_HEADLESS"] = "1"
# also for module-scoped fixtures (the smoke pipeline), which run before _isolated_env
for _key in ("HMQAT_DATA_DIR", "HMQAT_WEIGHTS_DIR"):
    os.environ.pop(_key, None)
# Under pytest-xdist (`make test`: one worker per core) each worker gets its share of the cores,
# so workers do not oversubscribe them; the env var reaches the notebook kernels papermill starts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Tests use synthetic data only: never the developer's HMQAT_DATA_DIR/WEIGHTS_DIR."""
    monkeypatch.delenv("HMQAT_DATA_DIR", raising=False)
    monkeypatch.delenv("HMQAT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hmqat-cache"))


#: Test files whose module fixtures run the notebooks end to end (minutes each, not seconds).
#: Under `make test` (pytest-xdist, --dist loadfile: a file stays on one worker) they are
#: scheduled first, so the other worker fills in around them instead of one of them starting
#: last and leaving a core idle at the end.
HEAVY_FIRST = ("test_pipeline.py", "test_models_profile.py", "test_walk_study.py",
               "test_hostile_pipeline.py",
               "test_benchmarks.py", "test_solutions.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order kept
