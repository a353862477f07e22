r"""ViT-B/16, FF 1:16 (93.75 % sparse), MdGf-Exponential (c = 1e-4).

  python -m pgf.train --config=configs/vit_base_1to16_mdgf.py
  python -m pgf.train --config=configs/vit_base_1to16_mdgf.py:runlocal
  python -m pgf.train --config=configs/vit_base_1to16_mdgf.py --dry_run

The recipe of configs/vit_base.py (docs/recipes.md section 6) at 1:16. Expected
result: not yet measured by pgf (needs ImageNet-1k and an accelerator pod).
"""

from pgf.configs import vit_base


def get_config(arg=None):
  return vit_base.get_config(','.join(filter(None, ['mdgf_exp,1:16', arg])))
