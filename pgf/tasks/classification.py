"""Image classification (ViT, SwinV2): batches {'image', 'label'}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pgf.data import images
from pgf.tasks import base


class Classification(base.Task):
  """Train batches: 'image' float32 [B, S, S, C], 'label' float32 [B, C]
  (one-hot); eval batches: 'image', 'label' int32 [B], 'mask' float32 [B]."""

  name = 'classification'
  pipeline = images

  @classmethod
  def validate(cls, config) -> None:
    super().validate(config)
    if not isinstance(config.model.num_classes, int) or (
        config.model.num_classes < 1):
      raise ValueError(f'model.num_classes={config.model.num_classes!r} '
                       'must be a positive integer.')
    d = config.data
    if not isinstance(d.image_size, int) or d.image_size < 1:
      raise ValueError(f'data.image_size={d.image_size!r} must be a positive '
                       'integer.')
    if d.preprocess not in ('simple', 'imagenet'):
      raise ValueError(f'data.preprocess={d.preprocess!r} is not allowed; '
                       "choose one of ('simple', 'imagenet').")
    if not isinstance(d.randaugment_n, int) or d.randaugment_n < 0:
      raise ValueError(f'data.randaugment_n={d.randaugment_n!r} must be an '
                       'integer >= 0.')
    if not 0 <= d.randaugment_m <= 30:
      raise ValueError(f'data.randaugment_m={d.randaugment_m} must lie in '
                       '[0, 30].')
    if d.mixup_alpha < 0:
      raise ValueError(f'data.mixup_alpha={d.mixup_alpha} must be >= 0.')
    if config.loss not in ('softmax_xent', 'sigmoid_xent'):
      raise ValueError(f'loss={config.loss!r} is not allowed for '
                       "task='classification'; choose one of "
                       "('softmax_xent', 'sigmoid_xent').")

  def build_model(self, sparsity):
    return self.module.build(self.config.model,
                             num_classes=self.config.model.num_classes,
                             sparsity=sparsity)

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    shape, _ = self.info.train_spec['image']
    return {'image': np.zeros((batch_size, *shape), np.float32)}

  def model_inputs(self, batch):
    return (batch['image'],), {}

  def augment(self, batch, rng):
    """timm's batch-mode mixup on the global batch: x <- lam x + (1 - lam)
    flip(x), the same for the labels, lam ~ Beta(a, a) per step (a =
    data.mixup_alpha; 0 = off). On the device, so the result does not
    depend on how the batch is split over processes."""
    a = self.config.data.mixup_alpha
    if not a:
      return batch
    lam = jax.random.beta(rng, a, a).astype(jnp.float32)
    return {**batch,
            'image': lam * batch['image'] + (1 - lam) * batch['image'][::-1],
            'label': lam * batch['label'] + (1 - lam) * batch['label'][::-1]}

  def loss(self, logits, batch):
    """Mean loss over the batch and its metrics; labels [B, C] (soft)."""
    labels = batch['label']
    c = self.config
    smooth = labels * (1 - c.label_smoothing) + (
        c.label_smoothing / labels.shape[-1])
    logits = logits.astype(jnp.float32)
    if c.loss == 'sigmoid_xent':
      # timm's BinaryCrossEntropy (the authors' recipe): mean over B x C.
      loss = optax.sigmoid_binary_cross_entropy(logits, smooth).mean()
    else:
      loss = optax.softmax_cross_entropy(logits, smooth).mean()
    acc = (logits.argmax(-1) == labels.argmax(-1)).mean()
    return loss, {'loss': loss, 'accuracy': acc}

  def eval_sums(self, logits, batch):
    mask = batch['mask']
    logits = logits.astype(jnp.float32)
    labels = batch['label']
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if self.config.loss == 'sigmoid_xent':
      loss = optax.sigmoid_binary_cross_entropy(logits, onehot).mean(-1)
    else:
      loss = optax.softmax_cross_entropy(logits, onehot)
    correct = logits.argmax(-1) == labels
    k = min(5, logits.shape[-1])
    top5 = (jax.lax.top_k(logits, k)[1] == labels[:, None]).any(-1)
    return {'loss': (loss * mask).sum(), 'accuracy': (correct * mask).sum(),
            'top5_accuracy': (top5 * mask).sum(), 'count': mask.sum()}


TASK = Classification
