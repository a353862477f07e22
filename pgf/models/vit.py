"""Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929), Flax Linen.

Module names follow big_vision (`Transformer/encoderblock_{i}`, 'query',
'key', 'value', 'out', 'pos_embedding', 'cls', 'head'); the parameterisation
is exactly timm's `vit_{tiny,small,base,large}_patch{16,32}_224`, so the
parameter counts are timm's (at 224x224, 1000 classes, pool='tok': Ti/16
5,717,416; S/16 22,050,664; B/16 86,567,656; B/32 88,224,232; L/16
304,326,632):

  images (B, H, W, C)
    -> embedding: Conv p x p, stride p, with bias        (B, H/p, W/p, D)
    -> flatten                                            (B, N, D), N = HW/p^2
    -> pool='tok': prepend 'cls' (1, 1, D)                (B, N + 1, D)
    -> + 'pos_embedding' (1, N(+1), D), dropout
    -> Transformer: depth pre-norm blocks
         x = x + drop_path(dropout(attn(norm1(x))))
         x = x + drop_path(mlp(norm2(x)))
       then 'encoder_norm'                                (B, N(+1), D)
    -> pool='tok': token 0 | 'gap': mean over tokens      (B, D)
    -> head: Dense, kernel initialised to zeros           (B, num_classes)

Like timm the position embedding covers the class token (big_vision adds it
before prepending the token: D fewer parameters). With pool='gap' timm
normalises after pooling (fc_norm) and big_vision before; pgf normalises
before (same parameter count). LayerNorm eps is 1e-6, GELU is the exact erf
form (torch nn.GELU, timm); big_vision uses the tanh approximation.

Sparse-capable layers (pgf.sparsity), in every block: Q, K, V
('attn/query', 'attn/key', 'attn/value': kernels (D, heads, head_dim), N:M
groups along D), the attention output ('attn/out': kernel (heads, head_dim,
D), groups over heads x head_dim jointly) and the MLP ('mlp/wi' (D, mlp),
'mlp/wo' (mlp, D)). The patch embedding is a SparseConv that no default
regex selects. The head is a plain Dense.

Dropout (model.dropout) is applied to the embeddings, after the attention
output projection, after the GELU and after mlp/wo (timm's pos_drop,
proj_drop, drop1, drop2). Stochastic depth (model.drop_path) drops whole
residual branches per example, at a rate rising linearly from 0 in the first
block to drop_path in the last (timm). Both draw from the 'dropout' rng and
are active only with train=True.
"""

from __future__ import annotations

import re
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
from pgf.sparsity import SparseDenseGeneral
from pgf.sparsity import SparsityPlan

# Role -> regex searched in '/'-joined parameter paths (pgf.config_lib reads it
# when sparsity.<role>.layers is ''). Paths look like
# 'Transformer/encoderblock_3/mlp/wi/kernel' and
# 'Transformer/encoderblock_3/attn/out/kernel'
# (no other layer has 'mlp' or 'attn' as a parent).
TASKS = ('classification',)  # The config.task values this model trains for.

SPARSITY_LAYERS = {
    'ff': r'/mlp/(wi|wo)/kernel$',
    'q': r'/attn/query/kernel$',
    'k': r'/attn/key/kernel$',
    'v': r'/attn/value/kernel$',
    'o': r'/attn/out/kernel$',
}

# name -> (width, depth, mlp_dim, num_heads). timm/big_vision sizes; 'mu',
# 'mini', 'tiny' and 'wide' are small models for CPU tests, the embedded
# default and the Fashion-MNIST study (CPU and GPU scale).
VARIANTS = {
    'mu': dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    'mini': dict(width=64, depth=2, mlp_dim=256, num_heads=4),
    'tiny': dict(width=64, depth=4, mlp_dim=256, num_heads=4),
    'wide': dict(width=256, depth=4, mlp_dim=1024, num_heads=4),
    'Ti': dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'B': dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'H': dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
}

_LN_EPS = 1e-6
_XAVIER = nn.initializers.xavier_uniform()  # big_vision's Dense kernels.
_NAMES = ('batch', 'length', 'embed')


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=_LN_EPS, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ('embed',)))


class MultiHeadAttention(nn.Module):
  """Self-attention on (B, L, D) with separate Q, K, V and output layers.

  q, k, v: (B, L, heads, head_dim); logits (B, heads, L, L) in `dtype`,
  softmax in float32; output projection (heads, head_dim) -> D.
  """

  num_heads: int
  dtype: Any = jnp.float32
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'{self.name}: width {width} is not divisible by '
                       f'{self.num_heads} heads.')
    head_dim = width // self.num_heads

    def proj(name):
      return SparseDenseGeneral(
          features=(self.num_heads, head_dim), dtype=self.dtype,
          kernel_init=_XAVIER, kernel_axes=('embed', 'heads', 'kv'),
          sparsity=self.sparsity, name=name)

    names = ('batch', 'length', 'heads', 'kv')
    q = nn.with_logical_constraint(proj('query')(x), names)
    k = nn.with_logical_constraint(proj('key')(x), names)
    v = nn.with_logical_constraint(proj('value')(x), names)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(self.dtype), v)
    out = nn.with_logical_constraint(out, names)
    return SparseDenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, kernel_init=_XAVIER,
        kernel_axes=('heads', 'kv', 'embed'), sparsity=self.sparsity,
        name='out')(out)


class EncoderBlock(nn.Module):
  """Pre-norm block on (B, L, D): attention then MLP, both residual."""

  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = _layer_norm('norm1', self.dtype)(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype,
                           sparsity=self.sparsity, name='attn')(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    x = nn.with_logical_constraint(
        x + drop_path(y, self.drop_path, train), _NAMES)
    y = _layer_norm('norm2', self.dtype)(x)
    y = Mlp(self.mlp_dim, self.dropout, dtype=self.dtype, kernel_init=_XAVIER,
            bias_init=nn.initializers.normal(stddev=1e-6),  # big_vision.
            sparsity=self.sparsity, name='mlp')(y, train)
    return nn.with_logical_constraint(
        x + drop_path(y, self.drop_path, train), _NAMES)


class Transformer(nn.Module):
  """`depth` EncoderBlocks and the final LayerNorm, on (B, L, D)."""

  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    # The sparse layers mask their kernels inside the block, so under remat
    # the masks are recomputed in the backward pass and stay exact.
    block = (nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat
             else EncoderBlock)
    rates = np.linspace(0.0, self.drop_path, self.depth).tolist()
    for i in range(self.depth):
      x = block(self.mlp_dim, self.num_heads, dropout=self.dropout,
                drop_path=rates[i], dtype=self.dtype, sparsity=self.sparsity,
                name=f'encoderblock_{i}')(x, train)
    return _layer_norm('encoder_norm', self.dtype)(x)


class ViT(nn.Module):
  """ViT classifier: images (B, H, W, C) -> float32 logits (B, num_classes).

  Attributes:
    num_classes: classes of the head.
    patch_size: side p of the square patches; must divide H and W.
    width: token width D.
    depth: number of encoder blocks.
    mlp_dim: hidden size of the MLPs.
    num_heads: attention heads; must divide D.
    pool: 'tok' (class token) or 'gap' (mean over the patch tokens).
    dropout: dropout rate (embeddings, attention output, MLP).
    drop_path: stochastic depth rate of the last block (linear from 0).
    dtype: compute dtype; parameters stay float32, logits are float32.
    remat: rematerialise each block in the backward pass.
    sparsity: the static SparsityPlan, or None for a dense model.
  """

  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = 'tok'
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    if self.pool not in ('tok', 'gap'):
      raise ValueError(f"pool={self.pool!r} is not allowed; choose 'tok' or "
                       "'gap'.")
    p = self.patch_size
    if images.shape[1] % p or images.shape[2] % p:
      raise ValueError(f'image size {images.shape[1:3]} is not divisible by '
                       f'the patch size {p}.')
    x = SparseConv(
        self.width, (p, p), strides=(p, p), dtype=self.dtype,
        kernel_axes=(None, None, 'channels', 'embed'),
        sparsity=self.sparsity, name='embedding')(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == 'tok':
      cls = self.param('cls', nn.with_logical_partitioning(
          nn.initializers.zeros_init(), (None, None, 'embed')),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, 'length', 'embed')),
                     (1, x.shape[1], c), jnp.float32)
    x = x + pos.astype(x.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.with_logical_constraint(x, _NAMES)

    x = Transformer(
        self.depth, self.mlp_dim, self.num_heads, dropout=self.dropout,
        drop_path=self.drop_path, dtype=self.dtype, remat=self.remat,
        sparsity=self.sparsity, name='Transformer')(x, train)

    x = x[:, 0] if self.pool == 'tok' else x.mean(axis=1)
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, name='head',
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ('embed', 'classes')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                               ('classes',)))(x)
    return logits.astype(jnp.float32)


def decode_variant(variant: str) -> dict[str, Any]:
  """'B/16' -> dict(width, depth, mlp_dim, num_heads, patch_size).

  The name is one of VARIANTS (Ti, S, B, L, H, and the small mu and tiny);
  the patch size after '/' is any positive integer.
  """
  match = re.fullmatch(r'([A-Za-z]+)/(\d+)', variant)
  if not match or match.group(1) not in VARIANTS or int(match.group(2)) < 1:
    raise ValueError(f'unknown ViT variant {variant!r}; expected NAME/PATCH '
                     f'with NAME one of {tuple(VARIANTS)} and PATCH a '
                     "positive integer, e.g. 'B/16'.")
  return dict(VARIANTS[match.group(1)], patch_size=int(match.group(2)))


def build(model_config: ml_collections.ConfigDict, *, num_classes: int,
          sparsity: SparsityPlan | None) -> ViT:
  """The model of `config.model` (keys: variant, pool, dropout, drop_path,
  dtype, remat)."""
  m = model_config
  if m.pool not in ('tok', 'gap'):
    raise ValueError(f"model.pool={m.pool!r} is not allowed; choose 'tok' or "
                     "'gap'.")
  return ViT(num_classes=num_classes, pool=m.pool, dropout=m.dropout,
             drop_path=m.drop_path, dtype=compute_dtype(m.dtype), remat=m.remat,
             sparsity=sparsity, **decode_variant(m.variant))
