"""GPT-2 decoder-only Transformer (Radford et al. 2019) with N:M kernels.

The parameterisation is exactly GPT-2's (openai/gpt-2 model.py; HF
`GPT2LMHeadModel`; Karpathy's nanoGPT model.py), so the parameter counts are
the published ones (vocabulary 50257, context 1024, tied embeddings):
gpt2 124,439,808; gpt2-medium 354,823,168; gpt2-large 774,030,080; gpt2-xl
1,557,611,200.

  tokens (B, L), L <= max_len
    -> 'wte' (vocab, D) token embedding + 'wpe' (max_len, D) learned
       positions, dropout                                     (B, L, D)
    -> depth pre-norm blocks 'h_{i}':
         x = x + dropout(attn(ln_1(x)))      causal self-attention
         x = x + dropout(mlp(ln_2(x)))       wi -> GELU -> wo
    -> 'ln_f'                                                 (B, L, D)
    -> logits = x @ wte^T (tied), float32                     (B, L, vocab)

Choices, and why:
* Learned absolute positions, as GPT-2: they are part of its published
  parameter count (max_len x D = 786,432 in gpt2), and nanoGPT, the usual
  reference for GPT-2-small runs, keeps them. Rotary positions would make
  the count 786,432 smaller and are not GPT-2.
* Tied output embedding, as GPT-2 (and nanoGPT's weight tying): the logits
  reuse 'wte', so the output projection is never a sparse layer.
* Separate Q, K, V projections, each (D, heads, head_dim) with a bias: the
  same 3 (D^2 + D) parameters as GPT-2's fused 'c_attn', so each role can
  have its own N:M. HF GPT-2 names map as c_attn -> query/key/value (split
  along its output axis), attn.c_proj -> out, mlp.c_fc -> wi,
  mlp.c_proj -> wo.
* Biases everywhere and LayerNorm (scale and bias, eps 1e-5), as GPT-2.
* GELU in its tanh approximation, GPT-2's `gelu` (HF 'gelu_new'); nanoGPT's
  torch nn.GELU() is the exact erf form, a difference of < 1e-3.
* Initialisers (GPT-2 paper section 2.3, nanoGPT `_init_weights`): every
  kernel and both embeddings N(0, 0.02), biases 0, LayerNorm 1 and 0; the
  two projections that end a residual branch (attn/out, mlp/wo) take
  0.02 / sqrt(2 depth) ("scale the weights of residual layers at
  initialization by a factor of 1/sqrt(N)", N the residual layers).
* Attention logits q.k / sqrt(head_dim) and their softmax in float32;
  dropout on the attention weights and after each branch, and on the
  embeddings (GPT-2's attn_pdrop, resid_pdrop, embd_pdrop; all model.dropout).
* No document masks: documents packed into one row see each other across
  the EOS between them, as in GPT-2 and nanoGPT training.

Sparse-capable layers (pgf.sparsity), in every block: 'attn/query',
'attn/key', 'attn/value' (kernels (D, heads, head_dim): N:M groups along D),
'attn/out' (kernel (heads, head_dim, D): groups over heads x head_dim
jointly), 'mlp/wi' (D, mlp) and 'mlp/wo' (mlp, D). The embeddings and
LayerNorms are never sparse.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pgf.models.common import compute_dtype
from pgf.sparsity import SparseDense
from pgf.sparsity import SparseDenseGeneral
from pgf.sparsity import SparsityPlan

TASKS = ('causal_lm',)  # The config.task values this model trains for.

# Role -> regex searched in '/'-joined parameter paths, e.g.
# 'h_3/attn/query/kernel', 'h_3/attn/out/kernel', 'h_3/mlp/wo/kernel' (no
# other layer has 'attn' or 'mlp' as a parent).
SPARSITY_LAYERS = {
    'ff': r'/mlp/(wi|wo)/kernel$',
    'q': r'/attn/query/kernel$',
    'k': r'/attn/key/kernel$',
    'v': r'/attn/value/kernel$',
    'o': r'/attn/out/kernel$',
}

# GPT-2 sizes (HF gpt2, gpt2-medium, gpt2-large, gpt2-xl config.json:
# n_embd, n_layer, n_head, n_ctx; n_inner = 4 n_embd). 'mu' is a tiny model
# for tests, 'nano' one that trains on a CPU in minutes (configs/gpt_small.py
# runlocal).
VARIANTS = {
    'mu': dict(width=32, depth=2, num_heads=2, mlp_dim=128, max_len=128),
    'nano': dict(width=128, depth=4, num_heads=4, mlp_dim=512, max_len=256),
    'gpt2': dict(width=768, depth=12, num_heads=12, mlp_dim=3072,
                 max_len=1024),
    'gpt2-medium': dict(width=1024, depth=24, num_heads=16, mlp_dim=4096,
                        max_len=1024),
    'gpt2-large': dict(width=1280, depth=36, num_heads=20, mlp_dim=5120,
                       max_len=1024),
    'gpt2-xl': dict(width=1600, depth=48, num_heads=25, mlp_dim=6400,
                    max_len=1024),
}

INIT_STD = 0.02  # GPT-2's initializer_range.
LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon.
_MASKED = -1e10  # Attention logit of future positions (as pgf's T5).
_ACT = ('batch', 'length', 'embed')


def decode_variant(variant: str) -> dict[str, int]:
  """Sizes of a GPT variant: width, depth, num_heads, mlp_dim, max_len."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown GPT variant {variant!r}; choose one of '
                     f'{tuple(VARIANTS)}.')
  return dict(VARIANTS[variant])


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             ('embed',)))


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention on (B, L, D) -> (B, L, D).

  q, k, v: (B, L, heads, head_dim); logits (B, heads, L, L) in float32,
  position i attending to positions <= i; output projection
  (heads, head_dim) -> D.
  """

  num_heads: int
  dropout: float
  out_std: float  # Init std of 'out' (GPT-2's residual scaling).
  dtype: Any
  sparsity: SparsityPlan | None

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
    length, width = x.shape[-2:]
    if width % self.num_heads:
      raise ValueError(f'{self.name}: width {width} is not divisible by '
                       f'{self.num_heads} heads.')
    head_dim = width // self.num_heads
    proj = functools.partial(
        SparseDenseGeneral, features=(self.num_heads, head_dim),
        dtype=self.dtype, kernel_init=_normal(INIT_STD),
        kernel_axes=('embed', 'heads', 'kv'), sparsity=self.sparsity)
    names = ('batch', 'length', 'heads', 'kv')
    q = nn.with_logical_constraint(proj(name='query')(x), names)
    k = nn.with_logical_constraint(proj(name='key')(x), names)
    v = nn.with_logical_constraint(proj(name='value')(x), names)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                        preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(head_dim ** -0.5)
    causal = jnp.tril(jnp.ones((length, length), bool))
    logits = jnp.where(causal, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    out = nn.with_logical_constraint(out, names)
    return SparseDenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype,
        kernel_init=_normal(self.out_std),
        kernel_axes=('heads', 'kv', 'embed'), sparsity=self.sparsity,
        name='out')(out)


class MlpBlock(nn.Module):
  """wi -> GELU (tanh, GPT-2's) -> wo, with biases, on (B, L, D)."""

  mlp_dim: int
  out_std: float  # Init std of 'wo' (GPT-2's residual scaling).
  dtype: Any
  sparsity: SparsityPlan | None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = SparseDense(self.mlp_dim, dtype=self.dtype,
                    kernel_init=_normal(INIT_STD),
                    kernel_axes=('embed', 'mlp'), sparsity=self.sparsity,
                    name='wi')(x)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True),
                                   ('batch', 'length', 'mlp'))
    return SparseDense(width, dtype=self.dtype,
                       kernel_init=_normal(self.out_std),
                       kernel_axes=('mlp', 'embed'), sparsity=self.sparsity,
                       name='wo')(h)


class Block(nn.Module):
  """GPT-2's pre-norm block on (B, L, D)."""

  num_heads: int
  mlp_dim: int
  dropout: float
  out_std: float
  dtype: Any
  sparsity: SparsityPlan | None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    det = not train
    y = _layer_norm('ln_1', self.dtype)(x)
    y = CausalSelfAttention(self.num_heads, self.dropout, self.out_std,
                            self.dtype, self.sparsity, name='attn')(
                                y, deterministic=det)
    x = x + nn.Dropout(self.dropout)(y, deterministic=det)
    y = _layer_norm('ln_2', self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.out_std, self.dtype, self.sparsity,
                 name='mlp')(y)
    x = x + nn.Dropout(self.dropout)(y, deterministic=det)
    return nn.with_logical_constraint(x, _ACT)


class GPT(nn.Module):
  """GPT-2 language model: tokens int [B, L] -> float32 logits [B, L, V].

  Attributes:
    vocab_size: rows of the (tied) token embedding and logits.
    width: d_model (GPT-2's n_embd).
    depth: number of blocks (n_layer).
    num_heads: attention heads (n_head); must divide width.
    mlp_dim: hidden size of the MLP (4 width in GPT-2).
    max_len: rows of the learned position table (n_ctx): the longest input.
    dropout: rate of every dropout (embeddings, attention, residuals).
    dtype: compute dtype; parameters stay float32, logits are float32.
    remat: rematerialise each block in the backward pass.
    sparsity: the static SparsityPlan, or None for a dense model.
  """

  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  sparsity: SparsityPlan | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f'inputs of {length} tokens exceed the {self.max_len} '
                       'learned positions of the model (max_len).')
    # Float32 tables; the lookup is cast to the compute dtype, the tied
    # logits are computed in float32 (as pgf's T5 logits).
    wte = nn.Embed(self.vocab_size, self.width, dtype=jnp.float32,
                   embedding_init=nn.with_logical_partitioning(
                       _normal(INIT_STD), ('vocab', 'embed')), name='wte')
    wpe = nn.Embed(self.max_len, self.width, dtype=jnp.float32,
                   embedding_init=nn.with_logical_partitioning(
                       _normal(INIT_STD), ('length', 'embed')), name='wpe')
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    x = (wte(jnp.asarray(tokens, jnp.int32)) + wpe(positions)).astype(
        self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, _ACT)
    # Under remat the sparse layers' masks are recomputed in the backward
    # pass, so they stay exact.
    block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    out_std = INIT_STD / math.sqrt(2 * self.depth)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dropout, out_std,
                self.dtype, self.sparsity, name=f'h_{i}')(x, train)
    x = _layer_norm('ln_f', self.dtype)(x)
    logits = wte.attend(x.astype(jnp.float32))
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def build(model_config: ml_collections.ConfigDict, *, vocab_size: int,
          sparsity: SparsityPlan | None) -> GPT:
  """GPT from the `model` config (keys name, variant, dropout, dtype,
  remat)."""
  m = model_config
  if m.name != 'gpt':
    raise ValueError(f'model.name={m.name!r}: pgf.models.gpt builds only '
                     "'gpt'.")
  return GPT(vocab_size=vocab_size, **decode_variant(m.variant),
             dropout=m.dropout, dtype=compute_dtype(m.dtype), remat=m.remat,
             sparsity=sparsity)


@functools.lru_cache(maxsize=16)
def _greedy_fn(model: GPT, prompt_len: int, max_new_tokens: int,
               eos_id: int):
  """A jitted greedy decoder for one (hashable) model and lengths."""
  total = prompt_len + max_new_tokens

  def run(variables, prompt):
    batch = prompt.shape[0]
    buffer = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(
        prompt)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32)

    def cond(state):
      i, _, _, done = state
      return (i < max_new_tokens) & ~done.all()

    def body(state):
      # Re-runs the model on the whole fixed-length buffer (no KV cache):
      # under the causal mask the zeros after position prompt_len + i - 1
      # do not change its logits.
      i, buffer, out, done = state
      logits = model.apply(variables, buffer, train=False)
      last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1,
                                          keepdims=False)
      tok = jnp.where(done, 0, jnp.argmax(last, -1).astype(jnp.int32))
      out = out.at[:, i].set(tok)
      buffer = jax.lax.dynamic_update_index_in_dim(
          buffer, tok, prompt_len + i, axis=1)
      return i + 1, buffer, out, done | (tok == eos_id)

    state = (jnp.zeros((), jnp.int32), buffer, out,
             jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, state)[2]

  return jax.jit(run)


def greedy_decode(model: GPT, variables, prompt: jax.Array, *,
                  max_new_tokens: int, eos_id: int = 1) -> jax.Array:
  """Greedy continuation of `prompt` int [B, P]: int32 [B, max_new_tokens].

  Each step appends the arg-max token; a row stops after `eos_id` (kept in
  the output, zeros after it); the loop ends when every row has stopped.
  P + max_new_tokens must fit the model's max_len.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.shape[1] < 1 or max_new_tokens < 1:
    raise ValueError(f'greedy_decode needs a prompt of >= 1 token and '
                     f'max_new_tokens >= 1; got {prompt.shape[1]} and '
                     f'{max_new_tokens}.')
  if prompt.shape[1] + max_new_tokens > model.max_len:
    raise ValueError(f'prompt of {prompt.shape[1]} tokens + {max_new_tokens} '
                     f'new ones exceed max_len={model.max_len}.')
  return _greedy_fn(model, int(prompt.shape[1]), int(max_new_tokens),
                    int(eos_id))(variables, prompt)
