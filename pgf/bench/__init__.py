"""Benchmarks that print tables (never timed tests).

  python -m pgf.bench.steps      training-step time of every recipe vs dense
                                 (also `python -m pgf.bench`)
"""
