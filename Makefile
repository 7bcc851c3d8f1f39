# hmqat: the two set-up commands are `make reproduce` and `make test`; both create .venv if needed.
PY      ?= python3
VENV    ?= .venv
PROFILE ?= quick
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.hmqat-installed

# Headless runs: plain-text progress every 30 s, deterministic hashing, the venv's kernels first.
export HMQAT_HEADLESS ?= 1
export TQDM_MININTERVAL ?= 30
export PYTHONHASHSEED ?= 0
export JUPYTER_PREFER_ENV_PATH ?= 1
export CUBLAS_WORKSPACE_CONFIG ?= :4096:8
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine, spinning threads of
# two torch processes stalled Hessian-vector products from 16/s to 2/s; passive gave 24/s.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup reproduce test bench lab clean clean-cache help

help:
	@echo "make reproduce [PROFILE=quick|extended|models|lab|smoke|paper|imagenet]  set up, run the study"
	@echo "make test                                            set up, then run the tests"
	@echo "make lab [LAB_ARGS=\"--port 8890 --no-browser\"]        JupyterLab on notebooks/ (adds --allow-root as root)"
	@echo "make bench | make clean | make clean-cache"

# Idempotent set-up: reinstalls only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m hmqat.study.pipeline --profile $(PROFILE)

# One pytest worker per core (pytest-xdist); each test file stays on one worker (module fixtures).
test: $(STAMP)
	TQDM_DISABLE=1 $(BIN)/python -m pytest -q -n auto --dist loadfile tests

# Every speed benchmark; benchmarks/lab_e2e.py is a browser check of `make lab` (needs Chromium), not
# a benchmark, so it is left out (README, "Check the lab in a browser").
BENCHES := $(filter-out benchmarks/lab_e2e.py,$(wildcard benchmarks/*.py))

bench: $(STAMP)
	@for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The kernels run in notebooks/: resolve the data/weights/cache folders against this folder (the
# repository root; `~/` is expanded), as `make reproduce` does, so a relative path set in the shell
# that runs `make` keeps working. LAB_ARGS go to `jupyter lab` (e.g. LAB_ARGS="--port 8890
# --no-browser"); as root (containers, cloud VMs) jupyter refuses to start without --allow-root,
# so it is added unless LAB_ARGS has it. LAB_UID is the user id that decides it (tests set it).
LAB_VARS := HMQAT_DATA_DIR HMQAT_WEIGHTS_DIR HMQAT_CACHE_DIR
LAB_ENV  := $(foreach v,$(LAB_VARS),$(if $($(v)),$(v)=$(abspath $(patsubst ~/%,$(HOME)/%,$($(v))))))
LAB_ARGS ?=
LAB_UID  := $(shell id -u 2>/dev/null)
LAB_ROOT := $(if $(filter 0,$(LAB_UID)),$(if $(filter --allow-root,$(LAB_ARGS)),,--allow-root))

lab: $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (hmqat)"
	@$(foreach v,$(LAB_VARS),echo "$(v)=$(if $($(v)),$(abspath $(patsubst ~/%,$(HOME)/%,$($(v)))),(unset))";)
	@$(if $(HMQAT_DATA_DIR),,echo "HMQAT_DATA_DIR is unset: notebook 00 downloads CIFAR-10 with torchvision (needs internet)";)
	@$(if $(LAB_ROOT),echo "running as root: adding --allow-root (jupyter refuses root without it)";)
	@echo "lab runs write to results/lab/ (git-ignored)"
	HMQAT_HEADLESS= $(LAB_ENV) $(BIN)/jupyter lab notebooks/ $(LAB_ROOT) $(LAB_ARGS)

clean:
	rm -rf results/smoke .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-cache:
	rm -rf results/*/cache results/*/checkpoints $${HMQAT_CACHE_DIR:-$$HOME/.cache/hmqat}
