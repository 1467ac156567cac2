#!/usr/bin/env bash
# Train every registered HiTS model on one GPU: same data, same recipe (train/models/hits.py), seed 0.
#
#   OUT=/path/for/results bash benchmarks/gpu_train_hits.sh                   # H100 box: at most 8 min
#   QUICK=1 DEVICE=cpu OUT=/tmp/hits_out bash benchmarks/gpu_train_hits.sh    # CPU smoke test: ~2 min here
#
# 1. simulates the data once (train 500k, validation 20k, test 100k; all CPUs) into a cache
#    (`python -m train.data.hits --cache DIR`);
# 2. trains three chains of models at once on the same GPU: Deep-HiTS (`hits-deep`, the
#    slow one); hits, hits-tiny, hits-fullres; hits-seed-pytorch, hits-seed-keras. The small
#    models cannot keep an H100 busy alone (launch- and Python-bound), so the chains overlap
#    and finish minutes sooner; no result changes;
# 3. copies runs/<model>/{checkpoint.pt,report.json,*.png} to $OUT/runs/<model>/ as soon
#    as a model is done, so a run cut off by a time limit keeps the finished models.
#
# Each model gets `python train/train.py --model NAME --device $DEVICE --seed 0
# --set cache=... --set real_sn=none --threads N` (the real-SN extra test is off: its
# single-class metrics hold a NaN ROC AUC that the card cannot store; real-SN recall
# comes from train/evaluate_hits.py instead).
#
# Environment: OUT (required), DEVICE (cuda), QUICK (0; 1: 3k training stamps, 1 epoch),
# BUDGET_S (480: no model starts or keeps running past this many seconds from the start),
# CHAINS (chains separated by ';', models in a chain by spaces), PYTHON (python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."

# everything inside functions: bash parses the file whole before running, so editing or
# pulling it during a run cannot change what runs
train_one() {  # model -> trains, copies to $OUT, appends to summary
  local model=$1 t0 left rc
  t0=$(date +%s)
  left=$(( DEADLINE - t0 ))
  if (( left < 30 )); then
    echo "SKIP $model: ${left}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/summary.txt"
    return 1
  fi
  set +e
  timeout --signal=TERM "$left" "$PYTHON" train/train.py --model "$model" --device "$DEVICE" --seed 0 \
    --out "runs/$model" --force --threads "$THREADS" "${SIZE_ARGS[@]}" \
    --set cache="$CACHE" --set real_sn=none > "$OUT/logs/$model.log" 2>&1
  rc=$?
  set -e
  if (( rc == 0 )); then
    mkdir -p "$OUT/runs/$model"
    cp "runs/$model/checkpoint.pt" "runs/$model/report.json" "runs/$model/"*.png "$OUT/runs/$model/"
    echo "OK   $model in $(( $(date +%s) - t0 ))s: $(grep '\[train\] test:' "$OUT/logs/$model.log" | tail -1)" \
      | tee -a "$OUT/summary.txt"
  else
    echo "FAIL $model (exit $rc) after $(( $(date +%s) - t0 ))s; last lines of logs/$model.log:" | tee -a "$OUT/summary.txt"
    tail -n 5 "$OUT/logs/$model.log" | tee -a "$OUT/summary.txt"
  fi
  return $rc
}

chain() {  # models... -> trains them in order; exit 1 if any failed
  local status=0 model
  for model in "$@"; do
    train_one "$model" || status=1
  done
  return $status
}

main() {
  : "${OUT:?set OUT to a folder for the results}"
  DEVICE=${DEVICE:-cuda}
  QUICK=${QUICK:-0}
  PYTHON=${PYTHON:-$(command -v python || command -v python3)}
  BUDGET_S=${BUDGET_S:-480}
  CHAINS=${CHAINS:-"hits-deep;hits hits-tiny hits-fullres;hits-seed-pytorch hits-seed-keras"}
  local -a chains
  IFS=';' read -r -a chains <<< "$CHAINS"
  SIZE_ARGS=()
  if [[ "$QUICK" == 1 ]]; then
    SIZE_ARGS=(--epochs 1 --set n_train=3000 --set n_val=1000 --set n_test=1000)
  fi
  CACHE=${CACHE:-${TMPDIR:-/tmp}/stampclf_hits_cache_$$}
  local cpus
  cpus=$(nproc)
  THREADS=$(( cpus / ${#chains[@]} > 1 ? cpus / ${#chains[@]} : 1 ))  # the trainings share the CPUs
  export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS
  export PYTHONUNBUFFERED=1
  START=$(date +%s)
  DEADLINE=$(( START + BUDGET_S ))
  mkdir -p "$OUT/runs" "$OUT/logs"
  {
    echo "gpu_train_hits.sh: device $DEVICE, quick $QUICK, budget ${BUDGET_S}s, size args: ${SIZE_ARGS[*]:-recipe defaults}"
    echo "chains: $CHAINS"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown), $(git status --porcelain 2>/dev/null | wc -l) changed files"
    "$PYTHON" -c "import torch, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
    echo "cpus: $cpus, threads per training: $THREADS"
  } 2>&1 | tee "$OUT/summary.txt"

  # 1. the data, once (the loader simulates in all CPUs and writes the cache)
  local t0
  t0=$(date +%s)
  if "$PYTHON" -m train.data.hits --cache "$CACHE" --seed 0 "${SIZE_ARGS[@]}" > "$OUT/logs/data.log" 2>&1
  then
    echo "data: $(tail -n 1 "$OUT/logs/data.log") in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt"
  else  # each training then simulates for itself: slower, same data
    echo "data step failed (see logs/data.log); the trainings simulate on their own" | tee -a "$OUT/summary.txt"
  fi

  # 2. the chains, at once, on the same GPU
  local status=0 c pid
  local -a pids=()
  for c in "${chains[@]}"; do
    # shellcheck disable=SC2086 - a chain is a space-separated list of models
    chain $c &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || status=1
  done
  rm -rf "$CACHE"
  echo "total $(( $(date +%s) - START ))s, exit $status" | tee -a "$OUT/summary.txt"
  return $status
}

main "$@"
