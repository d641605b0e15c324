"""Shared pieces of the supervised algorithms: per-example losses, the loss function, client evaluation."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.client_update import Batch, ClientData, deep_update, make_client_update, masked_mean
from fedjax_adapters.federated.round import Algorithm

LOSSES = ('mse', 'xent')

# forward((global_params, client_state), frozen, x, key, train) -> (outputs [B, ...], global overrides dict)
Forward = Callable[[tuple, Any, Any, jax.Array, bool], tuple[jax.Array, dict]]


def per_example_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """``[B]`` losses: ``'mse'`` (mean squared error over output dims) or ``'xent'`` (integer labels)."""
  if kind == 'mse':
    return jnp.mean(jnp.square(out - y).reshape(out.shape[0], -1), axis=-1)
  if kind == 'xent':
    return optax.softmax_cross_entropy_with_integer_labels(out, y)
  raise ValueError(f'unknown loss {kind!r}; choose one of {LOSSES}.')


def batch_metrics(kind: str, out, y, mask) -> dict[str, jax.Array]:
  """Sums over the real rows: ``loss``, ``count`` and, for classification, ``correct``."""
  m = mask.astype(jnp.float32)
  metrics = {'loss': jnp.sum(per_example_loss(kind, out, y) * m), 'count': jnp.sum(m)}
  if kind == 'xent':
    metrics['correct'] = jnp.sum((jnp.argmax(out, -1) == y) * m)
  return metrics


def supervised(*, init, forward: Forward, loss: str, optimizer: optax.GradientTransformation, batch_size: int,
               num_epochs: int, shuffle: bool, aggregator: Aggregator, output_aux=None,
               eval_batch_size: int = 512) -> Algorithm:
  """Assembles an :class:`Algorithm` from a forward function; the round runner stays generic."""
  if loss not in LOSSES:
    raise ValueError(f'unknown loss {loss!r}; choose one of {LOSSES}.')

  def loss_fn(trainable, frozen, batch: Batch, key):
    out, overrides = forward(trainable, frozen, batch.x, key, True)
    value = masked_mean(per_example_loss(loss, out, batch.y), batch.mask)
    return value, (batch_metrics(loss, out, batch.y, batch.mask), overrides)

  client_update = make_client_update(loss_fn, optimizer, batch_size=batch_size,
                                     num_epochs=num_epochs, shuffle=shuffle, output_aux=output_aux)

  def evaluate(frozen, global_params, client_state, data: ClientData):
    x, y, count = data
    n = jax.tree.leaves(x)[0].shape[0]
    bs = min(eval_batch_size, n)
    chunks = math.ceil(n / bs)
    rows = jnp.arange(chunks * bs).reshape(chunks, bs)

    def one(r):
      safe = jnp.minimum(r, n - 1)
      xb, yb = jax.tree.map(lambda a: a[safe], x), jax.tree.map(lambda a: a[safe], y)
      out, _ = forward((global_params, client_state), frozen, xb, jax.random.key(0), False)
      return batch_metrics(loss, out, yb, r < count)

    return jax.tree.map(lambda m: jnp.sum(m, 0), jax.lax.map(one, rows))

  return Algorithm(init, client_update, aggregator, evaluate)


def summarize(metrics: dict[str, jax.Array]) -> dict[str, float]:
  """Population metrics from per-client sums, weighted by example counts (as FLoRAL's ``acc_distributed``)."""
  total = float(jnp.sum(metrics['count']))
  out = {'loss': float(jnp.sum(metrics['loss'])) / max(total, 1.0), 'count': total}
  if 'correct' in metrics:
    out['accuracy'] = float(jnp.sum(metrics['correct'])) / max(total, 1.0)
  return out
