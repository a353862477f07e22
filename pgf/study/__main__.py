r"""The study command line: `run` a grid's runs, `report` their results.

  python -m pgf.study run experiments/<study>/grid.py --parallel=2
  python -m pgf.study report experiments/<study>/grid.py

Defaults: --root=workdirs/<study>/<scale> and
--out=<the grid file's folder>/<scale>, where <study> is the name of the
grid file's folder, so that the runs and results of each scale stay apart.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string('root', None, 'Folder of the runs '
                    '(<root>/<cell>/seed_<s>); default '
                    'workdirs/<study>/<scale>.')
flags.DEFINE_string('scale', 'cpu', "Passed to the grid file's get_grid(scale) "
                    "(e.g. 'cpu', 'gpu').")
flags.DEFINE_integer('parallel', 1, 'run: training processes at a time.')
flags.DEFINE_string('only', None, 'run: only cells whose name matches this '
                    'regex (re.search).')
flags.DEFINE_list('seeds', None, "run: only these seeds of each cell "
                  "(e.g. '0,1').")
flags.DEFINE_bool('dry', False, 'run: check the grid and print the plan '
                  '(skip, resume, start) without launching anything.')
flags.DEFINE_integer('threads', None, 'run, on a CPU: threads per process '
                     '(NPROC, OMP/MKL/OPENBLAS_NUM_THREADS); default cores / '
                     'parallel; 0 leaves the environment as it is.')
flags.DEFINE_enum('device', 'auto', ['auto', 'cpu', 'gpu'], 'run: how to share '
                  'the machine; auto: gpu when JAX_PLATFORMS or /dev/nvidia* '
                  'says so.')
flags.DEFINE_float('mem_fraction', None, 'run, on a GPU: '
                   'XLA_PYTHON_CLIENT_MEM_FRACTION per process; default '
                   '0.9 / parallel.')
flags.DEFINE_string('python', None, 'run: the Python that runs pgf.train '
                    '(default: this one).')
flags.DEFINE_string('out', None, 'report: output folder; default '
                    '<grid folder>/<scale>.')

USAGE = ('usage: python -m pgf.study run|report GRID_FILE [flags]; '
         'see python -m pgf.study --help')


def study_name(grid_file: str) -> str:
  """The grid file's folder name (its own name if not called grid.py)."""
  path = os.path.abspath(grid_file)
  if os.path.basename(path) == 'grid.py':
    return os.path.basename(os.path.dirname(path))
  return os.path.splitext(os.path.basename(path))[0]


def default_root(grid_file: str, scale: str) -> str:
  return os.path.join('workdirs', study_name(grid_file), scale)


def default_out(grid_file: str, scale: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(grid_file)), scale)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def do_run(grid, grid_file: str, root: str) -> int:
  from pgf.study import runner
  # `kill` of the runner stops its training processes too (as Ctrl-C does):
  # they resume from their last checkpoints on the next run.
  signal.signal(signal.SIGTERM, _interrupt)
  seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
  summary = runner.run_grid(
      grid, root, grid_file=grid_file, parallel=FLAGS.parallel,
      only=FLAGS.only, seeds=seeds,
      device=None if FLAGS.device == 'auto' else FLAGS.device,
      threads=FLAGS.threads, mem_fraction=FLAGS.mem_fraction, dry=FLAGS.dry,
      python=FLAGS.python)
  if FLAGS.dry:
    return 0
  failed = summary.failed
  print(f'{len(summary.skipped)} finished before, '
        f'{len(summary.outcomes) - len(failed)} finished now, '
        f'{len(failed)} failed' + (':' if failed else '.'))
  for o in failed:
    print(f'  {o.run.cell} seed {o.run.seed}: exit {o.returncode}, log '
          f'{os.path.join(o.run.workdir, "train.log")}')
  return 1 if failed else 0


def do_report(grid, grid_file: str, root: str, out: str) -> int:
  from pgf.study import plots
  from pgf.study import report as report_lib
  results = report_lib.collect(grid, root, grid_file=grid_file)
  report = report_lib.build_report(grid, results, root=root,
                                   grid_file=grid_file)
  written = plots.plot_all(report, results, out)
  report['plots'] = written
  text = report_lib.markdown(report, plots=written)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(text)
  print(text)
  logging.info('Wrote results.json, results.md and %s to %s.',
               ', '.join(written) or 'no plots', out)
  return 0


def main(argv) -> int:
  from pgf.study import grid as grid_lib
  if len(argv) != 3 or argv[1] not in ('run', 'report'):
    print(USAGE, file=sys.stderr)
    return 2
  command, grid_file = argv[1], argv[2]
  try:
    grid = grid_lib.load_grid(grid_file, scale=FLAGS.scale)
    root = FLAGS.root or default_root(grid_file, FLAGS.scale)
    if command == 'run':
      return do_run(grid, grid_file, root)
    return do_report(grid, grid_file, root,
                     FLAGS.out or default_out(grid_file, FLAGS.scale))
  except grid_lib.GridError as e:
    print(f'pgf.study: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  app.run(main)
