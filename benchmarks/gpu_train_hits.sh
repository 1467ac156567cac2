#!/usr/bin/env bash
# Train every registered HiTS model on one GPU, same data, same recipe, seed 0.
#
#   OUT=/path/for/results bash benchmarks/gpu_train_hits.sh              # GPU box: ~6-8 min
#   QUICK=1 DEVICE=cpu OUT=/tmp/hits_out bash benchmarks/gpu_train_hits.sh   # smoke test on CPU: ~3 min
#
# Writes $OUT/runs/<model>/{checkpoint.pt,report.json,*.png}, $OUT/logs/<model>.log and
# $OUT/summary.txt. Each model is copied to $OUT as soon as it finishes, so a run cut off
# by a time limit still returns the models done so far. The simulated data are made once
# (16 processes) and cached for the following models (--set cache=...). The real-SN extra
# test is off (real_sn=none): its single-class metrics hold a NaN ROC AUC, which the card
# cannot store; train/evaluate_hits.py reports real-SN recall instead.
#
# Environment: OUT (required), DEVICE (cuda), QUICK (0), BUDGET_S (seconds for the whole
# script, default 540: models that cannot start with >= 45 s left are skipped),
# N_TRAIN/N_VAL/N_TEST/EPOCHS (override the sizes below), MODELS (space-separated list),
# PYTHON (python).
set -euo pipefail
cd "$(dirname "$0")/.."

# everything inside a function: bash parses it whole before running, so editing or pulling
# the file during a run cannot change what runs
main() {
: "${OUT:?set OUT to a folder for the results}"
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-540}
# order: the shipped candidate first, the most expensive (Deep-HiTS) last
MODELS=${MODELS:-"hits hits-tiny hits-seed-pytorch hits-seed-keras hits-deep"}
if [[ "$QUICK" == 1 ]]; then
  N_TRAIN=${N_TRAIN:-3000} N_VAL=${N_VAL:-1000} N_TEST=${N_TEST:-1000} EPOCHS=${EPOCHS:-1}
else
  N_TRAIN=${N_TRAIN:-400000} N_VAL=${N_VAL:-20000} N_TEST=${N_TEST:-100000} EPOCHS=${EPOCHS:-10}
fi
CACHE=${CACHE:-${TMPDIR:-/tmp}/stampclf_hits_cache_$$}
# deterministic cuBLAS (train.py asks torch for deterministic algorithms)
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONUNBUFFERED=1

mkdir -p "$OUT/runs" "$OUT/logs"
start=$(date +%s)
{
  echo "gpu_train_hits.sh: device $DEVICE, quick $QUICK, n_train $N_TRAIN, n_val $N_VAL, n_test $N_TEST, epochs $EPOCHS"
  echo "models: $MODELS"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  "$PYTHON" -c "import torch, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "cpus: $(nproc)"
} 2>&1 | tee "$OUT/summary.txt"

status=0
for model in $MODELS; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( left < 45 )); then
    echo "SKIP $model: only ${left}s of the ${BUDGET_S}s budget left" | tee -a "$OUT/summary.txt"
    status=1
    continue
  fi
  t0=$(date +%s)
  set +e
  timeout --signal=TERM "$left" "$PYTHON" train/train.py --model "$model" --device "$DEVICE" --seed 0 \
    --epochs "$EPOCHS" --out "runs/$model" \
    --set n_train="$N_TRAIN" --set n_val="$N_VAL" --set n_test="$N_TEST" --set cache="$CACHE" --set real_sn=none \
    > "$OUT/logs/$model.log" 2>&1
  rc=$?
  set -e
  tail -n 3 "$OUT/logs/$model.log"
  if (( rc == 0 )); then
    mkdir -p "$OUT/runs/$model"
    cp "runs/$model/checkpoint.pt" "runs/$model/report.json" "runs/$model/"*.png "$OUT/runs/$model/"
    echo "OK   $model in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  else
    echo "FAIL $model (exit $rc) after $(( $(date +%s) - t0 ))s: see logs/$model.log" | tee -a "$OUT/summary.txt"
    status=1
  fi
done
rm -rf "$CACHE"
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
return $status
}

main "$@"
