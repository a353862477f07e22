r"""ViT-B/16, FF 1:32, MdGf-Exponential c = 1e-4: the authors' released run.

  python -m pgf.train --config=configs/vit_base_1to32_mdgf.py
  python -m pgf.train --config=configs/vit_base_1to32_mdgf.py:runlocal
"""

from pgf.configs import vit_base


def get_config(arg=None):
  return vit_base.get_config(','.join(filter(None, ['mdgf_exp,1:32', arg])))
