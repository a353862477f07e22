# Sourced by the GPU scripts: makes pgf importable on a GPU machine whose
# image has JAX but not all of pgf's dependencies, from the wheels in .whl/
# (scripts/fetch_gpu_wheels.sh), without network access.
if ! python3 -c 'import ml_collections, grain, tensorflow_datasets, clu, tensorboardX' 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/pgf_site .whl/*.whl
    export PYTHONPATH="/tmp/pgf_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pgf's dependencies are missing and there is no .whl/ folder:" \
         "run scripts/fetch_gpu_wheels.sh on a machine with network access," \
         "or pip install -e ." >&2
    exit 1
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
