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


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Tests use synthetic data only: never the developer's HMQAT_DATA_DIR/WEIGHTS_DIR."""
    monkeypatch.delenv("HMQAT_DATA_DIR", raising=False)
    monkeypatch.delenv("HMQAT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HMQAT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "hmqat-cache"))
