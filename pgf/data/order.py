"""The order of training examples: a function of the seed and the step only.

Training reads an infinite stream of examples. Stream position k holds
record `perm_e[k mod n]` of the split, where e = k // n is the epoch and
perm_e a permutation drawn from (seed, e): every epoch is a fresh shuffle,
and no example is dropped at epoch ends. Global batch j is positions
[j G, (j + 1) G) for the global batch size G, and process p of P reads its
slice [j G + p b, j G + (p + 1) b) with b = G / P. So the global batch at
every step is the same whatever the number of processes and devices; per-
example randomness (augmentation, span corruption) is drawn from (seed, k)
for the same reason.
"""

from __future__ import annotations

import numpy as np


class ExampleOrder:
  """Stream position -> record index (see the module docstring)."""

  def __init__(self, num_records: int, seed: int, *, shuffle: bool = True):
    if num_records < 1:
      raise ValueError(f'A split of {num_records} records cannot be read.')
    self.num_records = num_records
    self.seed = seed
    self.shuffle = shuffle
    self._cache: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_records)
    if epoch not in self._cache:
      if len(self._cache) >= 2:  # A batch spans at most two epochs.
        self._cache.pop(min(self._cache))
      self._cache[epoch] = np.random.default_rng(
          [self.seed, epoch]).permutation(self.num_records)
    return self._cache[epoch]

  def __call__(self, positions) -> np.ndarray:
    """Record indices of stream positions (an int or an int array)."""
    positions = np.asarray(positions, np.int64)
    epochs, offsets = np.divmod(positions, self.num_records)
    out = np.empty(positions.shape, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.permutation(int(e))[offsets[sel]]
    return out


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'Global batch {global_batch_size} is not divisible by '
                     f'the {process_count} processes.')
  return global_batch_size // process_count


def global_positions(local_positions, *, local_batch: int,
                     process_index: int, process_count: int) -> np.ndarray:
  """Stream positions of this process's i-th examples (i = 0, 1, ...)."""
  i = np.asarray(local_positions, np.int64)
  batch, within = np.divmod(i, local_batch)
  return (batch * local_batch * process_count + process_index * local_batch
          + within)


def example_rng(seed: int, position: int, *salt: int) -> np.random.Generator:
  """The generator of one stream position's randomness."""
  return np.random.default_rng([seed, int(position), *salt])
