#!/usr/bin/env bash
# The reproduction study at GPU scale on one H100/H200 (about 8 minutes):
# experiments/fmnist and experiments/pydocs with --scale=gpu (wider models,
# more seeds), then their reports, into experiments/<study>/gpu/ with the
# device named. Resumable: rerun to finish.
#
#   scripts/gpu_study.sh                 # on the GPU machine
#   SMOKE=1 ONLY='^(dense|srste_1to32)$' scripts/gpu_study.sh   # CPU check
#
# ROOT (workdirs) and OUT_ROOT (experiments) move the runs and reports;
# TFDS_DATA_DIR the prepared datasets.
# Data: the Debian folders, or .data/ (scripts/fetch_gpu_wheels.sh), or
# FMNIST_DIR / PYDOCS_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
scale=gpu
parallel=${PARALLEL:-12}
if [ -n "${SMOKE:-}" ]; then scale=smoke; parallel=${PARALLEL:-2}; fi
only=${ONLY:-.}
root=${ROOT:-workdirs}
out_root=${OUT_ROOT:-experiments}
fmnist=${FMNIST_DIR:-$( [ -d .data/fashion-mnist ] && echo .data/fashion-mnist || echo /usr/share/datasets/fashion-mnist)}
pydocs=${PYDOCS_DIR:-$( [ -d .data/python-docs ] && echo .data/python-docs || echo /usr/share/doc/python3.11/html/_sources)}
python3 -m pgf.data.prepare --dataset=pgf_fashion_mnist --source_dir="$fmnist"
python3 -m pgf.data.prepare --dataset=pgf_python_docs --source_dir="$pydocs"
device=$(python3 -c 'import jax; d = jax.devices()[0]; print(f"{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}")')
echo "device: $device"
for study in fmnist pydocs; do
  start=$(date +%s)
  python3 -m pgf.study run "experiments/$study/grid.py" --scale=$scale \
      --parallel="$parallel" --only="$only" --root="$root/$study/$scale"
  python3 -m pgf.study report "experiments/$study/grid.py" --scale=$scale \
      --root="$root/$study/$scale" --out="$out_root/$study/$scale"
  echo "device: $device; $(date -u +%F); $(( $(date +%s) - start )) s" \
      > "$out_root/$study/$scale/device.txt"
done
