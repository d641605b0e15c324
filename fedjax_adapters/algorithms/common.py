"""What the supervised algorithms share: losses (built-in or a user callable), client evaluation and prediction.

Every built-in algorithm takes ``loss`` as a string shortcut (``'mse'``, ``'xent'``) or as a callable::

  def loss(inputs: LossInputs) -> loss_value | (loss_value, metrics)

``inputs`` carries the model's training outputs on the batch, the batch itself, the parameters being trained
``(global_params, client_state)``, the frozen parts, a PRNG key, the round's starting parameters (``anchor``) and a
``forward(params, x)`` for extra passes. FedProx, for instance, adds ``mu / 2 * ||w - w_anchor||^2`` to the task loss::

  def fedprox(inputs, mu=0.01):
    task = fa.algorithms.task_loss('xent', inputs)
    return task + 0.5 * mu * fa.algorithms.sq_distance(inputs.params[0], inputs.anchor[0])
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.data.federated import check_client_data
from fedjax_adapters.federated.aggregators import Aggregator
from fedjax_adapters.federated.algorithm import Algorithm
from fedjax_adapters.federated.client_update import Batch, ClientData, ClientInfo, make_client_update, masked_mean

LOSSES = ('mse', 'xent')

# forward((global_params, client_state), frozen, x, key, train) -> (outputs [B, ...], global overrides dict)
Forward = Callable[[tuple, Any, Any, jax.Array, bool], tuple[jax.Array, dict]]


class LossInputs(NamedTuple):
  """What a loss callable sees at one training step of one client.

  Attributes:
    outputs: the model's outputs on ``batch.x`` in training mode, ``[B, ...]``.
    batch: the :class:`Batch` (``x``, ``y``, ``mask`` False on padding rows: average over real rows only).
    params: the parameters being trained, ``(global_params, client_state)``.
    frozen: the frozen parts (e.g. a frozen base model), or ``{}``.
    key: this step's PRNG key.
    anchor: the round's starting ``(global_params, client_state)`` (constant during local training).
    forward: ``forward(params, x) -> outputs`` in training mode, for losses that need another pass.
    client: the :class:`~fedjax_adapters.federated.ClientInfo` of the client being trained (its id, slot, round).
  """
  outputs: jax.Array
  batch: Batch
  params: tuple
  frozen: Any
  key: jax.Array
  anchor: tuple
  forward: Callable[[tuple, Any], jax.Array]
  client: ClientInfo | None = None


LossFn = Callable[[LossInputs], Any]


def per_example_loss(kind: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """``[B]`` losses: ``'mse'`` (mean squared error over output dims) or ``'xent'`` (integer labels).

  Raises:
    ValueError: naming both shapes, if ``'mse'`` targets do not have the outputs' shape (numpy would broadcast
      ``[B, 1]`` against ``[B, 3]`` silently) or ``'xent'`` labels are not ``outputs.shape[:-1]`` (checked at trace
      time: shapes are static, so the round still compiles once).
  """
  if kind == 'mse' and out.shape != y.shape:
    raise ValueError(f"loss 'mse' needs targets of the model outputs' shape {tuple(out.shape)}; got targets "
                     f"{tuple(y.shape)} (per batch).")
  if kind == 'xent' and y.shape != out.shape[:-1]:
    raise ValueError(f"loss 'xent' needs integer labels of shape {tuple(out.shape[:-1])} for outputs "
                     f"{tuple(out.shape)} (one label per example, no trailing axis); got labels {tuple(y.shape)}.")
  if kind == 'mse':
    return jnp.mean(jnp.square(out - y).reshape(out.shape[0], -1), axis=-1)
  if kind == 'xent':
    return optax.softmax_cross_entropy_with_integer_labels(out, y)
  raise ValueError(f'unknown loss {kind!r}; choose one of {LOSSES}.')


def task_loss(kind: str, inputs: LossInputs) -> jax.Array:
  """The built-in loss ``kind`` averaged over the batch's real rows (a building block for loss callables)."""
  return masked_mean(per_example_loss(kind, inputs.outputs, inputs.batch.y), inputs.batch.mask)


def sq_distance(a: Any, b: Any) -> jax.Array:
  """``||a - b||^2`` summed over every leaf of two pytrees of the same structure (e.g. FedProx's proximal term)."""
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def batch_metrics(kind: str, out, y, mask) -> dict[str, jax.Array]:
  """Sums over the real rows: ``loss``, ``count`` and, for classification, ``correct``."""
  m = mask.astype(jnp.float32)
  metrics = {'loss': jnp.sum(per_example_loss(kind, out, y) * m), 'count': jnp.sum(m)}
  if kind == 'xent':
    metrics['correct'] = jnp.sum((jnp.argmax(out, -1) == y) * m)
  return metrics


def resolve_loss(loss: str | LossFn, eval_loss: str | None) -> tuple[LossFn | None, str]:
  """``(callable or None for a built-in, metric kind)``; the kind ('mse' / 'xent') names evaluation's metrics."""
  if isinstance(loss, str):
    if loss not in LOSSES:
      raise ValueError(f'unknown loss {loss!r}; choose one of {LOSSES} or pass a callable.')
    if eval_loss not in (None, loss):
      raise ValueError(f'eval_loss={eval_loss!r} differs from loss={loss!r}; pass one of them.')
    return None, loss
  if not callable(loss):
    raise ValueError(f'loss must be one of {LOSSES} or a callable loss(inputs: LossInputs); got {loss!r}.')
  if eval_loss not in LOSSES:
    raise ValueError(f"a loss callable needs eval_loss='mse' or 'xent' (the metrics evaluation reports); got "
                     f'{eval_loss!r}.')
  return loss, eval_loss


def make_loss_fn(forward: Forward, loss: str | LossFn, eval_loss: str | None):
  """The client-update loss ``(trainable, frozen, batch, key, anchor) -> (value, (metrics, overrides))``."""
  custom, kind = resolve_loss(loss, eval_loss)

  def loss_fn(trainable, frozen, batch: Batch, key, anchor, client=None):
    out, overrides = forward(trainable, frozen, batch.x, key, True)
    metrics = batch_metrics(kind, out, batch.y, batch.mask)
    if custom is None:
      return masked_mean(per_example_loss(kind, out, batch.y), batch.mask), (metrics, overrides)
    again = lambda params, x: forward(params, frozen, x, jax.random.fold_in(key, 1), True)[0]
    value = custom(LossInputs(out, batch, trainable, frozen, key, anchor, again, client))
    value, extra = value if isinstance(value, tuple) else (value, {})
    metrics = dict(metrics, **extra, loss=value * metrics['count'])
    return value, (metrics, overrides)

  return loss_fn, kind


def _in_batches(fn: Callable[[Any], Any], x: Any, batch_size: int) -> Any:
  """``fn`` over the rows of ``x`` (``[N, ...]``) in batches, compiled as a loop; outputs ``[N, ...]``."""
  n = jax.tree.leaves(x)[0].shape[0]
  bs = min(batch_size, n)
  rows = jnp.arange(math.ceil(n / bs) * bs).reshape(-1, bs)
  out = jax.lax.map(lambda r: fn(jax.tree.map(lambda a: a[jnp.minimum(r, n - 1)], x)), rows)
  return jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:])[:n], out)


def supervised(*, name: str, init_params, forward: Forward, loss: str | LossFn, optimizer: optax.GradientTransformation,
               batch_size: int, num_epochs: int, shuffle: bool, aggregator: Aggregator, output_aux=None,
               eval_loss: str | None = None, eval_batch_size: int = 512, model=None, spec=None) -> Algorithm:
  """Assembles an :class:`Algorithm` from a forward function; the round runner stays generic.

  Args:
    name: the algorithm's name.
    init_params: ``(key, num_clients) -> (frozen, global_params, clients)``.
    forward: ``forward((global_params, client_state), frozen, x, key, train) -> (outputs, overrides)``.
    loss: ``'mse'``, ``'xent'`` or a callable (see the module docstring).
    optimizer: the client optimizer over ``(global_params, client_state)`` (re-initialized every round).
    batch_size, num_epochs, shuffle: local training.
    aggregator: the server's :class:`Aggregator`.
    output_aux: ``(global_params, client_state) -> aux`` for the aggregator.
    eval_loss: the metrics evaluation reports when ``loss`` is a callable (``'mse'`` or ``'xent'``).
    eval_batch_size: rows per evaluation / prediction step.
    model, spec: the :class:`ModelDef` and :class:`AdapterSpec` the algorithm exposes.
  """
  loss_fn, kind = make_loss_fn(forward, loss, eval_loss)
  client_update = make_client_update(loss_fn, optimizer, batch_size=batch_size, num_epochs=num_epochs,
                                     shuffle=shuffle, output_aux=output_aux)

  def predict(frozen, global_params, client_state, x):
    return _in_batches(lambda xb: forward((global_params, client_state), frozen, xb, jax.random.key(0), False)[0],
                       x, eval_batch_size)

  def evaluate(frozen, global_params, client_state, data: ClientData):
    x, y, count = data
    n = jax.tree.leaves(x)[0].shape[0]
    bs = min(eval_batch_size, n)
    rows = jnp.arange(math.ceil(n / bs) * bs).reshape(-1, bs)

    def one(r):
      safe = jnp.minimum(r, n - 1)
      xb, yb = jax.tree.map(lambda a: a[safe], x), jax.tree.map(lambda a: a[safe], y)
      out, _ = forward((global_params, client_state), frozen, xb, jax.random.key(0), False)
      return batch_metrics(kind, out, yb, r < count)

    return jax.tree.map(lambda m: jnp.sum(m, 0), jax.lax.map(one, rows))

  return Algorithm(init_params, client_update, aggregator, evaluate, predict=predict, model=model, spec=spec,
                   name=name, check_data=label_check(kind, predict, init_params))


def label_check(kind: str, predict, init_params):
  """For classification, a host check that every real label lies in ``[0, num_classes)`` of the model's output."""
  if kind != 'xent':
    return None

  def check(data: ClientData):
    k = int(data.count.shape[0])  # the real population: an oracle router checks its clusters against it
    frozen, g, clients = jax.eval_shape(lambda key: init_params(key, k), jax.random.key(0))
    x1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), data.x)
    out = jax.eval_shape(predict, frozen, g, jax.tree.map(lambda c: jax.ShapeDtypeStruct(c.shape[1:], c.dtype),
                                                          clients), x1)
    check_client_data(data.x, data.y, data.count, num_classes=int(out.shape[-1]))

  return check


def summarize(metrics: dict[str, jax.Array]) -> dict[str, float]:
  """Population metrics from per-client sums, weighted by example counts (as FLoRAL's ``acc_distributed``)."""
  total = float(jnp.sum(metrics['count']))
  out = {'loss': float(jnp.sum(metrics['loss'])) / max(total, 1.0), 'count': total}
  if 'correct' in metrics:
    out['accuracy'] = float(jnp.sum(metrics['correct'])) / max(total, 1.0)
  return out
