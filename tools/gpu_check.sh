#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU, in one run of under 5 minutes on one H100/H200, one JSON out.
#   1. env: nvidia-smi, torch/CUDA versions
#   2. build: the extension for the local GPU's architecture (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST from the device)
#   3. pytest: the CUDA-parametrised and GPU-marked tests (they skip on a CPU machine)
#   4. ops: tools/gpu_check_ops.py, every op vs float64 and the CPU kernel at Qwen3-4B shapes + timings
#   5. bench_step: `pgrpo bench step --model qwen3-4b-shape` (generation today/batched/compile, loss pass, ops)
#   6. train: tools/gpu_check_train.py, 2 steps of jobs/full-projected.yaml on the random 4B-shape model with the
#      real grader
#   7. bench_compile: generation with rollout.compile (today / batched / compile), if >= 60 s of the budget are left
#   then tools/gpu_check_collect.py writes $OUT/gpu_check.json (every stage's rc, time and results; "fails").
# Run from the repository root. Env: PY (default python3), OUT (default ./gpu_check_out), BUDGET (seconds, 290),
# SKIP_BUILD=1, GPU_CHECK_DRY=1 (the CPU dry mode CI runs: no build, no pytest, every python stage on small
# shapes on the CPU; it proves the script itself works, not the GPU).
set -uo pipefail
PY=${PY:-python3}
export OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=${GPU_CHECK_DRY:-0}
export GPU_CHECK_DRY=$DRY
BUDGET=${BUDGET:-290}
T0=$(date +%s)
: > "$OUT/stages.tsv"
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# stage NAME MAX_SECONDS CMD...: run with a timeout cut to what is left of the budget, log to $OUT/NAME.txt
stage() {
  local name=$1 max=$2 l; shift 2
  l=$(left); [ "$l" -lt 10 ] && l=10; [ "$max" -lt "$l" ] && l=$max
  log "$name (timeout ${l}s)"
  local t=$(date +%s)
  timeout "$l" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t ))" >> "$OUT/stages.tsv"
  grep -v -E "Warning|warn\(" "$OUT/$name.txt" | tail -n 14
  log "$name rc=$rc"
  return $rc
}

if [ "$DRY" != 1 ]; then
  if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU is visible to $PY; on a CPU machine run the dry mode: make gpu-check-dry" >&2
    exit 2
  fi
  stage env 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'"
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    stage build 150 env PATH="$CUDA_HOME/bin:$PATH" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) \
      $PY setup.py build_ext --inplace || { $PY tools/gpu_check_collect.py; exit 1; }
  fi
  $PY -c "
import sys, torch, pgrpo.ops as o
ok = o.HAVE_EXTENSION and all(torch._C._dispatch_has_kernel_for_dispatch_key(f'pgrpo::{op}', 'CUDA')
                               for op in ('basis_change', 'project_', 'svd_grad_project'))
print('extension:', o.HAVE_EXTENSION, o._EXT_MISSING_WHY, '| CUDA kernels registered:', ok); sys.exit(0 if ok else 1)" \
    || { echo "ext 1 0" >> "$OUT/stages.tsv"; $PY tools/gpu_check_collect.py; exit 1; }
  stage pytest 75 $PY -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_adapter.py \
    tests/test_logprobs.py tests/test_train.py -k "cuda or gpu or GPU or test_ops"
  stage ops 80 $PY tools/gpu_check_ops.py
  stage bench_step 90 $PY -m pgrpo bench step --model qwen3-4b-shape --groups 12 --group-size 6 \
    --old-groups-per-call 4 --prompt-len 512 --new-tokens 96 --no-compile --json "$OUT/bench_step.json"
  stage train 100 $PY tools/gpu_check_train.py
  # torch.compile of a 4B decode step takes a minute or more: last, with whatever the budget has left
  if [ "$(left)" -ge 60 ]; then
    stage bench_compile 200 $PY -m pgrpo bench step --model qwen3-4b-shape --groups 12 --group-size 6 \
      --old-groups-per-call 4 --prompt-len 512 --new-tokens 96 --sections gen --json "$OUT/bench_compile.json"
  else
    log "bench_compile skipped: $(left)s of the budget left"
  fi
else
  stage ops 120 $PY tools/gpu_check_ops.py
  stage bench_step 120 $PY -m pgrpo bench step --model qwen3-4b-shape --scale 16 --groups 2 --group-size 2 \
    --old-groups-per-call 1 --prompt-len 16 --new-tokens 4 --no-compile --json "$OUT/bench_step.json"
  stage train 120 $PY tools/gpu_check_train.py
  stage bench_compile 120 $PY -m pgrpo bench step --model qwen3-4b-shape --scale 16 --groups 2 --group-size 2 \
    --old-groups-per-call 1 --prompt-len 16 --new-tokens 4 --sections gen --compile-backend eager \
    --json "$OUT/bench_compile.json"
fi
$PY tools/gpu_check_collect.py
rc=$?
log "done: $OUT/gpu_check.json (rc=$rc)"
exit $rc
