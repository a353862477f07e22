"""`python -m pgf.bench` runs the training-step table (pgf.bench.steps)."""

from absl import app

from pgf.bench import steps

if __name__ == '__main__':
  steps.define_flags()
  app.run(steps.main)
