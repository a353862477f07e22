"""Orbax checkpoints of the train state, the data iterator position and
host-side state (JSON).

Orbax writes each checkpoint to a temporary directory and renames it when
complete (atomic); a killed save leaves no half checkpoint behind, and the
latest complete one is restored on the next run with the same workdir. The
data iterator's state (a JSON-able dict, `get_state()`) travels in the host
item.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {'state', 'data'} every so often and restores the latest."""

  def __init__(self, workdir: str, *, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, host: dict) -> None:
    """`host`: JSON-able host-side state (e.g. metrics not yet logged)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        host=ocp.args.JsonSave({**host, 'data': data_iterator.get_state()})))

  def restore(self, step: int, abstract_state, data_iterator):
    """Returns (state, host); `data_iterator` is set in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        host=ocp.args.JsonRestore()))
    host = dict(restored['host'])
    data_iterator.set_state(host.pop('data'))
    return restored['state'], host

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
