#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one short call (a few minutes on an H100 or H200; issue 37):
#   bench_core.py   SD1.5-shaped UNet at 512 px in float16: base, processors (one adapter, and batches of 2 and 8
#                   different identities through the per-sample deltas), fused, diffusers' unfused LoRA; kernel
#                   counts and GPU busy time; fuse/unfuse and applied() swaps against diffusers' own;
#   bench_personalize.py   zero-shot (base deferred and loaded), + 40-step fast fine-tune, DreamBooth-LiDB, generation.
# Usage: scripts/bench_gpu.sh [OUT_DIR]   (default: $OUT when set, else bench/); PYTHON picks the interpreter.
# A machine without the project's dependencies takes them as wheels in .whl/ (installed into /tmp/site first), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench}}
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
"$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT_DIR/gpu.txt"
"$PYTHON" scripts/bench_core.py --device cuda --dtype float16 --latent 64 --batches 2,8 --repeats 20 --swaps 10 \
  --out "$OUT_DIR/core_cuda.json" | tee "$OUT_DIR/core_cuda.txt"
"$PYTHON" scripts/bench_personalize.py --device cuda --repeats 3 --out "$OUT_DIR/personalize_cuda.json" \
  | tee "$OUT_DIR/personalize_cuda.txt"
