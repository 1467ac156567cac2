#!/usr/bin/env bash
# GPU benchmark of stampclf's CUDA path (IOBinding, CUDA graphs, fp16 check, end to end).
#
# On the lent GPU machine, from the repo root:
#   OUT=$OUT bash benchmarks/gpu.sh [gpu_bench.py options, e.g. --quick --n-file 1000000]
# Writes $OUT/gpu_bench.json (every figure, as soon as measured) and $OUT/gpu_bench.log.
#
# That machine's image has a plain `onnxruntime` (no CUDA provider). If CUDA is missing,
# this script installs onnxruntime-gpu into $SITE (default /tmp/stampclf_site, put first on
# PYTHONPATH: the image's own onnxruntime is left alone, never both in one folder) from a
# wheel carried in parts (the wheel is ~256 MB, a call carries at most 64 MiB):
#   data/wheels/ortgpu.part* (joined in name order) + data/wheels/ortgpu.sha256 (cp312), or
#   data/wheels/cp3XX/<wheel>.part-aa .. + <wheel>.sha256               (any python)
# and onnxconverter-common (fp16) from data/wheels/onnxconverter_common-*.whl when missing.
# Parts carried in earlier calls stay on the machine while it is warm. A gzipped py-spy at
# data/tools/py-spy.gz, when carried, profiles one end-to-end run (per thread). INSTALL_ONLY=1: stop
# after the install (a short check); FORCE_INSTALL=1: install even if CUDA is importable. The CUDA/cuDNN
# libraries come from the image's NVIDIA pip packages (onnxruntime.preload_dlls()).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_bench_out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/stampclf_site}
mkdir -p "$OUT" "$SITE"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
echo "gpu.sh: python $pyver ($("$PY" -c 'import sys; print(sys.executable)')), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

has_cuda() {
  "$PY" -c "import onnxruntime as o, sys; sys.exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" 2>/dev/null
}

install_wheel() {  # $1: sha256 file naming the wheel; $2...: its parts, in order
  local sha=$1; shift
  local name; name=$(awk '{print $2}' "$sha")
  if [[ "$name" != *"-cp$pyver-"* ]]; then
    echo "gpu.sh: $name is not for this python (cp$pyver); skipping it"; return 1
  fi
  echo "gpu.sh: joining $# part(s) into /tmp/$name"
  cat "$@" > "/tmp/$name"
  if [[ $(awk '{print $1}' "$sha") != $(sha256sum "/tmp/$name" | awk '{print $1}') ]]; then
    echo "gpu.sh: checksum mismatch for $name: a part is missing or damaged"; rm -f "/tmp/$name"; return 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "/tmp/$name"
  rm -f "/tmp/$name"
}

if has_cuda && [[ ${FORCE_INSTALL:-0} != 1 ]]; then
  echo "gpu.sh: onnxruntime with CUDA provider already importable"
else
  done_install=0
  if [[ -f data/wheels/ortgpu.sha256 ]] && compgen -G "data/wheels/ortgpu.part*" >/dev/null; then
    install_wheel data/wheels/ortgpu.sha256 $(ls data/wheels/ortgpu.part* | sort) && done_install=1
  fi
  if [[ $done_install == 0 ]] && compgen -G "data/wheels/cp$pyver/*.sha256" >/dev/null; then
    sha=$(ls data/wheels/cp$pyver/*.sha256 | head -1)
    install_wheel "$sha" $(ls "${sha%.sha256}".part-* | sort) && done_install=1
  fi
  if ! has_cuda; then
    echo "gpu.sh: no onnxruntime with a CUDA provider (carry the wheel parts under data/wheels/, see above)" >&2
    exit 3
  fi
fi
if ! "$PY" -c "import onnxconverter_common" 2>/dev/null && compgen -G "data/wheels/onnxconverter_common-*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" data/wheels/onnxconverter_common-*.whl
fi
"$PY" -c "import onnxruntime as o; print('gpu.sh: onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[[ ${INSTALL_ONLY:-0} == 1 ]] && exit 0

set -o pipefail
spy=()
if [[ -f data/tools/py-spy.gz ]]; then  # optional: a per-thread profile of one end-to-end run
  gunzip -c data/tools/py-spy.gz > /tmp/py-spy && chmod +x /tmp/py-spy && spy=(--py-spy /tmp/py-spy)
fi
"$PY" benchmarks/gpu_bench.py --out "$OUT" --workdir "${WORKDIR:-/tmp/stampclf_bench}" "${spy[@]}" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
# the user-facing command on this GPU
"$PY" -m stampclf bench --device cuda --n 500000 2>&1 | tee -a "$OUT/gpu_bench.log" || true
# the CUDA-path tests, which skip without a GPU, run here for real
"$PY" -m pytest -q -p no:cacheprovider tests/test_throughput_paths.py -m gpu 2>&1 | tail -5 | tee -a "$OUT/gpu_bench.log" || true
