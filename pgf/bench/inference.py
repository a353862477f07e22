r"""Dense matmul vs the compressed N:M matmul, per shape, pattern and batch.

  python -m pgf.bench.inference [--backend=cpu|xla|pallas] \
      [--out=experiments/bench/inference_cpu.json] [--repeats=11] [--e2e]

Shapes: the FF layers of ViT-B (768 -> 3072, 3072 -> 768) and T5-Base
(768 -> 2048, 2048 -> 768); patterns 1:8, 1:16, 1:32; batches (rows) 1, 4,
16, 64, 256. Dense is `jax.jit(jnp.dot)` of x with the dense hard-masked
kernel (float32 on the CPU; bfloat16 for the Pallas backend, which targets
GPUs); compressed is `jax.jit(pgf.inference.apply)` with the kernel prepared
for the backend. Every sample times a loop of calls lasting about 10 ms,
after half as many untimed calls; the
two paths alternate sample by sample (interleaved), and each row reports
the min and median ms per call over `repeats` samples and the ratio of the
medians (dense / compressed: above 1, compressed is faster).

`--e2e` adds, per pattern, ViT-B/16's whole FF stack (12 blocks of wi ->
GELU -> wo on the 197 tokens of one image; 226 MB of dense weights, more
than the cache) and greedy decoding of 4 tokens (batch 1, 32 input tokens)
by a random-init T5-Base with N:M FF kernels, run by
`pgf.inference.CompressedModel` against the dense model (`same_tokens`).
The GPU check calls `time_pallas()`.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
import time

from absl import app
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from pgf.bench import timing
from pgf.inference import nm

SHAPES = {
    'vit_b_ff_in': (768, 3072),
    'vit_b_ff_out': (3072, 768),
    't5_base_ff_in': (768, 2048),
    't5_base_ff_out': (2048, 768),
}
PATTERNS = ((1, 8), (1, 16), (1, 32))
BATCHES = (1, 4, 16, 64, 256)
SAMPLE_SECONDS = 10e-3


def random_kernel(rng: np.random.Generator, k: int, out: int, n: int,
                  m: int) -> tuple[np.ndarray, np.ndarray]:
  """Export-layout values/indices [K/m, out, n] of a random N:M kernel."""
  g = k // m
  idx = np.sort(np.argsort(rng.random((g, out, m)), -1)[..., :n], -1)
  vals = rng.normal(size=(g, out, n)).astype(np.float32) / np.sqrt(k * n / m)
  return vals, idx.astype(np.uint8)


def _calls_per_sample(fn) -> int:
  jax.block_until_ready(fn())  # Compile.
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return max(1, int(SAMPLE_SECONDS / max(time.perf_counter() - t, 1e-6)))


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
  """name -> (min ms, median ms) per call, samples of each name alternating.
  """
  calls = {k: _calls_per_sample(f) for k, f in fns.items()}
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(1e3 * timing.sample(
          fn, calls[name], untimed=max(1, calls[name] // 2)))
  return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def matmul_rows(*, backend: str, dtype=jnp.float32, shapes=SHAPES,
                patterns=PATTERNS, batches=BATCHES, repeats: int = 11,
                seed: int = 0) -> list[dict]:
  """One row per (shape, pattern, batch): dense vs compressed ms."""
  rng = np.random.default_rng(seed)
  dense_fn = jax.jit(jnp.dot)
  apply_fn = jax.jit(nm.apply)
  rows = []
  for name, (k, out) in shapes.items():
    for n, m in patterns:
      vals, idx = random_kernel(rng, k, out, n, m)
      dense = jnp.asarray(nm.dense_kernel(vals, idx, m=m), dtype)
      weights = nm.NMWeights.prepare(vals, idx, m=m, backend=backend,
                                     dtype=dtype)
      for b in batches:
        x = jnp.asarray(rng.normal(size=(b, k)), dtype)
        err = float(jnp.abs(apply_fn(x, weights).astype(jnp.float32)
                            - dense_fn(x, dense).astype(jnp.float32)).max())
        t = interleaved({'dense': functools.partial(dense_fn, x, dense),
                         'nm': functools.partial(apply_fn, x, weights)},
                        repeats)
        rows.append(dict(
            shape=name, k=k, out=out, pattern=f'{n}:{m}', batch=b,
            dense_min_ms=t['dense'][0], dense_median_ms=t['dense'][1],
            nm_min_ms=t['nm'][0], nm_median_ms=t['nm'][1],
            ratio=t['dense'][1] / t['nm'][1],
            ratio_min=t['dense'][0] / t['nm'][0], max_abs_err=err))
        print(_row_text(rows[-1]), flush=True)
  return rows


def ff_stack_rows(*, backend: str, patterns=PATTERNS, tokens: int = 197,
                  depth: int = 12, repeats: int = 5,
                  seed: int = 0) -> list[dict]:
  """ViT-B/16's FF stack (depth x (wi, GELU, wo)) on one image's tokens."""
  rng = np.random.default_rng(seed)
  rows = []
  for n, m in patterns:
    layers = [[random_kernel(rng, 768, 3072, n, m),
               random_kernel(rng, 3072, 768, n, m)] for _ in range(depth)]
    dense = [[jnp.asarray(nm.dense_kernel(*w, m=m)) for w in pair]
             for pair in layers]
    comp = [[nm.NMWeights.prepare(*w, m=m, backend=backend) for w in pair]
            for pair in layers]

    @jax.jit
    def dense_stack(x, ws):
      for wi, wo in ws:
        x = x + jax.nn.gelu(x @ wi, approximate=False) @ wo
      return x

    @jax.jit
    def nm_stack(x, ws):
      for wi, wo in ws:
        x = x + nm.apply(jax.nn.gelu(nm.apply(x, wi), approximate=False), wo)
      return x

    x = jnp.asarray(rng.normal(size=(tokens, 768)), jnp.float32)
    t = interleaved({'dense': functools.partial(dense_stack, x, dense),
                     'nm': functools.partial(nm_stack, x, comp)}, repeats)
    rows.append(dict(
        shape=f'vit_b16_ff_stack_{depth}x', k=768, out=768,
        pattern=f'{n}:{m}', batch=tokens,
        dense_min_ms=t['dense'][0], dense_median_ms=t['dense'][1],
        nm_min_ms=t['nm'][0], nm_median_ms=t['nm'][1],
        ratio=t['dense'][1] / t['nm'][1],
        ratio_min=t['dense'][0] / t['nm'][0]))
    print(_row_text(rows[-1]), flush=True)
  return rows


def compress_kernel(w: np.ndarray, n: int, m: int, *, n_in: int = 1
                    ) -> tuple[np.ndarray, np.ndarray]:
  """A dense kernel's top-n of every group of m along its first `n_in`
  (contraction) axes, as the export stores it: values, indices
  [G, out..., n], kept positions ascending."""
  k = int(np.prod(w.shape[:n_in]))
  g = np.moveaxis(w.reshape((k // m, m) + w.shape[n_in:]), 1, -1)
  idx = np.sort(np.argsort(-np.abs(g), axis=-1, kind='stable')[..., :n], -1)
  return np.take_along_axis(g, idx, -1), idx.astype(np.uint8)


def t5_decode_rows(*, backend: str, patterns=PATTERNS, variant: str = 'base',
                   batch: int = 1, inputs: int = 32, tokens: int = 4,
                   repeats: int = 3, seed: int = 0) -> list[dict]:
  """Greedy decoding of `tokens` tokens by a random-init T5 whose FF
  kernels are N:M (pgf.inference.CompressedModel vs the dense model)."""
  from pgf import export
  from pgf.inference.model import CompressedModel
  from pgf.models import t5
  model = t5.T5(vocab_size=32128, **t5.decode_variant(variant))
  enc = jax.random.randint(jax.random.key(seed), (batch, inputs), 2, 32000)
  params = jax.jit(lambda r: model.init(r, enc, enc[:, :tokens],
                                        train=False))(
                                            jax.random.key(seed))['params']
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      flax.linen.unbox(params), sep='/').items()}
  rows = []
  for n, m in patterns:
    arrays, manifest, dense = {}, {}, dict(flat)
    for key, w in flat.items():
      if re.search(r'/mlp/(wi_0|wi_1|wo)/kernel$', key):
        vals, idx = compress_kernel(w, n, m)
        arrays[f'{key}/values'], arrays[f'{key}/indices'] = vals, idx
        manifest[key] = dict(shape=list(w.shape), n=n, m=m, axes=[0])
        dense[key] = nm.dense_kernel(vals, idx, m=m)
      else:
        arrays[key] = w
    arrays[export.MANIFEST] = np.frombuffer(json.dumps(manifest).encode(),
                                            np.uint8)
    cm = CompressedModel(model, arrays, backend=backend)
    dense_params = jax.tree.map(
        jnp.asarray, flax.traverse_util.unflatten_dict(dense, sep='/'))
    fns = {'dense': lambda p=dense_params: t5.greedy_decode(
               model, {'params': p}, enc, max_length=tokens),
           'nm': lambda cm=cm: cm.greedy_decode(enc, max_length=tokens)}
    same = bool((np.asarray(fns['dense']()) == np.asarray(fns['nm']())).all())
    t = interleaved(fns, repeats)
    rows.append(dict(
        shape=f't5_{variant}_greedy_{tokens}_tokens', k=inputs, out=tokens,
        pattern=f'{n}:{m}', batch=batch, dense_min_ms=t['dense'][0],
        dense_median_ms=t['dense'][1], nm_min_ms=t['nm'][0],
        nm_median_ms=t['nm'][1], ratio=t['dense'][1] / t['nm'][1],
        ratio_min=t['dense'][0] / t['nm'][0], same_tokens=same))
    print(_row_text(rows[-1]), flush=True)
  return rows


def time_pallas(*, batches=(1, 2, 4, 8, 16, 32, 64, 256), repeats: int = 11,
                dtype=jnp.bfloat16) -> list[dict]:
  """For the GPU check: the Pallas kernel vs a dense bf16 matmul."""
  if jax.default_backend() != 'gpu':
    raise RuntimeError('time_pallas times the Pallas kernel on a GPU; '
                       f'this is {jax.default_backend()!r}.')
  return matmul_rows(backend='pallas', dtype=dtype, batches=batches,
                     repeats=repeats)


def _row_text(r: dict) -> str:
  return (f"{r['shape']:>22} {r['pattern']:>5} b={r['batch']:<4} dense "
          f"{r['dense_median_ms']:8.3f} ms (min {r['dense_min_ms']:7.3f})  "
          f"nm {r['nm_median_ms']:8.3f} ms (min {r['nm_min_ms']:7.3f})  "
          f"ratio {r['ratio']:5.2f} (min {r['ratio_min']:5.2f})")


def markdown(rows: list[dict], meta: dict) -> str:
  """The table as Markdown, with how it was measured."""
  lines = [f"# Dense vs compressed N:M matmul ({meta['backend']} backend)",
           '', f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ",
           f"Machine: {meta['machine']}  ", f"Load: {meta['load']}  ",
           f"JAX {meta['jax']}, {meta['kernel']}, {meta['dtype']}", '',
           'ms per call, median (min) of interleaved samples; ratio = dense '
           'median / compressed median (> 1: compressed faster), in '
           'parentheses dense min / compressed min.', '',
           '| shape | K -> out | pattern | batch | dense ms | N:M ms | '
           'ratio |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    lines.append(
        f"| {r['shape']} | {r['k']} -> {r['out']} | {r['pattern']} | "
        f"{r['batch']} | {r['dense_median_ms']:.3f} "
        f"({r['dense_min_ms']:.3f}) | {r['nm_median_ms']:.3f} "
        f"({r['nm_min_ms']:.3f}) | {r['ratio']:.2f} "
        f"({r['ratio_min']:.2f}) |")
  lines += ['', NOTES]
  return '\n'.join(lines) + '\n'


NOTES = '''\
How to read it:

- Per-shape rows time one matrix called again and again, so the dense
  kernel (9.4 MB at most in float32) stays in the 32 MB L3 cache: the
  dense baseline is at its best. In a model every layer's weights are
  new; the `vit_b16_ff_stack_12x` rows (226 MB dense) show that case, with
  batch = the 197 tokens of one image, and `k -> out` the model width.
- `t5_base_greedy_4_tokens` rows: greedy decoding of 4 tokens, batch 1,
  32 input tokens (`k` = inputs, `out` = tokens); only the FF kernels are
  N:M, attention and the 32128-way output projection stay dense. Both
  paths produced the same tokens (`same_tokens` in the JSON).
- The machine is shared with other agents' jobs: medians move by tens of
  percent between runs (see the load line); the min columns show the
  least-disturbed samples.
'''


def main(argv):
  del argv
  f = flags.FLAGS
  load_before = os.getloadavg()
  # The Pallas kernel targets GPUs, where models run in bfloat16.
  dtype = jnp.bfloat16 if f.backend == 'pallas' else jnp.float32
  rows = matmul_rows(backend=f.backend, dtype=dtype, repeats=f.repeats)
  if f.e2e:
    rows += ff_stack_rows(backend=f.backend)
    rows += t5_decode_rows(backend=f.backend)
  load_after = os.getloadavg()
  if f.backend == 'cpu':
    kernel = timing.numba_threading()
  else:
    kernel = f'{f.backend} on {jax.devices()[0].device_kind}'
  command = (f'python -m pgf.bench.inference --backend={f.backend} '
             f'--repeats={f.repeats}' + (' --e2e' if f.e2e else '')
             + (f' --out={f.out}' if f.out else ''))
  meta = dict(
      command=command, date=datetime.date.today().isoformat(),
      backend=f.backend,
      machine=(f'{timing.cpu_name()}, {os.cpu_count()} cores, shared with '
               'other agents'),
      load=(f'1-min load average {load_before[0]:.2f} before, '
            f'{load_after[0]:.2f} after'),
      jax=jax.__version__, kernel=kernel, dtype=jnp.dtype(dtype).name)
  if f.out:
    with open(f.out, 'w') as fh:
      json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    with open(os.path.splitext(f.out)[0] + '.md', 'w') as fh:
      fh.write(markdown(rows, meta))


if __name__ == '__main__':
  flags.DEFINE_enum('backend', 'cpu', ['cpu', 'xla', 'pallas'],
                    'Compressed matmul backend.')
  flags.DEFINE_string('out', '', 'JSON output (a .md table beside it).')
  flags.DEFINE_integer('repeats', 11, 'Interleaved samples per row.')
  flags.DEFINE_bool('e2e', False, "Add ViT-B/16's FF stack per pattern.")
  app.run(main)
