#!/usr/bin/env bash
# The prepared GPU check (pgf.bench.gpu_check): ViT-B/16 and T5-Base
# training steps per recipe vs dense (bf16; MFU, memory), compiles over an
# SdGf schedule, N:M masks against HBM bandwidth and the Pallas N:M
# inference kernel, on one H100/H200 in about 8 minutes. Writes
# experiments/bench/gpu_check_<device>.{json,md} (and _masks.json).
#
#   scripts/gpu_check.sh                  # on the GPU machine
#   scripts/gpu_check.sh --tiny --out_dir=/tmp/check   # CPU smoke test
#   INFERENCE_CHECK=1 scripts/gpu_check.sh  # then the Pallas kernel's own
#                                           # correctness check as well
#
# A GPU machine without network access needs pgf's missing dependencies as
# wheels in .whl/ (scripts/fetch_gpu_wheels.sh, here; carry .whl there);
# with network access it installs them (pip install -e .) and, if JAX has no
# GPU backend, the CUDA JAX wheel. Other flags go to pgf.bench.gpu_check
# (--sections=vit,schedule,t5,masks,inference, --budget_scale=1.0).
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=0
for arg in "$@"; do [ "$arg" = --tiny ] && tiny=1; done
if [ ! -d .whl ] && ! python3 -c 'import ml_collections, grain, tensorflow_datasets' 2>/dev/null; then
  python3 -m pip install -q --retries 0 --timeout 10 -e . || true
fi
source scripts/gpu_env.sh
if [ "$tiny" = 0 ]; then
  if ! python3 -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
    echo "JAX sees no GPU; installing jax[cuda12]" >&2
    python3 -m pip install -q --retries 0 --timeout 10 -U "jax[cuda12]"
  fi
  # A rerun on the same machine reuses the compiled steps.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/pgf_jax_cache}
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
fi
export PYTHONUNBUFFERED=1
status=0
python3 -m pgf.bench.gpu_check "$@" || status=$?
if [ "$tiny" = 0 ] && [ -n "${INFERENCE_CHECK:-}" ]; then
  python3 experiments/bench/inference_gpu_check.py --out=experiments/bench || status=$?
fi
exit "$status"
