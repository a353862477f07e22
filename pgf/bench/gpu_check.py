r"""The prepared GPU check: one run on one H100/H200, about 8 minutes.

  scripts/gpu_check.sh                       # on the GPU machine
  python -m pgf.bench.gpu_check --out_dir=experiments/bench
  python -m pgf.bench.gpu_check --tiny --out_dir=/tmp/check   # CPU, tiny

Sections, each under its own time budget (rows are added in priority order
until the budget is spent; what was left out is listed), each written to
the JSON and Markdown as soon as it ends, so that a run cut short still
leaves the finished sections:

  vit        ViT-B/16 training steps (bfloat16, batch 256, 224x224): pgf's
             dense step, the stock Flax model, the recipes, every
             SdGf-Stepwise frame of 1:8, recompute off; per row ms, ratio
             to dense (paired per round, `pgf.bench.steps`), throughput
             relative to dense, MFU, compiled and device memory.
  t5         T5-Base (T5 v1.1, bfloat16, the config's batch 128, inputs 512,
             targets 114), the same measurements for fewer rows.
  schedule   compile count over the SdGf schedule: the ViT-B sdgf_stepwise
             row's jitted step is run at the first and last step of every
             frame; its `_cache_size()` must equal the number of frames.
  masks      N:M mask time per ViT-B / T5-Base kernel and pattern against a
             one-pass floor and the copy bandwidth (`pgf.bench.masks`, run
             as its own process), and against the datasheet HBM bandwidth.
  inference  the Pallas N:M matmul against dense bf16 at decode-sized
             batches (`pgf.bench.inference.time_pallas`); its correctness
             check is experiments/bench/inference_gpu_check.py.

MFU = 3 x (dense forward FLOPs per example, `pgf.flops.model_costs`) x
batch / step time / the device's dense bf16 peak (PEAK_BF16: 989 TFLOP/s
for H100 SXM and H200, the datasheet number; the H200 machine here measured
about 790 TFLOP/s on an 8192^3 bf16 matmul, so 80 % MFU is about the
ceiling). Sparse rows are given the dense FLOPs (their throughput, not
fewer FLOPs).

--tiny runs every section at a tiny size (mu models, a few rows, the XLA
backend for inference) on whatever backend there is, in about a minute on
a CPU: tests/test_bench.py runs it.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import traceback

from absl import app
from absl import flags
import jax

from pgf import flops as flops_lib
from pgf.bench import inference as bench_inference
from pgf.bench import steps as bench_steps
from pgf.bench import timing
from pgf.bench.steps import RowSpec
from pgf.configs import t5_base
from pgf.configs import vit_base

# Dense bf16 peak FLOP/s and HBM bytes/s by device kind (datasheets).
PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}
HBM_BYTES_S = {'H100': 3.35e12, 'H200': 4.8e12, 'A100': 2.0e12}

_STEPWISE = RowSpec('sdgf_stepwise', 'ste', 'stepwise', (1, 8),
                    all_frames=True)
VIT_SPECS = [
    RowSpec('ste', 'ste', nm=(2, 4)),
    RowSpec('srste', 'srste', nm=(2, 4)),
    RowSpec('mdgf_exp', 'mdgf_exp', nm=(1, 16)),
    RowSpec('mdgf_linear', 'mdgf_linear', nm=(1, 16)),
    _STEPWISE,
    RowSpec('ste', 'ste', nm=(1, 16), recompute=False),
    RowSpec('mdgf_exp', 'mdgf_exp', nm=(1, 16), recompute=False),
    RowSpec('ste', 'ste', nm=(1, 32)),
    RowSpec('ste', 'ste', nm=(1, 64)),
    RowSpec('srste', 'srste', nm=(1, 16)),
    RowSpec('sdgf_geometric', 'ste', 'geometric', (1, 8), all_frames=True),
]
T5_SPECS = [
    RowSpec('ste', 'ste', nm=(1, 16)),
    RowSpec('mdgf_exp', 'mdgf_exp', nm=(1, 16)),
    RowSpec('srste', 'srste', nm=(2, 4)),
    RowSpec('ste', 'ste', nm=(1, 16), recompute=False),
]
MASK_PATTERNS = '2:4,1:8,1:16,1:32,1:64,8:64'
DECODE_BATCHES = (1, 4, 16, 64)

# name -> (config module, arg, variant, batch, dtype, specs, steps per
# sample, rounds, compile budget s, timing budget s, stock model).
FULL = {
    'vit': (vit_base, None, 'B/16', 256, 'bfloat16', VIT_SPECS, 5, 7, 130,
            50, True),
    't5': (t5_base, None, 'base', 128, 'bfloat16', T5_SPECS, 3, 5, 80, 30,
           True),
}
TINY = {
    'vit': (vit_base, 'runlocal', 'mu/2', 8, 'float32',
            [RowSpec('ste', 'ste', nm=(2, 4)),
             RowSpec('sdgf_stepwise', 'ste', 'stepwise', (2, 4),
                     all_frames=True)], 2, 3, None, None, True),
    't5': (t5_base, 'runlocal', 'mu', 4, 'float32',
           [RowSpec('ste', 'ste', nm=(2, 4))], 2, 3, None, None, False),
}

FLAGS = flags.FLAGS


def _kind_key(kind: str) -> str | None:
  return next((k for k in PEAK_BF16 if k in kind.upper()), None)


def device_facts() -> dict:
  d = jax.devices()[0]
  kind = getattr(d, 'device_kind', d.platform)
  key = _kind_key(kind) if d.platform == 'gpu' else None
  return dict(device_kind=kind, platform=d.platform,
              device_count=jax.device_count(), jax=jax.__version__,
              host=f'{timing.cpu_name()}, {os.cpu_count()} cores',
              peak_bf16_flops=PEAK_BF16.get(key),
              peak_source=(f'{key} datasheet, dense bf16' if key else
                           'none (no MFU)'),
              hbm_bytes_s=HBM_BYTES_S.get(key))


def _config(module, arg, variant):
  c = module.get_config(arg)
  c.unlock()
  c.model.variant = variant
  c.lock()
  return c


def step_section(name: str, spec: tuple, facts: dict, scale: float
                 ) -> tuple[dict, bench_steps.Bench]:
  """Times one model's rows; adds MFU and throughput relative to dense."""
  (module, arg, variant, batch, dtype, specs, steps, rounds, c_budget,
   t_budget, stock_model) = spec
  base = _config(module, arg, variant)
  meta, rows, bench = bench_steps.run_bench(
      base, config_name=f'{module.__name__}:{arg or ""} variant {variant}',
      command=' '.join(sys.argv), rounds=rounds, steps=steps, warmup=2,
      batch_note=f'config batch {base.batch_size}', specs=specs,
      compile_budget_s=c_budget and c_budget * scale,
      time_budget_s=t_budget and t_budget * scale, batch_size=batch,
      dtype=dtype, stock_model=stock_model)
  costs = flops_lib.model_costs(bench.setups['dense'].task)
  step_flops = 3 * costs.forward * bench.config.batch_size
  meta.update(forward_flops_per_example=costs.forward,
              step_flops_dense=step_flops)
  for r in rows:
    r['throughput_vs_dense'] = 1 / r['ratio_median']
    r['tflops_s'] = step_flops / (r['ms_median'] / 1e3) / 1e12
    peak = facts['peak_bf16_flops']
    r['mfu'] = r['tflops_s'] * 1e12 / peak if peak else None
  return dict(section=name, meta=meta, rows=rows), bench


def masks_section(out_path: str, tiny: bool, facts: dict) -> dict:
  """pgf.bench.masks in its own process (it defines its own flags)."""
  args = (['--shapes=vit_b', '--patterns=2:4', '--dtypes=float32',
           '--repeats=2', '--min_sample_ms=0.2'] if tiny else
          ['--shapes=vit_b,t5_base', f'--patterns={MASK_PATTERNS}',
           '--dtypes=bfloat16', '--repeats=5'])
  cmd = [sys.executable, '-m', 'pgf.bench.masks', '--groups=in',
         '--impls=pgf', f'--out={out_path}', *args]
  subprocess.run(cmd, check=True, timeout=300)
  with open(out_path) as f:
    raw = json.load(f)
  copy = raw['machine']['memory_gb_per_s']
  hbm = facts['hbm_bytes_s']
  rows = []
  for res in raw['results']:
    for row in res['rows']:
      p = row['pgf']
      rows.append(dict(
          kernels=' = '.join(res['kernels']), shape=res['shape'],
          dtype=res['dtype'], pattern=row['pattern'], min_ms=p['min_ms'],
          gb_per_s=p['gb_per_s'], x_floor=p['x_floor'],
          x_floor_paired=p['x_floor_paired'],
          x_two_passes=p['min_ms'] / res['two_pass_ms'],
          of_copy=p['gb_per_s'] / copy,
          of_hbm=p['gb_per_s'] * 1e9 / hbm if hbm else None))
  return dict(section='masks', command=' '.join(cmd[1:]),
              copy_gb_per_s=copy, json=os.path.basename(out_path),
              rows=rows)


def inference_section(tiny: bool) -> dict:
  if tiny or jax.default_backend() != 'gpu':
    rows = bench_inference.matmul_rows(
        backend='xla', shapes={'tiny_ff': (64, 128)}, patterns=((1, 8),),
        batches=(1, 4), repeats=2)
    how = 'XLA gather backend, tiny shape (no GPU)'
  else:
    rows = bench_inference.time_pallas(batches=DECODE_BATCHES, repeats=7)
    how = 'pgf.bench.inference.time_pallas (Pallas/Triton, bfloat16)'
  return dict(section='inference', how=how, rows=rows)


def _fmt(x, spec: str, empty: str = 'n/a') -> str:
  return empty if x is None else format(x, spec)


def _mib(x) -> str:
  return 'n/a' if not x else f'{x / 2**20:,.0f}'


def markdown(facts: dict, sections: dict, errors: dict, started: str
             ) -> str:
  peak = facts['peak_bf16_flops']
  lines = ['# GPU check', '', f"Device: {facts['device_kind']} "
           f"({facts['platform']}, {facts['device_count']} device(s)); "
           f"host {facts['host']}  ", f"JAX {facts['jax']}; started "
           f"{started}; MFU peak: "
           f"{_fmt(peak and peak / 1e12, '.0f')} TFLOP/s "
           f"({facts['peak_source']})", '']
  for name in ('vit', 't5'):
    sec = sections.get(name)
    if not sec:
      continue
    m = sec['meta']
    lines += [f"## {m['model']}: training step, batch {m['batch_size']}, "
              f"{m['dtype']}", '',
              f"Dense forward {m['forward_flops_per_example'] / 1e9:.4g} "
              f"GFLOP per example; step = 3 x forward x batch = "
              f"{m['step_flops_dense'] / 1e12:.4g} TFLOP. {m['rounds']} "
              f"rounds of {m['steps']} steps per row; x dense paired per "
              'round (median [min, max]); memory from the compiled step.',
              ' x from work: 1 + (the sparse work timed alone) / dense ms.',
              '', '| row | pattern | ms median (min) | x dense | '
              'throughput vs dense | x from work | TFLOP/s | MFU | temp MiB | '
              'peak MiB | device MiB in use |', '| --- | --- | --- | --- | '
              '--- | --- | --- | --- | --- | --- | --- |']
    for r in sec['rows']:
      label = r['row'] + (' (recompute off)' if r['recompute'] is False
                          else '')
      lines.append(
          f"| {label} | {r['pattern']} | {r['ms_median']:.2f} "
          f"({r['ms_min']:.2f}) | {r['ratio_median']:.3f} "
          f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] | "
          f"{r['throughput_vs_dense']:.3f} | "
          f"{_fmt(r.get('work_ratio'), '.4f')} | {r['tflops_s']:.4g} | "
          f"{_fmt(r['mfu'], '.1%')} | {_mib(r.get('temp_bytes'))} | "
          f"{_mib(r.get('peak_bytes'))} | "
          f"{_mib(r.get('device_bytes_in_use'))} |")
    if m.get('left_out'):
      lines += ['', 'Left out for time: ' + ', '.join(
          f"{x['name']} {x['nm'][0]}:{x['nm'][1]}" for x in m['left_out'])]
    lines.append('')
  sched = sections.get('schedule')
  if sched:
    ok = sched['executables'] == sched['frames']
    lines += ['## Compiles over an SdGf schedule', '',
              f"{sched['row']}: {sched['frames']} frames, jitted step run at "
              f"{sched['steps_run']} frame boundaries, "
              f"{sched['executables']} executables "
              f"({'one per frame' if ok else 'NOT one per frame'}).", '']
  masks = sections.get('masks')
  if masks:
    lines += ['## N:M masks against the memory-bound limit', '',
              f"`python {masks['command']}` (raw: {masks['json']}); copy "
              f"bandwidth {masks['copy_gb_per_s']:.0f} GB/s (256 MiB "
              'x * 2 + 1); GB/s = (kernel + bool mask bytes) / min time.', '',
              'x floor = min ms over the one-pass floor\'s; paired = median '
              'of row / the floor timed just before it; x two passes = over '
              'the two passes every XLA mask needs (`pgf.bench.masks`).', '',
              '| kernels | dtype | pattern | ms (min) | GB/s | x floor | '
              'x floor paired | x two passes | of copy | of HBM datasheet |',
              '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    lines += [f"| {r['kernels']} | {r['dtype']} | {r['pattern']} | "
              f"{r['min_ms']:.4f} | {r['gb_per_s']:.0f} | "
              f"{r['x_floor']:.2f} | {r['x_floor_paired']:.2f} | "
              f"{r['x_two_passes']:.2f} | "
              f"{r['of_copy']:.0%} | "
              f"{_fmt(r['of_hbm'], '.0%')} |" for r in masks['rows']]
    lines.append('')
  inf = sections.get('inference')
  if inf:
    lines += ['## N:M inference matmul at decode-sized batches', '',
              inf['how'] + '; ratio = dense / N:M (> 1: N:M faster).', '',
              '| shape | pattern | batch | dense ms | N:M ms | ratio | '
              'max abs err |', '| --- | --- | --- | --- | --- | --- | --- |']
    lines += [f"| {r['shape']} | {r['pattern']} | {r['batch']} | "
              f"{r['dense_median_ms']:.4f} | {r['nm_median_ms']:.4f} | "
              f"{r['ratio']:.2f} | {r['max_abs_err']:.2g} |"
              for r in inf['rows']]
    lines.append('')
  if errors:
    lines += ['## Sections that failed', '']
    lines += [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in
              errors.items()]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  tiny, scale = FLAGS.tiny, FLAGS.budget_scale
  facts = device_facts()
  tag = 'tiny_' + facts['platform'] if tiny else (
      _kind_key(facts['device_kind']) or facts['platform']).lower()
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  base = os.path.join(FLAGS.out_dir, f'gpu_check_{tag}')
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds')
  t0 = time.perf_counter()
  sections, errors, benches, seconds = {}, {}, {}, {}

  def save():
    with open(base + '.json', 'w') as f:
      json.dump(dict(device=facts, started=started, seconds=seconds,
                     sections=sections, errors=errors), f, indent=1)
    with open(base + '.md', 'w') as f:
      f.write(markdown(facts, sections, errors, started))

  def section(name, fn):
    t = time.perf_counter()
    print(f'== {name} (at {t - t0:.0f} s)', flush=True)
    try:
      sections[name] = fn()
    except Exception:  # noqa: BLE001  One failed section must not end it.
      errors[name] = traceback.format_exc()
      print(errors[name], file=sys.stderr, flush=True)
    seconds[name] = time.perf_counter() - t
    save()

  def steps_of(name):
    def fn():
      out, benches[name] = step_section(name, (TINY if tiny else FULL)[name],
                                        facts, scale)
      return out
    return fn

  for name in FLAGS.sections:
    if name in ('vit', 't5'):
      section(name, steps_of(name))
    elif name == 'schedule' and 'vit' in benches:
      section(name, lambda: bench_steps.run_schedule(benches['vit'],
                                                     'sdgf_stepwise'))
      del benches['vit']
    elif name == 'masks':
      section(name, lambda: masks_section(base + '_masks.json', tiny, facts))
    elif name == 'inference':
      section(name, lambda: inference_section(tiny))
    if name == 't5':
      benches.pop('t5', None)  # Frees its state before the next section.
  seconds['total'] = time.perf_counter() - t0
  save()
  print(f'Wrote {base}.json and .md in {seconds["total"]:.0f} s; failed: '
        f'{sorted(errors) or "none"}', flush=True)
  sys.exit(1 if errors else 0)


if __name__ == '__main__':
  flags.DEFINE_bool('tiny', False, 'Tiny sizes (CPU smoke test).')
  flags.DEFINE_string('out_dir', 'experiments/bench', 'Output folder.')
  flags.DEFINE_list('sections', ['vit', 'schedule', 't5', 'masks',
                                 'inference'], 'Sections to run, in order.')
  flags.DEFINE_float('budget_scale', 1.0, 'Multiplies the time budgets.')
  app.run(main)
