r"""Evaluate or decode an exported run with the compressed N:M matmul.

  python -m pgf.inference --workdir=DIR [--export=FILE] --batch=N \
      [--backend=auto|cpu|xla|pallas] [--max_length=16] [--repeats=5]

Classification runs (ViT, SwinV2) classify one evaluation batch; T5 runs
greedy-decode one. Both also run the dense hard-masked model (the export
decompressed) on the same batch and print the agreement and the time per
batch of each path (min and median of `repeats` interleaved calls, after a
warm-up call that compiles).
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from pgf import export
from pgf.inference import model as model_lib


def _timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
  """name -> (min ms, median ms), the calls of each name interleaved."""
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn())
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - t) * 1e3)
  return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def run(workdir: str, *, export_path: str | None = None, batch: int = 8,
        backend: str = 'auto', max_length: int = 16,
        repeats: int = 5) -> dict:
  """Compressed vs dense on one batch; returns the report it prints."""
  from pgf.models import t5
  cm, arrays, task = model_lib.load(workdir, export_path=export_path,
                                    backend=backend)
  config = model_lib.read_config(workdir)
  dense_params = jax.tree.map(jnp.asarray, export.decompress(arrays))
  data = next(iter(model_lib.eval_batches(config, task, batch_size=batch)))
  if isinstance(cm.model, t5.T5):
    tokens = jnp.asarray(data['encoder_input_tokens'][:batch], jnp.int32)
    fns = {
        'compressed': lambda: cm.greedy_decode(tokens,
                                               max_length=max_length),
        'dense': lambda: t5.greedy_decode(cm.model,
                                          {'params': dense_params}, tokens,
                                          max_length=max_length),
    }
    got, want = (np.asarray(f()) for f in fns.values())
    agree = float((got == want).all(-1).mean())
    diff = float((got != want).mean())
    what = f'greedy decoding of {tokens.shape[0]} inputs, {max_length} tokens'
  else:
    images = jnp.asarray(data['image'][:batch])
    dense_fn = jax.jit(lambda p, x: cm.model.apply({'params': p}, x,
                                                   train=False))
    fns = {'compressed': lambda: cm.classify(images),
           'dense': lambda: dense_fn(dense_params, images)}
    got, want = (np.asarray(f()) for f in fns.values())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    diff = float(np.abs(got - want).max())
    what = f'classification of {images.shape[0]} images'
  times = _timed(fns, repeats)
  report = dict(
      what=what, backend=cm.backend, compressed_kernels=len(cm.kernels),
      dense_kernels=list(cm.dense_paths), agree=agree, max_abs_diff=diff,
      compressed_ms=times['compressed'][1], dense_ms=times['dense'][1],
      compressed_min_ms=times['compressed'][0],
      dense_min_ms=times['dense'][0],
      speedup=times['dense'][1] / times['compressed'][1])
  return report


def main(argv):
  del argv
  f = flags.FLAGS
  r = run(f.workdir, export_path=f.export or None, batch=f.batch,
          backend=f.backend, max_length=f.max_length, repeats=f.repeats)
  dense = ', '.join(r['dense_kernels']) or 'none'
  print(f"{r['what']}, backend {r['backend']}: "
        f"{r['compressed_kernels']} compressed kernels; dense: {dense}")
  print(f"agreement with the dense hard-masked model {r['agree']:.3f} "
        f"(max |diff| {r['max_abs_diff']:.2e})")
  print(f"compressed {r['compressed_ms']:.2f} ms (min "
        f"{r['compressed_min_ms']:.2f}), dense {r['dense_ms']:.2f} ms (min "
        f"{r['dense_min_ms']:.2f}): {r['speedup']:.2f}x")


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Workdir of a pgf.train run.',
                      required=True)
  flags.DEFINE_string('export', '', 'Export .npz (default: the latest in '
                      'the workdir, exported now if there is none).')
  flags.DEFINE_integer('batch', 8, 'Examples per batch.')
  flags.DEFINE_enum('backend', 'auto', ['auto', 'cpu', 'xla', 'pallas'],
                    'Compressed matmul backend.')
  flags.DEFINE_integer('max_length', 16, 'T5: tokens to decode.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls of each path.')
  app.run(main)
