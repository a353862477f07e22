"""Swin Transformer V2 (Liu et al. 2022, arXiv 2111.09883) in Flax Linen.

Parameterised like timm's `swinv2_{tiny,small,base}_window8_256`
(timm/models/swin_transformer_v2.py): at 256x256, window 8 and 1000 classes
the parameter counts are those timm publishes (results/results-imagenet.csv):
SwinV2-T 28.35M, SwinV2-S 49.73M, SwinV2-B 87.92M.

What V2 changes from V1, all here: residual post-norm
(x = x + drop_path(norm(f(x)))), scaled cosine attention with a learnable
per-head logit scale, a continuous position bias (a small MLP on log-spaced
relative coordinates), and patch merging that normalises after the reduction.

Sparse-capable layers (pgf.sparsity): in every block Q, K, V ('attn/query',
'attn/key', 'attn/value'), the attention output ('attn/out') and the MLP
('mlp/wi', 'mlp/wo'); also the patch embedding and the patch-merging
reductions, which no default regex selects. The position-bias MLP and the head
are plain Dense layers. Unlike the authors' code (docs/recipes.md section 5,
defect 4), Q/K/V take their alpha from the `sparsity` collection like every
other layer.

Module paths: patch_embed, patch_norm, stage_{i}/merge/{reduction,norm}
(i > 0), stage_{i}/block_{j}/{attn,norm1,mlp,norm2}, norm, head.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pgf.models.common import Mlp
from pgf.models.common import compute_dtype
from pgf.models.common import drop_path
from pgf.sparsity import SparseConv
from pgf.sparsity import SparseDense
from pgf.sparsity import SparseDenseGeneral
from pgf.sparsity import SparsityPlan

# Role -> regex searched in '/'-joined parameter paths (pgf.config_lib reads it
# when sparsity.<role>.layers is ''). Every block, nothing else: not the
# position-bias MLP (attn/cpb_mlp_*), not patch merging, embedding or head.
TASKS = ('classification',)  # The config.task values this model trains for.

SPARSITY_LAYERS = {
    'ff': r'block_\d+/mlp/(wi|wo)/kernel$',
    'q': r'block_\d+/attn/query/kernel$',
    'k': r'block_\d+/attn/key/kernel$',
    'v': r'block_\d+/attn/value/kernel$',
    'o': r'block_\d+/attn/out/kernel$',
}

# (embed_dim, depths, num_heads); timm swinv2_{tiny,small,base}_window8_256.
# 'mu' is a tiny model for CPU tests (32x32 input, window 4).
VARIANTS = {
    'T': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    'S': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    'B': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    'mu': dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
}

PATCH_SIZE = 4
# timm: trunc_normal_(std=.02) on every Linear (bounds +-2 absolute, so in
# effect a plain normal); biases zero.
_LINEAR_INIT = nn.initializers.truncated_normal(stddev=0.02)
_LOGIT_SCALE_MAX = math.log(100.)  # timm: clamp(max=log(1 / 0.01)).
_LN_EPS = 1e-5  # torch.nn.LayerNorm default.


def _layer_norm(name: str, dtype: Any, *, zero: bool = False) -> nn.LayerNorm:
  """LayerNorm over 'embed'; `zero` starts scale and bias at 0 (V2 res-post-
  norm: timm's `_init_respostnorm`, so every block starts as the identity)."""
  scale_init = (nn.initializers.zeros_init() if zero
                else nn.initializers.ones_init())
  return nn.LayerNorm(
      epsilon=_LN_EPS, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(scale_init, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ('embed',)))


def window_and_shift(resolution: Sequence[int], window_size: int
                     ) -> tuple[tuple[int, int], tuple[int, int]]:
  """The window and shift of a stage's shifted blocks (timm's rule).

  Along each axis the window is clamped to the feature map, and a map not
  larger than the window is not shifted (the whole map is one window).
  Returns ((window_h, window_w), (shift_h, shift_w)).
  """
  window = tuple(min(r, window_size) for r in resolution)
  shift = tuple(0 if r <= w else w // 2 for r, w in zip(resolution, window))
  return window, shift


def relative_coords_table(window: Sequence[int]) -> np.ndarray:
  """Log-spaced relative coordinates, (2 Wh - 1, 2 Ww - 1, 2) (paper eq. 4).

  Coordinates are scaled to [-8, 8] and mapped by sign(x) log2(1 + |x|) / 3
  (timm, pretrained_window_size=0). A constant, not a parameter. A window of
  width 1 (a 1-wide map) has the single offset 0 (timm divides 0 by 0).
  """
  axes = [np.arange(-(w - 1), w, dtype=np.float64) / max(w - 1, 1) * 8
          for w in window]
  table = np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1)
  table = np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8)
  return table.astype(np.float32)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
  """(N, N) index into the flattened coordinates table, N = Wh Ww."""
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij'))
  coords = coords.reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
  return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def window_partition(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """(B, H, W, C) -> (B, nW, Wh Ww, C); windows in row-major order."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(x: jax.Array, window: Sequence[int],
                   resolution: Sequence[int]) -> jax.Array:
  """(B, nW, Wh Ww, C) -> (B, H, W, C); the inverse of window_partition."""
  b, _, _, c = x.shape
  (wh, ww), (h, w) = window, resolution
  x = x.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(resolution: Sequence[int], window: Sequence[int],
                        shift: Sequence[int]) -> np.ndarray | None:
  """Which tokens of each window may attend to which, (nW, N, N) bool.

  After the cyclic shift the last row and column of windows hold tokens from
  opposite edges of the map; the map is cut into up to 3 x 3 regions (timm's
  slices) and only tokens of the same region attend to each other. None when
  there is no shift.
  """
  if not any(shift):
    return None
  labels = np.zeros(tuple(resolution), np.int32)
  cuts = [((0, -w), (-w, -s), (-s, None)) for w, s in zip(window, shift)]
  count = 0
  for hs, he in cuts[0]:
    for ws, we in cuts[1]:
      labels[hs:he, ws:we] = count
      count += 1
  windows = np.asarray(window_partition(labels[None, ..., None], window))[0]
  windows = windows[..., 0]  # (nW, N)
  return windows[:, :, None] == windows[:, None, :]


class WindowAttention(nn.Module):
  """(Shifted) window multi-head attention, V2: cosine + continuous bias.

  Input and output (B, H, W, C). The map is rolled by -shift, cut into
  windows, attended within each window (masked across the wrap-around
  regions), and rolled back.

  Attributes:
    num_heads: attention heads; C must be divisible by it.
    window: (Wh, Ww); must divide (H, W).
    shift: (Sh, Sw) cyclic shift; (0, 0) for plain windows.
  """

  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'{self.name}: embed dim {c} is not divisible by '
                       f'{self.num_heads} heads.')
    if h % self.window[0] or w % self.window[1]:
      raise ValueError(f'{self.name}: window {self.window} does not tile the '
                       f'{h}x{w} feature map.')
    heads, head_dim = self.num_heads, c // self.num_heads

    if any(self.shift):
      x = jnp.roll(x, (-self.shift[0], -self.shift[1]), axis=(1, 2))
    x = window_partition(x, self.window)  # (B, nW, N, C)

    def proj(name, use_bias=True):
      # timm: one qkv Linear without bias plus q_bias and v_bias (k has no
      # bias); separate layers here so each can get its own N:M pattern.
      return SparseDenseGeneral(
          features=(heads, head_dim), use_bias=use_bias, dtype=self.dtype,
          kernel_init=_LINEAR_INIT, kernel_axes=('embed', 'heads', 'kv'),
          sparsity=self.sparsity, name=name)

    names = ('batch', None, 'length', 'heads', 'kv')
    q = nn.with_logical_constraint(proj('query')(x), names)
    k = nn.with_logical_constraint(proj('key', use_bias=False)(x), names)
    v = nn.with_logical_constraint(proj('value')(x), names)

    # Scaled cosine attention: cos(q, k) * exp(min(logit_scale, log 100)).
    def unit(t):  # torch F.normalize: t / max(|t|, 1e-12).
      t = t.astype(jnp.float32)
      norm = jnp.linalg.norm(t, axis=-1, keepdims=True)
      return t / jnp.maximum(norm, 1e-12)
    logit_scale = self.param(
        'logit_scale', nn.with_logical_partitioning(
            nn.initializers.constant(math.log(10.)), ('heads',)),
        (heads,), jnp.float32)
    scale = jnp.exp(jnp.minimum(logit_scale, _LOGIT_SCALE_MAX))
    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', unit(q), unit(k))
    logits = logits * scale[:, None, None]

    # Continuous position bias: MLP(2 -> 512 -> heads) on the constant
    # log-spaced table, gathered per token pair, 16 * sigmoid.
    table = jnp.asarray(relative_coords_table(self.window))
    hidden = nn.Dense(
        512, name='cpb_mlp_0', kernel_init=nn.with_logical_partitioning(
            _LINEAR_INIT, (None, 'mlp')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               ('mlp',)))(table)
    bias = nn.Dense(
        heads, use_bias=False, name='cpb_mlp_1',
        kernel_init=nn.with_logical_partitioning(
            _LINEAR_INIT, ('mlp', 'heads')))(nn.relu(hidden))
    bias = bias.reshape(-1, heads)[relative_position_index(self.window)]
    logits = logits + 16 * jax.nn.sigmoid(bias).transpose(2, 0, 1)

    mask = shifted_window_mask((h, w), self.window, self.shift)
    if mask is not None:
      # timm adds -100, which need not mask when logits reach 116
      # (scale <= 100, bias <= 16); pgf masks exactly.
      logits = jnp.where(jnp.asarray(mask)[None, :, None], logits,
                         jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bwhqk,bwkhd->bwqhd', probs, v.astype(self.dtype))
    out = nn.with_logical_constraint(out, names)
    out = SparseDenseGeneral(
        features=c, axis=(-2, -1), dtype=self.dtype, kernel_init=_LINEAR_INIT,
        kernel_axes=('heads', 'kv', 'embed'), sparsity=self.sparsity,
        name='out')(out)
    out = window_reverse(out, self.window, (h, w))
    if any(self.shift):
      out = jnp.roll(out, self.shift, axis=(1, 2))
    return out


class SwinBlock(nn.Module):
  """x + drop_path(norm1(attn(x))), then x + drop_path(norm2(mlp(x)))."""

  num_heads: int
  window: tuple[int, int]
  shift: tuple[int, int] = (0, 0)
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    b, h, w, c = x.shape
    names = ('batch', 'length', 'embed')
    y = WindowAttention(self.num_heads, self.window, self.shift,
                        dtype=self.dtype, sparsity=self.sparsity,
                        name='attn')(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = _layer_norm('norm1', self.dtype, zero=True)(y)
    x = x.reshape(b, h * w, c) + drop_path(
        y.reshape(b, h * w, c), self.drop_path, train)
    x = nn.with_logical_constraint(x, names)
    y = Mlp(int(c * self.mlp_ratio), self.dropout, dtype=self.dtype,
            kernel_init=_LINEAR_INIT, sparsity=self.sparsity,
            name='mlp')(x, train)
    y = _layer_norm('norm2', self.dtype, zero=True)(y)
    x = nn.with_logical_constraint(
        x + drop_path(y, self.drop_path, train), names)
    return x.reshape(b, h, w, c)


class PatchMerging(nn.Module):
  """2x2 neighbours -> 4C -> Linear(4C, 2C, no bias) -> LayerNorm(2C)."""

  dtype: Any = jnp.float32
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f'{self.name}: cannot merge 2x2 patches of a {h}x{w} '
                       'feature map; use an input size with even maps.')
    # timm's order of the 4C features: (w offset, h offset, C).
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    x = x.reshape(b, h // 2, w // 2, 4 * c)
    x = SparseDense(2 * c, use_bias=False, dtype=self.dtype,
                    kernel_init=_LINEAR_INIT, kernel_axes=(None, 'embed'),
                    sparsity=self.sparsity, name='reduction')(x)
    return _layer_norm('norm', self.dtype)(x)


class SwinStage(nn.Module):
  """Optional patch merging, then `depth` blocks; odd blocks are shifted."""

  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  drop_path: tuple[float, ...] = ()
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.downsample:
      x = PatchMerging(dtype=self.dtype, sparsity=self.sparsity,
                       name='merge')(x)
    window, shift = window_and_shift(x.shape[1:3], self.window_size)
    block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else (
        SwinBlock)
    for j in range(self.depth):
      x = block(self.num_heads, window, shift if j % 2 else (0, 0),
                mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                drop_path=self.drop_path[j], dtype=self.dtype,
                sparsity=self.sparsity, name=f'block_{j}')(x, train)
    return x


class SwinV2(nn.Module):
  """SwinV2 classifier: images (B, H, W, 3) -> logits (B, num_classes).

  Attributes:
    num_classes: classes of the head.
    embed_dim: channels of stage 0; stage i has embed_dim * 2^i.
    depths: blocks per stage.
    num_heads: heads per stage.
    window_size: attention window (clamped to small feature maps).
    mlp_ratio: MLP hidden size / embed dim.
    dropout: dropout after the attention output and inside the MLP.
    drop_path: stochastic depth of the last block; it rises linearly from 0
      over the blocks (timm).
    dtype: compute dtype; parameters stay float32.
    remat: rematerialise every block in the backward pass.
    sparsity: the static SparsityPlan, or None for a dense model.
  """

  num_classes: int
  embed_dim: int
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int = 8
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f'depths {self.depths} and num_heads {self.num_heads} '
                       'must have one entry per stage.')
    if images.shape[1] % PATCH_SIZE or images.shape[2] % PATCH_SIZE:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by '
                       f'the patch size {PATCH_SIZE}.')
    x = SparseConv(
        self.embed_dim, (PATCH_SIZE, PATCH_SIZE), strides=(PATCH_SIZE,) * 2,
        dtype=self.dtype, kernel_axes=(None, None, 'channels', 'embed'),
        sparsity=self.sparsity, name='patch_embed')(images)
    x = _layer_norm('patch_norm', self.dtype)(x)
    rates = np.linspace(0.0, self.drop_path, sum(self.depths)).tolist()
    start = 0
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      x = SwinStage(
          depth, heads, self.window_size, downsample=i > 0,
          mlp_ratio=self.mlp_ratio, dropout=self.dropout,
          drop_path=tuple(rates[start:start + depth]), dtype=self.dtype,
          remat=self.remat, sparsity=self.sparsity, name=f'stage_{i}')(
              x, train)
      start += depth
    x = _layer_norm('norm', self.dtype)(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
    return nn.Dense(
        self.num_classes, dtype=self.dtype, name='head',
        kernel_init=nn.with_logical_partitioning(_LINEAR_INIT,
                                                 ('embed', 'classes')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               ('classes',)))(x)


def decode_variant(variant: str) -> dict[str, Any]:
  """'T' | 'S' | 'B' | 'mu' -> dict(embed_dim, depths, num_heads)."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown SwinV2 variant {variant!r}; choose one of '
                     f'{tuple(VARIANTS)}.')
  return dict(VARIANTS[variant])


def build(model_config: ml_collections.ConfigDict, *, num_classes: int,
          sparsity: SparsityPlan | None) -> SwinV2:
  """The model of `config.model` (keys: variant, window_size, dropout,
  drop_path, dtype, remat)."""
  m = model_config
  if m.window_size < 1:
    raise ValueError(f'model.window_size={m.window_size} must be >= 1.')
  return SwinV2(num_classes=num_classes, window_size=m.window_size,
                dropout=m.dropout, drop_path=m.drop_path,
                dtype=compute_dtype(m.dtype), remat=m.remat, sparsity=sparsity,
                **decode_variant(m.variant))
