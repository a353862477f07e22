"""Every kind of bad input fails before any compile, with one message that
names the key, the value and what is allowed."""

import jax
import pytest

from pgf import config_lib
from pgf import data as data_lib
from pgf import step as train_lib
from pgf.configs import t5_base
from pgf.configs import vit_base


def runlocal(data_dir, arg='mdgf_exp,1:4,runlocal'):
  c = vit_base.get_config(arg)
  c.data.data_dir = data_dir
  return c


@pytest.mark.parametrize('key, value, match', [
    ('sparsity.ff.recipe', 'magic', r"sparsity.ff.recipe='magic'.*mdgf_exp"),
    ('sparsity.ff.sdgf', 'zigzag', r"sparsity.ff.sdgf='zigzag'.*stepwise"),
    ('sparsity.ff.axis', 'diagonal', r"sparsity.ff.axis='diagonal'.*'in'"),
    ('sparsity.ff.mdgf_grad', 'x', r"sparsity.ff.mdgf_grad='x'"),
    ('sparsity.ff.n', 5, r'sparsity.ff.n=5, sparsity.ff.m=4.*N <= M'),
    ('sparsity.ff.n', 0, r'sparsity.ff.n=0'),
    ('sparsity.ff.decay', -1.0, r'sparsity.ff.decay=-1.0'),
    ('sparsity.ff.layers', '(', r"sparsity.ff.layers='\('"),
    ('sparsity.dense_warmup', 'soon', r"sparsity.dense_warmup='soon'"),
    ('total_steps', '1.5', r"total_steps='1.5'.*\[0, 1\]"),
    ('model.name', 'resnet', r"model.name='resnet'.*'vit'"),
    ('task', 'regression', r"task='regression' is not a task.*"
     r"'classification'"),
    ('task', 'span_corruption', r"task='span_corruption' cannot train "
     r"model.name='vit'"),
    ('sparsity.ff.group_axes', '0;1', r"sparsity.ff.group_axes='0;1'"),
    ('data.shuffle_seed', -2, r'data.shuffle_seed=-2'),
    ('model.variant', 'XL/16', r"model.variant='XL/16'"),
    ('model.dtype', 'float16', r"model.dtype='float16'.*bfloat16"),
    ('optimizer.name', 'sgd', r"optimizer.name='sgd'.*adafactor"),
    ('optimizer.lr', -1.0, r'optimizer.lr=-1.0'),
    ('loss', 'hinge', r"loss='hinge'"),
    ('batch_size', 0, r'batch_size=0'),
    ('grad_accum_steps', 3, r'batch_size=64 is not divisible by '
     r'grad_accum_steps=3'),
    ('data.preprocess', 'fancy', r"data.preprocess='fancy'"),
    ('mesh.model', 0, r'mesh.model=0'),
])
def test_validate_config_names_key_and_value(key, value, match):
  c = vit_base.get_config('mdgf_exp,1:4,runlocal')
  section, _, name = key.rpartition('.')
  target = c
  for part in filter(None, section.split('.')):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)


def test_stepwise_needs_power_of_two_ratio():
  c = vit_base.get_config('sdgf_stepwise,3:16,runlocal')
  with pytest.raises(ValueError, match=r'sparsity.ff: stepwise SdGf.*3:16'):
    config_lib.validate_config(c)


def test_group_length_not_divisible_names_layer_shape_and_m(data_dir):
  # tiny ViT: FF kernels (64, 256) and (256, 64); M = 24 divides neither.
  c = runlocal(data_dir, 'ste,1:24,runlocal')
  with pytest.raises(ValueError, match=r'encoderblock_0/mlp/wi/kernel.*'
                     r'\(64, 256\).*not divisible by M=24'):
    train_lib.setup(c)


def test_geometric_checks_every_frame_m(data_dir):
  # SdGf-Geometric 1:16 runs 8:128, 4:64, 2:32, 1:16: the target fits the
  # (64, 256) kernel but the first frame's M = 128 does not.
  c = runlocal(data_dir, 'sdgf_geometric,1:16,runlocal')
  with pytest.raises(ValueError, match=r'\(64, 256\).*not divisible by '
                     r'M=128 \(pattern 8:128\)'):
    train_lib.setup(c)


def test_role_regex_matching_nothing_fails(data_dir):
  c = runlocal(data_dir)
  c.sparsity.ff.layers = r'/no_such_layer$'
  with pytest.raises(ValueError, match=r"sparsity.ff.layers='/no_such_layer\$'"
                     r' matches no sparse-capable kernel'):
    train_lib.setup(c)


def test_overlapping_roles_fail(data_dir):
  c = runlocal(data_dir)
  c.sparsity.o.recipe = 'ste'
  c.sparsity.o.n, c.sparsity.o.m = 1, 4
  c.sparsity.o.layers = r'/mlp/wi/kernel$'
  with pytest.raises(ValueError, match=r'selected by several sparsity groups'):
    train_lib.setup(c)


def test_mesh_not_covering_devices_fails(data_dir):
  c = runlocal(data_dir)
  c.mesh.data, c.mesh.model = 3, 1
  with pytest.raises(ValueError, match=r'mesh.data=3 x mesh.model=1 does not '
                     rf'cover the {jax.device_count()} available devices'):
    train_lib.setup(c)


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  c = vit_base.get_config('mdgf_exp,1:16')
  c.data.data_dir = str(tmp_path)
  with pytest.raises(data_lib.DatasetNotPreparedError,
                     match=r"data.name='imagenet2012' is not prepared.*"
                     r'python -m pgf.data.prepare --dataset=imagenet2012'):
    train_lib.setup(c)
  assert not list(tmp_path.iterdir())  # Nothing was downloaded or written.


def test_unprepared_c4_says_how_to_prepare(tmp_path):
  c = t5_base.get_config('srste,1:16')
  c.data.data_dir = str(tmp_path)
  with pytest.raises(data_lib.DatasetNotPreparedError,
                     match=r"data.name='c4/en' is not prepared"):
    train_lib.setup(c)


def test_sentencepiece_without_vocab_path(data_dir):
  c = t5_base.get_config('srste,1:16,runlocal')
  c.data.data_dir = data_dir
  c.data.vocab = 'sentencepiece'
  with pytest.raises(ValueError, match=r'data.vocab_path'):
    train_lib.setup(c)
