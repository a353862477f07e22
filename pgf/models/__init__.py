"""Model families. Each module exports `build`, `decode_variant` and
`SPARSITY_LAYERS` (role -> regex on module paths: ff, q, k, v, o)."""

import importlib
import types

MODELS = ('vit', 'swin', 't5')


def get_model_module(name: str) -> types.ModuleType:
  """The module of model family `name` (config key model.name)."""
  if name not in MODELS:
    raise ValueError(f'model.name={name!r} is not a model; choose one of '
                     f'{MODELS}.')
  return importlib.import_module(f'pgf.models.{name}')
