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
	@echo "make reproduce [PROFILE=quick|smoke|paper|imagenet]  set up, then run the study"
	@echo "make test                                            set up, then run the tests"
	@echo "make bench | make lab | make clean | make clean-cache"

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

bench: $(STAMP)
	@for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# The kernels run in notebooks/: resolve the data/weights/cache folders against this folder, as
# `make reproduce` does, so the README's relative `export HMQAT_DATA_DIR=../shared/...` works.
LAB_VARS := HMQAT_DATA_DIR HMQAT_WEIGHTS_DIR HMQAT_CACHE_DIR
LAB_ENV  := $(foreach v,$(LAB_VARS),$(if $($(v)),$(v)=$(abspath $($(v)))))

lab: $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (hmqat)"
	@$(foreach v,$(LAB_VARS),echo "$(v)=$(if $($(v)),$(abspath $($(v))),(unset))";)
	@$(if $(HMQAT_DATA_DIR),,echo "HMQAT_DATA_DIR is unset: notebook 00 downloads CIFAR-10 with torchvision (needs internet)";)
	@echo "lab runs write to results/lab/ (git-ignored)"
	HMQAT_HEADLESS= $(LAB_ENV) $(BIN)/jupyter lab notebooks/

clean:
	rm -rf results/smoke .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

clean-cache:
	rm -rf results/*/cache results/*/checkpoints $${HMQAT_CACHE_DIR:-$$HOME/.cache/hmqat}
