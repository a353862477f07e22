"""Model families, one module each: `pgf.models.<name>` exports `build`,
`decode_variant` and `SPARSITY_LAYERS` (role -> regex on parameter paths:
ff, q, k, v, o). `config.model.name` selects the module, so adding a model
family is adding its module."""

import importlib
import pkgutil
import types

_NOT_MODELS = ('common',)


def available() -> tuple[str, ...]:
  """Names of the model families (the modules of this package)."""
  return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                      if m.name not in _NOT_MODELS and not
                      m.name.startswith('_')))


def get_model_module(name: str) -> types.ModuleType:
  """The module of model family `name` (config key model.name)."""
  if name not in available():
    raise ValueError(f'model.name={name!r} is not a model; choose one of '
                     f'{available()}.')
  return importlib.import_module(f'pgf.models.{name}')
