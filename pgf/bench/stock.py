"""Stock Flax models of pgf's shapes: the benchmark's independent floor.

`StockViT` and `StockT5` are written the way a plain flax.linen user would
write a ViT and a T5 v1.1-like encoder-decoder: `nn.Conv`, `nn.Dense`,
`nn.DenseGeneral`, `nn.MultiHeadDotProductAttention`, `nn.LayerNorm`,
`nn.RMSNorm`, with no pgf layer, sparsity collection, logical sharding or
metrics. Only the sizes come from pgf (the variant tables), so that the
parameter count matches pgf's model; `make_stock_step` trains them with
`value_and_grad` and the run's own optax chain (pgf's dense chain: clipping,
AdamW or Adafactor; its sparse transforms are identities for a dense run).

Differences from pgf's models, none of which changes the matmul shapes:
StockViT computes the attention softmax in the compute dtype (pgf: float32);
StockT5 uses clipped relative-position buckets (pgf: T5's log buckets), a
padding and causal mask but no packing segments (the benchmark's batches are
one segment per row), and flax's RMSNorm.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf.models import common as model_common
from pgf.models import t5 as pgf_t5
from pgf.models import vit as pgf_vit

_BUCKETS = 32


class StockViTBlock(nn.Module):
  """Pre-norm encoder block: attention and MLP, dropout and drop-path."""

  mlp_dim: int
  num_heads: int
  dropout: float
  drop_path: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    det = not train

    def drop_path(y):
      # Stochastic depth: one Bernoulli draw per example.
      return nn.Dropout(self.drop_path, broadcast_dims=(1, 2),
                        deterministic=det)(y)

    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, deterministic=True)(y, y)
    y = nn.Dropout(self.dropout, deterministic=det)(y)
    x = x + drop_path(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype)(y)
    y = nn.Dropout(self.dropout, deterministic=det)(
        nn.gelu(y, approximate=False))
    y = nn.Dropout(self.dropout, deterministic=det)(
        nn.Dense(x.shape[-1], dtype=self.dtype)(y))
    return x + drop_path(y)


class StockViT(nn.Module):
  """images (B, H, W, C) -> float32 logits (B, num_classes)."""

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

  @nn.compact
  def __call__(self, images, *, train: bool):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), dtype=self.dtype)(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == 'tok':
      cls = self.param('cls', nn.initializers.zeros_init(), (1, 1, c))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype),
                           x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02),
                     (1, x.shape[1], c))
    x = nn.Dropout(self.dropout, deterministic=not train)(
        x + pos.astype(x.dtype))
    rates = np.linspace(0.0, self.drop_path, self.depth)
    for i in range(self.depth):
      x = StockViTBlock(self.mlp_dim, self.num_heads, self.dropout,
                        float(rates[i]), self.dtype)(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    x = x[:, 0] if self.pool == 'tok' else x.mean(axis=1)
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


def _bucket(q_len: int, k_len: int, bidirectional: bool) -> np.ndarray:
  """Clipped relative distances as bucket ids [q_len, k_len] (static)."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  if bidirectional:
    return np.clip(rel, -_BUCKETS // 2, _BUCKETS // 2 - 1) + _BUCKETS // 2
  return np.clip(-rel, 0, _BUCKETS - 1)


class StockAttention(nn.Module):
  """Multi-head attention without biases, an optional additive bias."""

  num_heads: int
  head_dim: int
  dtype: Any

  @nn.compact
  def __call__(self, xq, xkv, mask, bias=None):
    proj = functools.partial(nn.DenseGeneral, (self.num_heads, self.head_dim),
                             use_bias=False, dtype=self.dtype)
    q, k, v = proj()(xq), proj()(xkv), proj()(xkv)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e10)).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return nn.DenseGeneral(xq.shape[-1], axis=(-2, -1), use_bias=False,
                           dtype=self.dtype)(out)


class StockT5Layer(nn.Module):
  """Pre-RMSNorm layer: self-attention, [cross-attention,] gated-GELU MLP."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  dtype: Any
  decoder: bool

  @nn.compact
  def __call__(self, x, mask, bias, encoded=None, cross_mask=None):
    attn = functools.partial(StockAttention, self.num_heads, self.head_dim,
                             self.dtype)
    norm = functools.partial(nn.RMSNorm, epsilon=1e-6, dtype=self.dtype)
    y = norm()(x)
    x = x + attn()(y, y, mask, bias)
    if self.decoder:
      x = x + attn()(norm()(x), encoded, cross_mask)
    y = norm()(x)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    h = nn.gelu(dense(self.mlp_dim)(y)) * dense(self.mlp_dim)(y)
    return x + dense(x.shape[-1])(h)


class StockT5(nn.Module):
  """(encoder tokens, decoder tokens) -> float32 logits [B, Lt, vocab]."""

  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, enc_tokens, dec_tokens, *, train: bool):
    del train  # T5 v1.1 pretraining has no dropout (configs/t5_base.py).
    embed = nn.Embed(self.vocab_size, self.emb_dim, dtype=self.dtype)
    layer = functools.partial(StockT5Layer, self.num_heads, self.head_dim,
                              self.mlp_dim, self.dtype)

    def rel_bias(name, q_len, k_len, bidirectional):
      table = self.param(name, nn.initializers.normal(0.1),
                         (self.num_heads, _BUCKETS))
      bias = table[:, _bucket(q_len, k_len, bidirectional)]
      return bias[None].astype(jnp.float32)

    valid = enc_tokens > 0
    enc_mask = (valid[:, None, :, None] & valid[:, None, None, :])
    li, lt = enc_tokens.shape[1], dec_tokens.shape[1]
    x = embed(enc_tokens)
    bias = rel_bias('encoder_relpos', li, li, True)
    for _ in range(self.num_encoder_layers):
      x = layer(decoder=False)(x, enc_mask, bias)
    encoded = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype)(x)
    causal = jnp.tril(jnp.ones((lt, lt), bool))[None, None]
    cross = valid[:, None, None, :]
    y = embed(dec_tokens)
    bias = rel_bias('decoder_relpos', lt, lt, False)
    for _ in range(self.num_decoder_layers):
      y = layer(decoder=True)(y, causal, bias, encoded, cross)
    y = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype)(y)
    return nn.Dense(self.vocab_size, use_bias=False, dtype=jnp.float32)(y)


def build(config) -> nn.Module:
  """The stock model of `config.model` (vit or t5), same sizes as pgf's."""
  m = config.model
  dtype = model_common.compute_dtype(m.dtype)
  if m.name == 'vit':
    return StockViT(num_classes=m.num_classes, pool=m.pool,
                    dropout=m.dropout, drop_path=m.drop_path, dtype=dtype,
                    **pgf_vit.decode_variant(m.variant))
  if m.name == 't5':
    return StockT5(vocab_size=m.vocab_size, dtype=dtype,
                   **pgf_t5.decode_variant(m.variant))
  raise ValueError(f'no stock model for model.name={m.name!r}.')


def _loss(config, outputs, batch) -> jax.Array:
  """The task's training loss written with optax alone."""
  if config.model.name == 't5':
    logits = outputs.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['decoder_target_tokens'])
    loss += config.z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    w = batch['decoder_loss_weights']
    return (loss * w).sum() / jnp.maximum(w.sum(), 1.0)
  if config.loss == 'sigmoid_xent':
    return optax.sigmoid_binary_cross_entropy(outputs, batch['label']).mean()
  return optax.softmax_cross_entropy(outputs, batch['label']).mean()


def _inputs(config, batch) -> tuple:
  if config.model.name == 't5':
    return batch['encoder_input_tokens'], batch['decoder_input_tokens']
  return (batch['image'],)


def init_params(config, batch, seed: int = 0):
  model = build(config)
  small = jax.tree.map(lambda x: x[:1], batch)
  return jax.jit(lambda r: model.init(r, *_inputs(config, small),
                                      train=False)['params'])(
                                          jax.random.key(seed))


def make_stock_step(config, tx) -> Callable:
  """A jitted, donating step (params, opt_state, step, batch) -> (params,
  opt_state, step, loss) of the stock model with optax chain `tx` (called
  with step=, as pgf's chain needs)."""
  model = build(config)

  def step_fn(params, opt_state, step, batch):
    rng = jax.random.fold_in(jax.random.key(1), step)

    def loss_fn(p):
      out = model.apply({'params': p}, *_inputs(config, batch), train=True,
                        rngs={'dropout': rng})
      return _loss(config, out, batch)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, step=step)
    return optax.apply_updates(params, updates), opt_state, step + 1, loss

  return jax.jit(step_fn, donate_argnums=(0, 1))
