"""Tests of pgf.models.vit: timm sizes, shapes, dropout, sparsity, remat."""

import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pgf import sparsity as sp
from pgf.configs import base
from pgf.models import vit

CLASSES = 5
# The sparse-capable kernel of each role and its contraction (group) axes.
ROLE_LAYERS = {
    'ff': (('mlp/wi', 0), ('mlp/wo', 0)),
    'q': (('attn/query', 0),),
    'k': (('attn/key', 0),),
    'v': (('attn/value', 0),),
    'o': (('attn/out', (0, 1)),),
}


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def _model(variant='mu/4', **overrides):
  kwargs = dict(num_classes=CLASSES, pool='tok', **vit.decode_variant(variant))
  kwargs.update(overrides)
  return vit.ViT(**kwargs)


def _images(batch=3, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)


def _init(model, images):
  return model.init(jax.random.key(0), images, train=False)


def _random_params(model, images, seed=1):
  """Params with every leaf random (the zero-initialised head included), so
  outputs depend on every weight and N:M selections have no ties."""
  params = flax.linen.unbox(_init(model, images)['params'])
  flat = _flat(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return _unflat({k: 0.3 * jax.random.normal(key, v.shape, v.dtype)
                  for key, (k, v) in zip(keys, sorted(flat.items()))})


def _plan(role, recipe='ste', nm=None):
  group = sp.GroupSpec(role, layers=vit.SPARSITY_LAYERS[role],
                       nm=nm or sp.NM(1, 4),
                       recipe=recipe, decay=1.0)
  return sp.SparsitySchedule((group,), total_steps=10).plan(0)


def _expected_kernels(role, depth):
  """'Transformer/encoderblock_i/<layer>' -> group axes, for `role`."""
  return {f'Transformer/encoderblock_{i}/{layer}': axes
          for i in range(depth) for layer, axes in ROLE_LAYERS[role]}


def _num_params(variant):
  model = vit.ViT(num_classes=1000, pool='tok', **vit.decode_variant(variant))
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(
      flax.linen.unbox(abstract['params'])))


@pytest.fixture(scope='module')
def mu():
  model = _model()
  images = _images()
  return model, _random_params(model, images), images


# timm: sum(p.numel() for p in timm.create_model('vit_*_patch*_224')
# .parameters()).
@pytest.mark.parametrize('variant,count', [
    ('Ti/16', 5_717_416), ('S/16', 22_050_664), ('B/16', 86_567_656),
    ('B/32', 88_224_232), ('L/16', 304_326_632)])
def test_parameter_counts_match_timm(variant, count):
  assert _num_params(variant) == count


def test_decode_variant():
  assert vit.decode_variant('B/16') == dict(
      width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)
  assert vit.decode_variant('Ti/32') == dict(
      width=192, depth=12, mlp_dim=768, num_heads=3, patch_size=32)
  assert vit.decode_variant('S/16')['width'] == 384
  assert vit.decode_variant('L/32') == dict(
      width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=32)
  assert vit.decode_variant('mu/3') == dict(
      width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=3)
  for bad in ('X/16', 'B', 'B/0', 'B/x', 'b/16', ''):
    with pytest.raises(ValueError, match='unknown ViT variant') as e:
      vit.decode_variant(bad)
    assert repr(bad) in str(e.value) and "'Ti'" in str(e.value)


def test_logical_axes_and_group_axes():
  model = _model()
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), _images(), train=False))['params']
  sites = sp.kernel_sites(boxed)
  blk = 'Transformer/encoderblock_1'
  assert sites[f'{blk}/attn/query/kernel'].names == ('embed', 'heads', 'kv')
  assert sites[f'{blk}/attn/query/kernel'].shape == (32, 2, 16)
  assert sites[f'{blk}/attn/out/kernel'].names == ('heads', 'kv', 'embed')
  assert sites[f'{blk}/attn/out/kernel'].in_axes == (0, 1)
  assert sites[f'{blk}/mlp/wi/kernel'].names == ('embed', 'mlp')
  assert sites[f'{blk}/mlp/wo/kernel'].names == ('mlp', 'embed')
  assert sites['embedding/kernel'].names == (None, None, 'channels', 'embed')
  assert 'head/kernel' not in sites  # The head is a plain Dense.
  flat = _flat(boxed)
  assert flat['pos_embedding'].value.shape == (1, 17, 32)
  assert flat['cls'].value.shape == (1, 1, 32)
  assert flat['head/kernel'].names == ('embed', 'classes')


def test_init_values():
  model = _model()
  params = flax.linen.unbox(_init(model, _images())['params'])
  assert not np.asarray(params['head']['kernel']).any()
  assert not np.asarray(params['cls']).any()
  assert np.asarray(params['pos_embedding']).std() == pytest.approx(
      0.02, rel=0.3)
  gap = _model(pool='gap')
  p = _init(gap, _images())['params']
  assert 'cls' not in p
  assert flax.linen.unbox(p)['pos_embedding'].shape == (1, 16, 32)


@pytest.mark.parametrize('pool', ['tok', 'gap'])
@pytest.mark.parametrize('train', [False, True])
def test_output_shapes(pool, train):
  model = _model(pool=pool, dropout=0.1, drop_path=0.1)
  images = _images(batch=2)
  params = _random_params(model, images)
  logits = model.apply({'params': params}, images, train=train,
                       rngs={'dropout': jax.random.key(3)})
  assert logits.shape == (2, CLASSES)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bfloat16_compute_gives_float32_logits(mu):
  model, params, images = mu
  model16 = _model(dtype=jnp.bfloat16)
  logits16 = model16.apply({'params': params}, images, train=False)
  logits32 = model.apply({'params': params}, images, train=False)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=0.1)


def test_image_size_not_divisible_by_patch():
  model = _model()
  with pytest.raises(ValueError, match='not divisible by the patch size 4'):
    model.init(jax.random.key(0), _images(size=18), train=False)


def test_dropout_only_in_training(mu):
  _, params, images = mu
  dense = _model()
  dropped = _model(dropout=0.2, drop_path=0.2)
  apply = lambda m, train, seed: m.apply(
      {'params': params}, images, train=train,
      rngs={'dropout': jax.random.key(seed)})
  reference = apply(dense, False, 0)
  np.testing.assert_array_equal(apply(dropped, False, 0), reference)
  np.testing.assert_array_equal(apply(dropped, False, 1), reference)
  np.testing.assert_array_equal(apply(dense, True, 0), reference)
  train0, train1 = apply(dropped, True, 0), apply(dropped, True, 1)
  assert not np.allclose(train0, reference)
  assert not np.allclose(train0, train1)
  np.testing.assert_array_equal(apply(dropped, True, 0), train0)
  # Each of the two mechanisms alone also acts only in training.
  for kw in (dict(dropout=0.2), dict(drop_path=0.2)):
    m = _model(**kw)
    np.testing.assert_array_equal(apply(m, False, 0), reference)
    assert not np.allclose(apply(m, True, 0), reference)


def test_sparsity_layers_match_exactly_the_intended_layers():
  for variant, size in (('mu/4', 16), ('B/16', 224)):
    model = _model(variant)
    abstract = jax.eval_shape(lambda m=model, s=size: m.init(
        jax.random.key(0), jnp.zeros((1, s, s, 3)), train=False))
    paths = _kernel_paths(abstract['params'])
    depth = vit.decode_variant(variant)['depth']
    assert set(vit.SPARSITY_LAYERS) == set(ROLE_LAYERS)
    for role, regex in vit.SPARSITY_LAYERS.items():
      matched = {p for p in paths if re.search(regex, p)}
      assert matched == {f'{k}/kernel' for k in _expected_kernels(
          role, depth)}, role
      assert len(matched) == (2 * depth if role == 'ff' else depth)
    # The embedding and the head are never selected.
    assert not any(re.search(r, 'embedding/kernel') or re.search(
        r, 'head/kernel') for r in vit.SPARSITY_LAYERS.values())


@pytest.mark.parametrize('role', ['ff', 'o', 'q', 'k', 'v'])
def test_masks_reach_the_layers(mu, role):
  model, params, images = mu
  nm = sp.NM(1, 4)
  sparse = _model(sparsity=_plan(role, nm=nm))
  # Without schedule values the layers use the hard mask.
  logits = sparse.apply({'params': params}, images, train=False)
  expected = _expected_kernels(role, depth=2)
  flat = _flat(params)
  for path, axes in expected.items():
    w = flat[f'{path}/kernel']
    mask = sp.nm_mask(w, nm, axes)
    np.testing.assert_array_equal(
        mask, sp.nm_mask_reference(np.asarray(w), nm, axes))
    assert float(np.mean(mask)) == 0.25
    flat[f'{path}/kernel'] = jnp.where(mask, w, 0.0)
  masked = model.apply({'params': _unflat(flat)}, images, train=False)
  np.testing.assert_allclose(logits, masked, rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits, model.apply({'params': params}, images,
                                             train=False), atol=1e-3)


def _kernel_paths(params):
  return tuple(k for k in _flat(flax.linen.unbox(params))
               if k.endswith('/kernel'))


def _alpha_collection(plan, params, alpha):
  values = {r.group: dict(alpha=jnp.float32(alpha)) for r in plan.rules}
  return sp.layer_collection(values, plan, _kernel_paths(params))


def test_alpha_reaches_the_layers(mu):
  model, params, images = mu
  nm, alpha = sp.NM(1, 4), 0.3
  plan = _plan('ff', recipe='mdgf_exp', nm=nm)
  sparse = _model(sparsity=plan)
  variables = {
      'params': params,
      sp.SCHEDULE_COLLECTION: _alpha_collection(plan, params, alpha)}
  logits = sparse.apply(variables, images, train=False)
  flat = _flat(params)
  for path, axes in _expected_kernels('ff', depth=2).items():
    w = flat[f'{path}/kernel']
    flat[f'{path}/kernel'] = w * jnp.where(sp.nm_mask(w, nm, axes), 1.0,
                                           alpha)
  expected = model.apply({'params': _unflat(flat)}, images, train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_remat_keeps_sparsity_exact(mu):
  _, params, images = mu
  plan = sp.SparsityPlan(_plan('ff', recipe='mdgf_exp').rules
                         + _plan('o', recipe='mdgf_exp').rules)
  variables_extra = {
      sp.SCHEDULE_COLLECTION: _alpha_collection(plan, params, 0.2)}
  labels = jax.nn.one_hot(jnp.arange(images.shape[0]) % CLASSES, CLASSES)

  def run(remat):
    model = _model(sparsity=plan, remat=remat, dropout=0.1, drop_path=0.1)

    def loss(p):
      logits = model.apply(
          {'params': p, **variables_extra}, images, train=True,
          rngs={'dropout': jax.random.key(7)})
      return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1)), (
          logits)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    # Remat really is on (or off): the blocks are checkpointed.
    assert ('remat' in str(jax.make_jaxpr(grad_fn)(params))) == remat
    (value, logits), grads = jax.jit(grad_fn)(params)
    return value, logits, grads

  v0, logits0, grads0 = run(False)
  v1, logits1, grads1 = run(True)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-6), grads1, grads0)
  # The masks act under remat: a dense model differs.
  dense = _model(remat=True, dropout=0.1, drop_path=0.1).apply(
      {'params': params}, images, train=True,
      rngs={'dropout': jax.random.key(7)})
  assert not np.allclose(dense, logits1, atol=1e-3)


def test_build_from_config():
  config = base.get_base_config()
  m = config.model
  m.variant, m.pool, m.dropout, m.drop_path = 'mu/4', 'gap', 0.1, 0.05
  m.dtype, m.remat = 'bfloat16', True
  plan = _plan('ff')
  model = vit.build(m, num_classes=7, sparsity=plan)
  assert isinstance(model, vit.ViT)
  assert (model.num_classes, model.patch_size, model.width, model.depth,
          model.mlp_dim, model.num_heads) == (7, 4, 32, 2, 64, 2)
  assert (model.pool, model.dropout, model.drop_path, model.remat) == (
      'gap', 0.1, 0.05, True)
  assert model.dtype == jnp.bfloat16 and model.sparsity is plan
  bad = ml_collections.ConfigDict(m.to_dict())
  bad.dtype = 'float16'
  with pytest.raises(ValueError, match='model.dtype'):
    vit.build(bad, num_classes=7, sparsity=None)
  bad = ml_collections.ConfigDict(m.to_dict())
  bad.variant = 'Q/16'
  with pytest.raises(ValueError, match="'Q/16'"):
    vit.build(bad, num_classes=7, sparsity=None)
