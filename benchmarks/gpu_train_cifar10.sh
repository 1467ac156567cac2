#!/usr/bin/env bash
# Train the registered `cifar10` model on one GPU, export it, and collect the results.
#
# Run from the repository root on a machine with PyTorch + CUDA:
#
#     bash benchmarks/gpu_train_cifar10.sh                 # the full recipe (24 epochs) on cuda
#     bash benchmarks/gpu_train_cifar10.sh --device cpu --epochs 1 --set limit=2000   # quick check
#
# Extra arguments go to train/train.py. Environment:
#   ARCHIVE  the CIFAR-10 JPEG archive (default data/cifar10_jpg.tar.gz, i.e. a copy of
#            ../shared/data/cifar10/cifar10_jpg.tar.gz in the git-ignored data/ folder)
#   DATA     where to unpack it (default /tmp/data/cifar10)
#   OUT      where the results go (default ./gpu_out): runs/cifar10/ (checkpoint, report,
#            figures, train.log), exported/cifar10.onnx and exported/cifar10/ (figures, report)
#   DEVICE   default cuda (overridden by a --device argument)
# Training needs torch, numpy, Pillow, matplotlib; the export also onnx, onnxscript and
# onnxruntime. Without the export packages the checkpoint is still collected: export it
# elsewhere with  python train/export.py --model cifar10 --checkpoint OUT/runs/cifar10/checkpoint.pt
set -euo pipefail

ARCHIVE=${ARCHIVE:-data/cifar10_jpg.tar.gz}
DATA=${DATA:-/tmp/data/cifar10}
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
RUN=runs/cifar10
prev=""
for a in "$@"; do [ "$prev" = "--out" ] && RUN=$a; prev=$a; done  # a caller's --out wins, as in train.py
EXPORTED=${EXPORTED:-exported}
[[ " $* " == *" --device "* ]] && DEVICE=""  # the caller chose

[ -f train/train.py ] || { echo "gpu_train_cifar10: run me from the repository root" >&2; exit 2; }
t0=$(date +%s)

# --- what this machine has --------------------------------------------------------------
"$PY" - "$DEVICE" <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "PIL", "matplotlib") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_train_cifar10: missing Python packages for training: {', '.join(missing)}")
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_train_cifar10: no CUDA device; pass --device cpu for a CPU run")
EOF
EXPORT_OK=1
"$PY" -c "import onnx, onnxscript, onnxruntime" 2>/dev/null || {
  EXPORT_OK=0
  echo "gpu_train_cifar10: onnx/onnxscript/onnxruntime missing here: will train and collect the checkpoint only" >&2
}

# --- data -------------------------------------------------------------------------------
if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
  [ -f "$ARCHIVE" ] || { echo "gpu_train_cifar10: $ARCHIVE not found (copy ../shared/data/cifar10/cifar10_jpg.tar.gz there)" >&2; exit 2; }
  mkdir -p "$DATA"
  tar xzf "$ARCHIVE" -C "$DATA"
fi
echo "data: $DATA ($(find "$DATA/train" -name '*.jpg' | wc -l) train, $(find "$DATA/test" -name '*.jpg' | wc -l) test images)"
[ -f "$ARCHIVE" ] && sha256sum "$ARCHIVE"

# --- train ------------------------------------------------------------------------------
mkdir -p "$OUT/runs" "$OUT/exported"
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS
threads=$(nproc)
args=(--model cifar10 --out "$RUN" --force --set "root=$DATA" --set "decode_threads=$threads")
[ -f "$ARCHIVE" ] && args+=(--set "archive=$ARCHIVE")
[ -n "$DEVICE" ] && args+=(--device "$DEVICE")
echo "+ $PY train/train.py ${args[*]} $*"
"$PY" train/train.py "${args[@]}" "$@" 2>&1 | tee "$OUT/train.log"
mkdir -p "$OUT/runs/cifar10"
cp -r "$RUN"/. "$OUT/runs/cifar10/"
cp "$OUT/train.log" "$OUT/runs/cifar10/train.log"

# --- export -----------------------------------------------------------------------------
if [ "$EXPORT_OK" = 1 ]; then
  "$PY" train/export.py --model cifar10 --checkpoint "$RUN/checkpoint.pt" --out "$EXPORTED" --force 2>&1 | tee "$OUT/export.log"
  cp "$EXPORTED/cifar10.onnx" "$OUT/exported/"
  cp -r "$EXPORTED/cifar10" "$OUT/exported/"
fi
"$PY" - "$RUN/report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["metrics"]["test"]
print(f"cifar10 test accuracy {t['accuracy']:.4f} (n={t.get('n', '?')}), macro-F1 {t['f1']:.4f}, top-3 {t.get('top3_accuracy', float('nan')):.4f}, "
      f"best epoch {r['best_epoch']}, {r['train_seconds']:.0f} s on {r['device']}")
EOF
echo "gpu_train_cifar10: done in $(( $(date +%s) - t0 )) s; results in $OUT/"
