"""T5 v1.1 encoder-decoder (T5X / flaxformer `t5_1_1`) with N:M-capable kernels.

Architecture, parameter names and initialisers follow the T5X reference
implementation (google-research/t5x, t5x/examples/t5/network.py and
layers.py, the 'T5.1.1' network whose parameter tree T5X and flaxformer
`t5_1_1` checkpoints use):

* pre-norm blocks with T5 LayerNorm (RMSNorm: scale only, no mean, eps 1e-6);
* gated-GELU feed-forward 'mlp/wi_0', 'mlp/wi_1' -> 'mlp/wo', no biases
  anywhere;
* attention without 1/sqrt(head_dim) on the logits: T5 folds it into the
  query initialiser (layers.py: "T5 does not explicitly rescale the attention
  logits by 1/sqrt(depth_kq)! This is folded into the initializers");
* relative position buckets (32 buckets, max distance 128), bidirectional in
  the encoder and causal in the decoder, one table per stack
  ('encoder/relpos_bias', 'decoder/relpos_bias') shared by its layers;
* untied input embedding 'token_embedder' (shared by both stacks) and output
  projection 'decoder/logits_dense' computed in float32, so no rescaling of
  the logits by d_model^-0.5 (that is only done with tied embeddings).

Initialisers (T5X layers.py / network.py):
  token_embedder       normal(stddev=1.0)
  query                variance_scaling(1, fan_in, normal) / sqrt(head_dim)
  key, value, out      variance_scaling(1, fan_in, normal); `out` is
                       initialised as a (heads * head_dim, embed) matrix
  mlp wi_0, wi_1, wo   variance_scaling(1, fan_in, truncated_normal)
  logits_dense         variance_scaling(1, fan_in, truncated_normal)
  relpos_bias          variance_scaling(1, fan_avg, uniform), (heads, buckets)
  norm scales          ones

Every projection is a `SparseDenseGeneral` (dense unless the plan matches
its path; `SPARSITY_LAYERS` gives the default regex of each role, and none
selects 'decoder/logits_dense'). The embedding, norms and relative-position
tables are never sparse.

Masks: token id 0 is padding. Encoder self-attention and encoder-decoder
attention mask padded encoder tokens (tokens > 0) and, with packing, pairs of
different segments. Decoder self-attention is causal (plus segments): the
decoder input starts with 0 (BOS = pad = 0), so decoder padding cannot be
read from its tokens; trailing padding is never seen by earlier positions
under the causal mask, and its logits carry zero loss weight. With packing,
relative positions come from `*_positions`; within a segment they equal the
index differences, so packed and separate examples give the same logits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pgf.models.common import compute_dtype
from pgf.sparsity import SparseDenseGeneral
from pgf.sparsity import SparsityPlan

# Role -> regex searched in '/'-joined parameter paths, e.g.
# 'encoder/layers_0/attention/query/kernel',
# 'decoder/layers_3/self_attention/out/kernel',
# 'decoder/layers_3/encoder_decoder_attention/key/kernel',
# 'decoder/layers_3/mlp/wo/kernel'.
TASKS = ('span_corruption',)  # The config.task values this model trains for.

SPARSITY_LAYERS = {
    'ff': r'/mlp/(wi_0|wi_1|wo)/kernel$',
    'q': r'attention/query/kernel$',
    'k': r'attention/key/kernel$',
    'v': r'attention/value/kernel$',
    'o': r'attention/out/kernel$',
}

NUM_BUCKETS = 32
MAX_DISTANCE = 128
_MASKED = -1e10  # Attention logit of masked pairs (as T5X).

# T5 v1.1 sizes (T5X t5x/examples/t5/t5_1_1/{small,base,large}.gin); 'mu' is
# a tiny model for CPU tests, 'nano' and 'micro' the language study's models
# (CPU and GPU scale).
VARIANTS = {
    'mu': dict(emb_dim=32, mlp_dim=64, num_encoder_layers=2,
               num_decoder_layers=2, num_heads=2, head_dim=16),
    'nano': dict(emb_dim=64, mlp_dim=256, num_encoder_layers=2,
                 num_decoder_layers=2, num_heads=4, head_dim=16),
    'micro': dict(emb_dim=128, mlp_dim=512, num_encoder_layers=4,
                  num_decoder_layers=4, num_heads=4, head_dim=32),
    'small': dict(emb_dim=512, mlp_dim=1024, num_encoder_layers=8,
                  num_decoder_layers=8, num_heads=6, head_dim=64),
    'base': dict(emb_dim=768, mlp_dim=2048, num_encoder_layers=12,
                 num_decoder_layers=12, num_heads=12, head_dim=64),
    'large': dict(emb_dim=1024, mlp_dim=2816, num_encoder_layers=24,
                  num_decoder_layers=24, num_heads=16, head_dim=64),
}



def decode_variant(variant: str) -> dict[str, int]:
  """Sizes of a T5 v1.1 variant: emb_dim, mlp_dim, layers, heads, head_dim."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown T5 variant {variant!r}; choose one of '
                     f'{tuple(VARIANTS)}.')
  return dict(VARIANTS[variant])


def relative_position_bucket(relative_position, *, bidirectional: bool,
                             num_buckets: int = NUM_BUCKETS,
                             max_distance: int = MAX_DISTANCE):
  """T5's bucket of `relative_position = key_position - query_position`.

  As T5X `RelativePositionBiases._relative_position_bucket`: bidirectional
  uses half the buckets per direction (keys after the query in the upper
  half); causal maps every key at or after the query to bucket 0. Distances
  below `num_buckets // 2` (per direction) get their own bucket, larger ones
  logarithmically spaced buckets up to `max_distance`, past which all share
  the last bucket. Works on NumPy (static) and JAX (traced) int arrays.
  """
  xp = jnp if isinstance(relative_position, jax.Array) else np
  n = -xp.asarray(relative_position, np.int32)
  ret = xp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(np.int32) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # eps keeps exact powers (n = max_exact * 2^k) in their bucket; n = 0 takes
  # the `is_small` branch, so the log of eps is never used.
  log_ratio = xp.log(n.astype(np.float32) / max_exact
                     + np.finfo(np.float32).eps)
  val_if_large = max_exact + (
      log_ratio / np.float32(np.log(max_distance / max_exact))
      * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = xp.minimum(val_if_large, num_buckets - 1)
  return ret + xp.where(is_small, n, val_if_large)


@dataclasses.dataclass(frozen=True)
class _Dims:
  """What every block needs (hashable, so a valid module attribute)."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  dropout: float
  dtype: Any
  sparsity: SparsityPlan | None


def _constrain(x, names):
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """T5 LayerNorm: x / rms(x) * scale; no mean, no bias; float32 inside."""

  dtype: Any = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(
        nn.initializers.ones_init(), ('embed',)), (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True)
                          + self.epsilon)
    return (y * scale).astype(self.dtype)


class RelativePositionBias(nn.Module):
  """The (heads, buckets) table of one stack -> bias [B|1, H, Lq, Lk]."""

  num_heads: int
  bidirectional: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_positions, k_positions) -> jax.Array:
    table = self.param(
        'rel_embedding', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'),
            ('heads', 'relpos_buckets')),
        (self.num_heads, NUM_BUCKETS), jnp.float32)
    rel = k_positions[:, None, :] - q_positions[:, :, None]  # [B, Lq, Lk]
    bucket = relative_position_bucket(rel, bidirectional=self.bidirectional)
    bias = jnp.take(table.astype(self.dtype), bucket, axis=1)  # [H,B,Lq,Lk]
    return jnp.moveaxis(bias, 0, 1)


class Attention(nn.Module):
  """Multi-head attention with separate query/key/value/out projections."""

  dims: _Dims
  deterministic: bool

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask, bias=None) -> jax.Array:
    d = self.dims
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')

    def query_init(key, shape, dtype=jnp.float32):
      # T5: the 1/sqrt(head_dim) of the logits lives in the query init.
      return kernel_init(key, shape, dtype) * d.head_dim**-0.5

    proj = functools.partial(
        SparseDenseGeneral, features=(d.num_heads, d.head_dim), axis=-1,
        use_bias=False, dtype=d.dtype, kernel_axes=('embed', 'heads', 'kv'),
        sparsity=d.sparsity)
    names = ('batch', 'length', 'heads', 'kv')
    q = _constrain(proj(kernel_init=query_init, name='query')(inputs_q), names)
    k = _constrain(proj(kernel_init=kernel_init, name='key')(inputs_kv), names)
    v = _constrain(proj(kernel_init=kernel_init, name='value')(inputs_kv),
                   names)
    # Logits and softmax in float32 (bfloat16 models too).
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(d.dtype)
    # T5X drops attention weights with one mask shared by all queries.
    probs = nn.Dropout(d.dropout, broadcast_dims=(-2,))(
        probs, deterministic=self.deterministic)
    x = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return SparseDenseGeneral(
        features=inputs_q.shape[-1], axis=(-2, -1), use_bias=False,
        dtype=d.dtype, kernel_init=kernel_init,
        kernel_axes=('heads', 'kv', 'embed'), sparsity=d.sparsity,
        name='out')(x)


class MlpBlock(nn.Module):
  """Gated-GELU feed-forward: wo(gelu(wi_0 x) * wi_1 x)."""

  dims: _Dims
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.dims
    dense = functools.partial(
        SparseDenseGeneral, use_bias=False, dtype=d.dtype,
        kernel_init=nn.initializers.variance_scaling(
            1.0, 'fan_in', 'truncated_normal'),
        sparsity=d.sparsity)
    # T5 v1.1 gin: mlp_activations = ('gelu', 'linear'); flax's tanh gelu.
    h = (nn.gelu(dense(features=d.mlp_dim, kernel_axes=('embed', 'mlp'),
                       name='wi_0')(x))
         * dense(features=d.mlp_dim, kernel_axes=('embed', 'mlp'),
                 name='wi_1')(x))
    h = nn.Dropout(d.dropout, broadcast_dims=(-2,))(
        h, deterministic=self.deterministic)
    h = _constrain(h, ('batch', 'length', 'mlp'))
    return dense(features=x.shape[-1], kernel_axes=('mlp', 'embed'),
                 name='wo')(h)


def _dropout(d: _Dims, x, deterministic: bool):
  # T5X: one dropout mask shared along the length axis.
  return nn.Dropout(d.dropout, broadcast_dims=(-2,))(
      x, deterministic=deterministic)


_ACT = ('batch', 'length', 'embed')


class EncoderLayer(nn.Module):
  dims: _Dims
  deterministic: bool

  @nn.compact
  def __call__(self, x, mask, bias):
    d, det = self.dims, self.deterministic
    y = RMSNorm(d.dtype, name='pre_attention_layer_norm')(x)
    y = Attention(d, det, name='attention')(y, y, mask, bias)
    x = x + _dropout(d, y, det)
    y = RMSNorm(d.dtype, name='pre_mlp_layer_norm')(x)
    y = MlpBlock(d, det, name='mlp')(y)
    return _constrain(x + _dropout(d, y, det), _ACT)


class DecoderLayer(nn.Module):
  dims: _Dims
  deterministic: bool

  @nn.compact
  def __call__(self, x, encoded, self_mask, bias, cross_mask):
    d, det = self.dims, self.deterministic
    y = RMSNorm(d.dtype, name='pre_self_attention_layer_norm')(x)
    y = Attention(d, det, name='self_attention')(y, y, self_mask, bias)
    x = x + _dropout(d, y, det)
    y = RMSNorm(d.dtype, name='pre_cross_attention_layer_norm')(x)
    y = Attention(d, det, name='encoder_decoder_attention')(
        y, encoded, cross_mask)
    x = x + _dropout(d, y, det)
    y = RMSNorm(d.dtype, name='pre_mlp_layer_norm')(x)
    y = MlpBlock(d, det, name='mlp')(y)
    return _constrain(x + _dropout(d, y, det), _ACT)


_RematEncoderLayer = nn.remat(EncoderLayer)
_RematDecoderLayer = nn.remat(DecoderLayer)


class Encoder(nn.Module):
  dims: _Dims
  num_layers: int
  remat: bool

  @nn.compact
  def __call__(self, x, mask, positions, *, deterministic: bool):
    d = self.dims
    bias = RelativePositionBias(d.num_heads, True, d.dtype,
                                name='relpos_bias')(positions, positions)
    x = _dropout(d, x, deterministic)
    layer = _RematEncoderLayer if self.remat else EncoderLayer
    for i in range(self.num_layers):
      x = layer(d, deterministic, name=f'layers_{i}')(x, mask, bias)
    x = RMSNorm(d.dtype, name='encoder_norm')(x)
    return _dropout(d, x, deterministic)


class Decoder(nn.Module):
  dims: _Dims
  num_layers: int
  vocab_size: int
  remat: bool

  @nn.compact
  def __call__(self, y, encoded, self_mask, cross_mask, positions, *,
               deterministic: bool):
    d = self.dims
    bias = RelativePositionBias(d.num_heads, False, d.dtype,
                                name='relpos_bias')(positions, positions)
    y = _dropout(d, y, deterministic)
    layer = _RematDecoderLayer if self.remat else DecoderLayer
    for i in range(self.num_layers):
      y = layer(d, deterministic, name=f'layers_{i}')(
          y, encoded, self_mask, bias, cross_mask)
    y = RMSNorm(d.dtype, name='decoder_norm')(y)
    y = _dropout(d, y, deterministic)
    # Untied output projection in float32 (T5X network.py).
    logits = SparseDenseGeneral(
        features=self.vocab_size, use_bias=False, dtype=jnp.float32,
        kernel_init=nn.initializers.variance_scaling(
            1.0, 'fan_in', 'truncated_normal'),
        kernel_axes=('embed', 'vocab'), sparsity=d.sparsity,
        name='logits_dense')(y)
    return _constrain(logits, ('batch', 'length', 'vocab'))


class Embed(nn.Module):
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return _constrain(x, _ACT)


def _pair_mask(q, k, fn):
  """[B, Lq], [B, Lk] -> [B, 1, Lq, Lk] of fn(q_i, k_j)."""
  return fn(q[:, None, :, None], k[:, None, None, :])


def _positions(positions, tokens):
  if positions is None:
    return np.arange(tokens.shape[1], dtype=np.int32)[None]
  return jnp.asarray(positions, jnp.int32)


def _check_segments(encoder_segment_ids, decoder_segment_ids):
  if (encoder_segment_ids is None) != (decoder_segment_ids is None):
    raise ValueError('Packed examples need both encoder_segment_ids and '
                     'decoder_segment_ids (or neither).')


class T5(nn.Module):
  """T5 v1.1 encoder-decoder; `__call__` returns float32 logits [B, Lt, V].

  Attributes:
    vocab_size: embedding rows and logits.
    emb_dim: d_model.
    num_heads, head_dim: attention heads and their width.
    mlp_dim: d_ff of the gated-GELU feed-forward.
    num_encoder_layers, num_decoder_layers: depth of each stack.
    dropout: rate of every dropout (T5X places them as its network.py).
    dtype: compute dtype (parameters are float32; logits float32).
    remat: rematerialise each layer in the backward pass.
    sparsity: the static N:M plan, or None for a dense model.
  """

  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  def setup(self):
    dims = _Dims(self.num_heads, self.head_dim, self.mlp_dim, self.dropout,
                 self.dtype, self.sparsity)
    self.token_embedder = Embed(self.vocab_size, self.emb_dim, self.dtype)
    self.encoder = Encoder(dims, self.num_encoder_layers, self.remat)
    self.decoder = Decoder(dims, self.num_decoder_layers, self.vocab_size,
                           self.remat)

  def encode(self, encoder_input_tokens, *, encoder_segment_ids=None,
             encoder_positions=None, train: bool) -> jax.Array:
    """Encoder output [B, Li, emb_dim]."""
    tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    valid = tokens > 0
    mask = _pair_mask(valid, valid, jnp.logical_and)
    if encoder_segment_ids is not None:
      seg = jnp.asarray(encoder_segment_ids)
      mask = mask & _pair_mask(seg, seg, jnp.equal)
    return self.encoder(self.token_embedder(tokens), mask,
                        _positions(encoder_positions, tokens),
                        deterministic=not train)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, *,
             encoder_segment_ids=None, decoder_segment_ids=None,
             decoder_positions=None, train: bool) -> jax.Array:
    """Logits [B, Lt, vocab] (float32) given the encoder output."""
    _check_segments(encoder_segment_ids, decoder_segment_ids)
    enc_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    dec_tokens = jnp.asarray(decoder_input_tokens, jnp.int32)
    idx = jnp.arange(dec_tokens.shape[1], dtype=jnp.int32)[None]
    self_mask = _pair_mask(idx, idx, jnp.greater_equal)
    cross_mask = (enc_tokens > 0)[:, None, None, :]  # [B, 1, 1, Li]
    if decoder_segment_ids is not None:
      dec_seg = jnp.asarray(decoder_segment_ids)
      enc_seg = jnp.asarray(encoder_segment_ids)
      self_mask = self_mask & _pair_mask(dec_seg, dec_seg, jnp.equal)
      cross_mask = cross_mask & _pair_mask(dec_seg, enc_seg, jnp.equal)
    return self.decoder(self.token_embedder(dec_tokens), encoded, self_mask,
                        cross_mask, _positions(decoder_positions, dec_tokens),
                        deterministic=not train)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, *,
               encoder_segment_ids=None, decoder_segment_ids=None,
               encoder_positions=None, decoder_positions=None,
               train: bool) -> jax.Array:
    encoded = self.encode(encoder_input_tokens,
                          encoder_segment_ids=encoder_segment_ids,
                          encoder_positions=encoder_positions, train=train)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, train=train)


def build(model_config, *, vocab_size: int,
          sparsity: SparsityPlan | None) -> T5:
  """T5 from the `model` config (keys name, variant, dropout, dtype, remat)."""
  if model_config.name != 't5':
    raise ValueError(f'model.name={model_config.name!r}: pgf.models.t5 builds '
                     "only 't5'.")
  return T5(vocab_size=vocab_size, **decode_variant(model_config.variant),
            dropout=model_config.dropout,
            dtype=compute_dtype(model_config.dtype),
            remat=model_config.remat, sparsity=sparsity)


@functools.lru_cache(maxsize=16)
def _greedy_fn(model: T5, max_length: int, eos_id: int):
  """A jitted greedy decoder for one (hashable) model and length."""

  def run(variables, enc_tokens):
    encoded = model.apply(variables, enc_tokens, train=False, method='encode')
    batch = enc_tokens.shape[0]
    zeros = jnp.zeros((batch, max_length), jnp.int32)

    def cond(state):
      i, _, _, done = state
      return (i < max_length) & ~done.all()

    def body(state):
      # Re-runs the decoder on the whole (fixed-length) buffer: position i
      # only sees inputs <= i under the causal mask, so later zeros are inert.
      i, dec_in, out, done = state
      logits = model.apply(variables, encoded, enc_tokens, dec_in,
                           train=False, method='decode')
      step_logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1,
                                                 keepdims=False)
      tok = jnp.where(done, 0, jnp.argmax(step_logits, -1).astype(jnp.int32))
      out = out.at[:, i].set(tok)
      dec_in = dec_in.at[:, i + 1].set(tok, mode='drop')
      return i + 1, dec_in, out, done | (tok == eos_id)

    state = (jnp.zeros((), jnp.int32), zeros, zeros,
             jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, state)[2]

  return jax.jit(run)


def greedy_decode(model: T5, variables, encoder_input_tokens: jax.Array, *,
                  max_length: int, eos_id: int = 1) -> jax.Array:
  """Greedy decoding: int32 tokens [B, max_length], 0 after each EOS.

  The decoder input starts with 0 (T5: BOS = pad = 0); each step appends the
  arg-max token. Rows stop at `eos_id` (kept in the output); the loop ends
  when every row has stopped or after `max_length` tokens.
  """
  if max_length < 1:
    raise ValueError(f'max_length={max_length} must be >= 1.')
  return _greedy_fn(model, int(max_length), int(eos_id))(
      variables, jnp.asarray(encoder_input_tokens, jnp.int32))

