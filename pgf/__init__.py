"""pgf: N:M structured sparsity training of Transformers in JAX/Flax."""

__version__ = '0.1.0'
