#!/usr/bin/env bash
# Downloads, on a machine with network access, the wheels that pgf needs and
# the GPU machine's image lacks (CPython 3.12, x86-64; the image has jax
# with CUDA, flax, optax, orbax, numba, ...), into .whl/ (git-ignored), and
# copies the study's datasets into .data/: carry both to the GPU machine.
#
#   scripts/fetch_gpu_wheels.sh        # then: scripts/gpu_study.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .data
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform any)
for package in ml_collections grain array_record tensorflow-datasets clu \
    tensorboardX dm-tree tensorflow-metadata simple_parsing toml termcolor \
    immutabledict docstring-parser importlib_resources; do
  python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp "${platforms[@]}" \
      -d .whl "$package"
done
# promise (a TFDS dependency) has no wheel on PyPI: build one (pure Python).
python3 -m pip wheel -q --no-deps -w .whl promise
# The datasets, if this machine has them (Debian packages).
[ -d /usr/share/datasets/fashion-mnist ] && \
    cp -r /usr/share/datasets/fashion-mnist .data/
[ -d /usr/share/doc/python3.11/html/_sources ] && \
    cp -r /usr/share/doc/python3.11/html/_sources .data/python-docs
du -sh .whl .data
