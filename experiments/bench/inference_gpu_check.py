r"""GPU check of the Pallas N:M kernel (run on an NVIDIA H100/H200 machine).

  python experiments/bench/inference_gpu_check.py --out=DIR

1. Correctness on the GPU: the Pallas kernel (Triton) against the XLA
   gather reference, bfloat16 and float32, for the bench shapes at 1:8 and
   1:32 and a 2:4 case, batches 1, 7, 64.
2. Timing: `pgf.bench.inference.time_pallas()` (dense bf16 jnp.dot vs the
   kernel; batches 1-64, then 256), written to DIR/inference_gpu.json/.md.
Prints one line per check; exits non-zero if any check fails.
"""

import datetime
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pgf.bench import inference as bench
from pgf.inference import nm

flags.DEFINE_string('out', '.', 'Folder for inference_gpu.{json,md}.')


def check_correctness() -> bool:
  rng = np.random.default_rng(0)
  ok = True
  cases = [(768, 3072, 1, 8), (3072, 768, 1, 32), (768, 2048, 2, 4)]
  for k, out, n, m in cases:
    vals, idx = bench.random_kernel(rng, k, out, n, m)
    ref_w = nm.NMWeights.prepare(vals, idx, m=m, backend='xla')
    for dtype, tol in ((jnp.float32, 2e-2), (jnp.bfloat16, 5e-2)):
      w = nm.NMWeights.prepare(vals, idx, m=m, backend='pallas', dtype=dtype)
      for b in (1, 7, 64):
        x = jnp.asarray(rng.normal(size=(b, k)), dtype)
        got = np.asarray(jax.jit(nm.apply)(x, w), np.float32)
        want = np.asarray(nm.apply(x.astype(jnp.float32), ref_w))
        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-9))
        good = err < tol
        ok &= good
        print(f'{k}->{out} {n}:{m} {jnp.dtype(dtype).name} b={b}: '
              f'relative max error {err:.2e} {"ok" if good else "FAIL"}',
              flush=True)
  return ok


def main(argv):
  del argv
  print('devices:', jax.devices(), flush=True)
  ok = check_correctness()
  rows = bench.time_pallas()
  meta = dict(command=' '.join(sys.argv), backend='pallas',
              machine=jax.devices()[0].device_kind,
              date=datetime.date.today().isoformat(), load='',
              jax=jax.__version__, kernel='pallas (Triton)',
              dtype='bfloat16')
  out = flags.FLAGS.out
  with open(os.path.join(out, 'inference_gpu.json'), 'w') as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  with open(os.path.join(out, 'inference_gpu.md'), 'w') as f:
    f.write(bench.markdown(rows, meta))
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  app.run(main)
