#!/usr/bin/env bash
# GPU check (issue 8): does hmqat run on CUDA, and how fast? Under 8 minutes on one GPU
# (time limits per step: 180 + 60 + 120 + 90 s).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; PY=... to pick python
#
# Steps (each under its own time limit; a failing step does not hide the others, but the
# script exits non-zero if any failed, and at once if there is no CUDA device):
#   1. versions: torch, CUDA, cuDNN, NCCL, the GPUs
#   2. the smoke profile pipeline (papermill, synthetic data) with device=cuda
#   3. torchrun: QAT through `-m hmqat.study.cli` with NCCL, one process per GPU (up to 8;
#      SyncBN when there are 2 or more)
#   4. benchmarks/qat_step.py (QAT/FP32 step time and step memory on the GPU) and
#      benchmarks/hessian_traces.py (synthetic ResNet-20 traces vs the PyHessian-style
#      reference) with --device cuda
# Everything printed also goes to results/bench/gpu_check.txt.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=results/bench/gpu_check.txt
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hmqat-gpu-check.XXXXXX")
mkdir -p "$(dirname "$OUT")"
exec > >(tee "$OUT") 2>&1
trap 'rm -rf "$WORK"' EXIT
export HMQAT_HEADLESS=1 TQDM_MININTERVAL=30 PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8

echo "# hmqat GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - <<'EOF' || { echo "FATAL: no usable CUDA device; this check needs a GPU machine" >&2; exit 2; }
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit("torch.cuda.is_available() is False")
print(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
x = torch.randn(1024, 1024, device="cuda")
torch.cuda.synchronize()
print(f"matmul on cuda ok: {float((x @ x).norm()):.3e}")
EOF
NGPU=$("$PY" -c "import torch; print(min(torch.cuda.device_count(), 8))")

FAILED=()
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    if timeout --kill-after=10 "$limit" "$@"; then
        echo "== $name: PASS in $((SECONDS - t0)) s"
    else
        echo "== $name: FAIL (exit $?) after $((SECONDS - t0)) s"
        FAILED+=("$name")
    fi
}

# 2. smoke profile on cuda: params/smoke.yaml with device: cuda, results in $WORK
"$PY" - "$WORK" <<'EOF'
import sys, yaml
p = yaml.safe_load(open("params/smoke.yaml"))
p["common"]["device"] = "cuda"
yaml.safe_dump(p, open(f"{sys.argv[1]}/smoke.yaml", "w"))
EOF
step "smoke pipeline (device=cuda)" 180 "$PY" -c "
from pathlib import Path
from hmqat.study import pipeline
steps = pipeline.run_pipeline('smoke', params_dir=Path('$WORK'), results_root=Path('$WORK/results'))
print({k: v.get('wall_s') for k, v in steps.items()})"

# 3. torchrun + NCCL through the command line (synthetic data, 2 steps)
SYNC=""
[ "$NGPU" -ge 2 ] && SYNC="--sync-bn"
step "torchrun qat, $NGPU GPU(s), NCCL $SYNC" 60 "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node="$NGPU" -m hmqat.study.cli qat --profile smoke --device auto \
    --uniform 4 --epochs 1 --max-steps 2 --batch-size $((32 * NGPU)) $SYNC \
    --run-dir "$WORK/ddp/qat"

# 4. benchmarks on cuda (synthetic inputs; their own tables are printed below each step)
# (--no-compile: the default eager backend only; compiling Triton kernels for every tensor shape
# could eat the time limit. `python benchmarks/qat_step.py --device cuda` alone times both.)
step "benchmarks/qat_step.py --device cuda" 120 "$PY" benchmarks/qat_step.py --device cuda \
    --no-compile --reps 20 --warmup 3 --out "$WORK/qat_step.txt"
step "benchmarks/hessian_traces.py --device cuda" 90 env -u HMQAT_DATA_DIR "$PY" \
    benchmarks/hessian_traces.py --device cuda --ref-probes 3 --lever-samples 0 \
    --out "$WORK/hessian_traces.txt"

echo
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "# GPU check FAILED: ${FAILED[*]}"
    exit 1
fi
echo "# GPU check passed ($SECONDS s); output in $OUT"
