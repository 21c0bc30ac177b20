#!/usr/bin/env bash
# One prepared GPU check, run once on a GPU machine from the repo root:
#   (a) write synthetic 1 mm BIDS sites and fill the fp16 cache once (all cores),
#   (b) local_epoch.py --sweep: neurofed's local epoch on the plain-step anchor variants with resident scans
#       (+ plain-loop pairs, and bf16+cl b8 streamed through loader workers for comparison), then a sync
#       audit: how often a training step makes the host wait for the GPU, by source line,
#   (c) federated_gpu.py: a two-site bf16 federation on the one GPU (resident scans), 3 rounds, then the test
#       table.
# Why one script: device time is scarce, so every step has its own `timeout`, a failing step does not stop
# the next, and the whole run stays under 7.5 minutes (step caps: 60 + 210 + 150 s, plus installing wheels;
# measured on an H100 before resident scans existed: 47 + 124 s for the first two).
# The log goes to $OUT/gpu_check.log; the data stays under /tmp (it must not travel back with $OUT).
#
# GPU machine (needs .whl/ from `bash ../shared/gpu/wheels.sh`):   bash benchmarks/gpu_check.sh
# Here, on CPU, with tiny sizes and nilearn/wandb made unimportable: bash benchmarks/gpu_check.sh --cpu-smoke

SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1

if [ "$SMOKE" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
  nvidia-smi -L
  PY=python3
  DATA=/tmp/neurofed-gpu-check
  LOCAL=(--device cuda --size 160 192 160 --volumes 64 --subjects 256 --num-workers 8)
  FED=(--device cuda --size 160 192 160 --volumes 48 --subjects 96 --num-workers 6 --rounds 3)
  SWEEP=(--sweep --epochs 2 --sync-audit)
else
  PY=${PYTHON:-.venv/bin/python}
  OUT=${OUT:-/tmp/neurofed-gpu-check-smoke-out}
  DATA=/tmp/neurofed-gpu-check-smoke
  # The GPU image has neither nilearn nor wandb: make both unimportable here too.
  BLOCK=$(mktemp -d)
  for m in nilearn wandb; do
    mkdir -p "$BLOCK/$m" && echo "raise ImportError('$m is not on the GPU machine')" > "$BLOCK/$m/__init__.py"
  done
  export PYTHONPATH=$BLOCK:$PWD/src
  LOCAL=(--device cpu --size 32 32 32 --width 0.125 --volumes 4 --subjects 24 --num-workers 1)
  FED=(--device cpu --size 32 32 32 --width 0.125 --volumes 4 --subjects 12 --num-workers 0 --rounds 2 --resident)
  SWEEP=(--epochs 1 --sync-audit)
fi

mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
set -o pipefail

STATUS=()
step() {  # step NAME CAP_SECONDS COMMAND...: run with a timeout, time it, record the outcome, never abort
  local name=$1 cap=$2 t0=$SECONDS rc
  shift 2
  echo
  echo "=== $name (cap ${cap}s) ==="
  timeout -k 10 "$cap" "$@"
  rc=$?
  local note="ok"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="TIMED OUT"
  [ "$rc" != 0 ] && [ "$note" = ok ] && note="FAILED (exit $rc)"
  STATUS+=("$(printf '%-28s %5ss  %s' "$name" "$((SECONDS - t0))" "$note")")
  echo "=== $name: $note after $((SECONDS - t0)) s ==="
}

main() {
  local start=$SECONDS
  echo "neurofed GPU check: $(date -u +%FT%TZ), $(nproc) cores, smoke=$SMOKE"
  $PY -c "
import importlib, torch, lightning
def importable(m):
    try:
        importlib.import_module(m)
        return True
    except ImportError:
        return False
print('torch', torch.__version__, '| lightning', lightning.__version__, '| cuda', torch.cuda.is_available(),
      '| not needed, importable:', {m: importable(m) for m in ('nilearn', 'wandb')})"

  step "a: synthetic data + cache" 60 bash -c "
    $PY benchmarks/local_epoch.py --prepare-only --data-dir $DATA/local ${LOCAL[*]} &&
    $PY benchmarks/federated_gpu.py --prepare-only --data-dir $DATA/fed ${FED[*]}"
  step "b: local epoch sweep" 210 $PY benchmarks/local_epoch.py --data-dir "$DATA/local" "${LOCAL[@]}" "${SWEEP[@]}"
  step "c: two-site federation" 150 $PY benchmarks/federated_gpu.py --data-dir "$DATA/fed" "${FED[@]}" --timeout 140

  echo
  echo "=== summary ($((SECONDS - start)) s in steps) ==="
  printf '%s\n' "${STATUS[@]}"
}

main 2>&1 | tee "$OUT/gpu_check.log"
