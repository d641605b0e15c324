"""Local training on one client: ``lax.scan`` over padded, masked batches.

``client_update(frozen, global_params, client_state, data, key, client) -> (ClientOutput, client_state, metrics)`` is
the contract every algorithm's client work follows (design.md); ``client`` is a :class:`ClientInfo` (the sampled
client's id, slot and round, traced). :func:`make_client_update` builds one from a loss and an
optax optimizer; it is a pure function of pytrees, so the round can ``vmap`` it over clients with ``frozen`` and
``global_params`` broadcast.

Uneven clients: a client's rows are zero-padded to the population maximum ``N``; every step takes a batch of index
rows, masks those ``>= count``, averages the loss over real rows only, and a step with no real row leaves the
parameters and optimizer state untouched (``jnp.where`` on the whole carry), so padding changes nothing.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_adapters.data.federated import check_client_data

Array = jax.Array


class ClientData(NamedTuple):
  """One client's padded data: ``x: [N, ...]``, ``y: [N, ...]``, ``count: []`` real rows."""
  x: Any
  y: Any
  count: Array


class Batch(NamedTuple):
  """A training batch: ``x: [B, ...]``, ``y: [B, ...]``, ``mask: [B]`` (False on padding rows)."""
  x: Any
  y: Any
  mask: Array


class ClientInfo(NamedTuple):
  """Who a client update is for: traced values, so a round that uses them still compiles once.

  The round passes one to every ``client_update`` (and the built-in losses pass it on to a loss callable as
  ``LossInputs.client``): per-client learning rates, a log line naming the client, or an experiment's attackers
  chosen by id need no marker smuggled through the data.

  Attributes:
    id: ``[]`` int32, the client's index in the population (``0 .. K-1``).
    slot: ``[]`` int32, its position among the round's ``M`` sampled slots.
    round: ``[]`` int32, the round being trained.
    real: ``[]`` bool, False for a padding slot (which trains but weighs nothing and writes nothing back).
  """
  id: Array
  slot: Array
  round: Array
  real: Array


def default_client_info() -> ClientInfo:
  """The :class:`ClientInfo` of a client update called outside a round: client 0, slot 0, round 0, real."""
  zero = jnp.zeros((), jnp.int32)
  return ClientInfo(zero, zero, zero, jnp.ones((), bool))


class ClientOutput(NamedTuple):
  """What a client sends to the server.

  Attributes:
    params: the client's locally updated global params (same structure as the server's).
    num_examples: number of real training examples (``[]``).
    aux: algorithm-specific extras for the aggregator (e.g. FLoRAL's router probabilities ``[C]``).
  """
  params: Any
  num_examples: Array
  aux: Any = ()


# loss_fn(trainable=(global_params, client_state), frozen, batch, key, anchor, client)
#   -> (loss, (metrics, global_overrides));
# anchor = the round's starting (global_params, client_state), e.g. for a proximal term (FedProx); client = ClientInfo.
LossFn = Callable[[tuple, Any, Batch, Array, tuple, ClientInfo], tuple[Array, tuple[dict, Any]]]


def client_data(data) -> ClientData:
  """``FederatedData`` (or any ``(x, y, counts)``) as :class:`ClientData` of jax arrays with a leading client axis.

  Shapes and counts are checked on the host (:func:`fedjax_adapters.data.federated.check_client_data`): each count
  must lie in ``[0, rows]`` (a larger count would inflate the client's weight and read padding as data; a negative
  one would give it a negative weight).
  """
  if isinstance(data, ClientData):
    return data
  x, y, counts = data
  check_client_data(x, y, counts)
  return ClientData(jax.tree.map(jnp.asarray, x), jax.tree.map(jnp.asarray, y), jnp.asarray(counts, jnp.int32))


def masked_mean(values: Array, mask: Array) -> Array:
  """Mean of ``values: [B, ...]`` over the rows where ``mask: [B]`` is True (0 when none)."""
  m = mask.reshape(mask.shape + (1,) * (values.ndim - 1)).astype(values.dtype)
  per_row = values.size // max(values.shape[0], 1)
  return jnp.sum(values * m) / jnp.maximum(jnp.sum(m) * per_row, 1.0)


def batch_indices(key: Array, num_rows: int, count: Array, *, batch_size: int, num_epochs: int,
                  shuffle: bool) -> Array:
  """Row indices ``[steps, batch_size]`` for ``num_epochs`` passes; indices ``>= count`` are padding.

  Without shuffling, batches take rows in order (FLoRAL's public code does not shuffle). With shuffling, each epoch
  permutes only the real rows; padding rows stay at the end so every real row is seen once per epoch.
  """
  steps = math.ceil(num_rows / batch_size)
  total = steps * batch_size
  rows = jnp.arange(total)
  orders = []
  for e in range(num_epochs):
    if shuffle:
      r = jax.random.uniform(jax.random.fold_in(key, e), (num_rows,))
      order = jnp.argsort(jnp.where(jnp.arange(num_rows) < count, r, 2.0 + jnp.arange(num_rows)))
      order = jnp.concatenate([order, jnp.arange(num_rows, total)])
    else:
      order = rows
    orders.append(order)
  return jnp.stack(orders).reshape(num_epochs * steps, batch_size)


def deep_update(tree: dict, overrides: dict) -> dict:
  """``tree`` with the nested dict ``overrides`` written into it (a new dict; ``tree`` is not modified)."""
  out = dict(tree)
  for k, v in overrides.items():
    out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def _where(pred, new, old):
  return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def rows_weight(metrics: dict, mask: Array) -> Array:
  """The default weight of a micro-batch's gradient: its real rows (right for a loss that is a mean over rows)."""
  del metrics
  return jnp.sum(mask.astype(jnp.float32))


def check_micro_batch(micro_batch: int | None, batch_size: int) -> int:
  """The rows per micro-batch (``batch_size`` when None); raises ValueError unless it is >= 1 and divides
  ``batch_size``."""
  if micro_batch is None:
    return batch_size
  if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
    raise ValueError(f'micro_batch must be an integer >= 1 (rows per micro-batch) or None; got {micro_batch!r}.')
  if batch_size % micro_batch:
    raise ValueError(f'micro_batch={micro_batch} does not divide batch_size={batch_size}: a step\'s batch is cut '
                     'into equal micro-batches; choose a divisor of the batch size.')
  return micro_batch


def accumulate_grads(grads_of: Callable, params, rows: Array, count: Array, key: Array, *, micro_batch: int,
                     micro_weight: Callable[[dict, Array], Array] = rows_weight) -> tuple[Any, dict, dict]:
  """One step's gradient from micro-batches: ``lax.scan`` over ``rows`` cut into ``[B // micro_batch, micro_batch]``.

  Args:
    grads_of: ``(params, rows [m], key) -> (grads, metrics, overrides)`` on the batch of those index rows.
    params: the trained pytree.
    rows: ``[B]`` index rows of the step's batch (``>= count`` are padding).
    count: ``[]`` the client's real rows.
    key: the step's key; micro-batch ``j`` gets ``fold_in(key, j)``.
    micro_batch: rows per micro-batch (divides ``B``).
    micro_weight: ``(metrics, mask [m]) -> []``, the units the micro-batch's loss averages over.

  Returns:
    ``(grads, metrics, {})``: the gradients averaged weighted by ``micro_weight`` (the full batch's gradient for a
    loss that is a mean over those units), the metric sums added over micro-batches. A micro-batch as large as the
    batch is the plain ``grads_of(params, rows, key)``.
  """
  if micro_batch >= rows.shape[0]:
    return grads_of(params, rows, key)

  def body(acc, inp):
    part, j = inp
    grads, metrics, overrides = grads_of(params, part, jax.random.fold_in(key, j))
    if overrides:
      raise ValueError("micro-batching cannot carry a loss's parameter overrides (batch statistics); use "
                       'micro_batch=None')
    w = jnp.asarray(micro_weight(metrics, part < count), jnp.float32)
    return jax.tree.map(lambda a, b: a + b, acc, (jax.tree.map(lambda g: w * g, grads), w, metrics)), None

  parts = rows.reshape(rows.shape[0] // micro_batch, micro_batch)
  metric_shapes = jax.eval_shape(lambda: grads_of(params, parts[0], key)[1])
  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
  (grad_sum, weight_sum, metrics), _ = jax.lax.scan(body, init, (parts, jnp.arange(parts.shape[0])))
  grads = jax.tree.map(lambda g: (g / jnp.where(weight_sum > 0, weight_sum, 1.0)).astype(g.dtype), grad_sum)
  return grads, metrics, {}


def _pick(train: str, g, l):
  """The trained half of ``(global_params, client_state)`` for ``train`` ('both', 'global' or 'client')."""
  return (g, l) if train == 'both' else (g if train == 'global' else l)


def _unpick(train: str, t, g, l):
  """``(global_params, client_state)`` with the trained half ``t`` put back in place (inverse of :func:`_pick`)."""
  return t if train == 'both' else ((t, l) if train == 'global' else (g, t))


def _check_update_args(train: str, batch_size: int, num_epochs: int, micro_batch: int | None) -> int:
  """Validates :func:`make_client_update`'s settings; returns the micro-batch (the batch when None)."""
  if train not in ('both', 'global', 'client'):
    raise ValueError(f"train must be 'both', 'global' or 'client'; got {train!r}.")
  if batch_size < 1 or num_epochs < 1:
    raise ValueError(f'batch_size and num_epochs must be >= 1; got {batch_size}, {num_epochs}.')
  return check_micro_batch(micro_batch, batch_size)


def make_client_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *, batch_size: int,
                       num_epochs: int = 1, shuffle: bool = False, train: str = 'both',
                       output_aux: Callable[[Any, Any], Any] | None = None, micro_batch: int | None = None,
                       micro_weight: Callable[[dict, Array], Array] = rows_weight):
  """Builds ``client_update`` for one local phase.

  Args:
    loss_fn: ``loss_fn((global_params, client_state), frozen, batch, key, anchor, client) -> (loss, (metrics,
      overrides))``; ``anchor`` is the round's starting ``(global_params, client_state)`` (constant during the
      phase; e.g. FedProx's proximal term); ``client`` the :class:`ClientInfo`; ``metrics`` is a dict of sums over the batch's real rows;
      ``overrides`` a nested dict written into the updated global params after the optimizer step (batch-norm
      running statistics, e.g. ``{'stats': ...}``), or ``{}``.
    optimizer: optax transformation over the trained pytree (``(global, local)``, or one of them; see ``train``).
      Re-initialized every call: both papers reset client optimizers each round / phase.
    batch_size: rows per step.
    num_epochs: passes over the client's rows.
    shuffle: permute real rows each epoch.
    train: ``'both'``, ``'global'`` or ``'client'``: which half (global params, the client's own state) gets
      gradients and updates.
    output_aux: ``(global_params, client_state) -> aux`` sent to the aggregator (default ``()``).
    micro_batch: rows per micro-batch (gradient accumulation; None: the whole batch at once). Each step's
      ``batch_size`` rows are cut into ``batch_size // micro_batch`` micro-batches, and a ``lax.scan`` takes the
      gradient of one at a time, so the step's activation memory scales with ``micro_batch``, not ``batch_size``.
      Their gradients are averaged weighted by ``micro_weight`` before the one optimizer step. Must divide
      ``batch_size``. Dropout draws its masks per micro-batch (same distribution, other draws than the full batch).
    micro_weight: ``(metrics, mask [micro_batch]) -> []`` the weight of a micro-batch's gradient: how many units
      its loss averages over (default :func:`rows_weight`, the real rows; a token-mean loss passes its token
      count). With it the accumulated gradient equals the full batch's.

  Returns:
    ``client_update(frozen, global_params, client_state, data: ClientData, key, client=None) -> (ClientOutput,
    client_state, metrics)``; ``client`` is the round's :class:`ClientInfo` (:func:`default_client_info` when
    called outside a round).
  """
  micro_batch = _check_update_args(train, batch_size, num_epochs, micro_batch)

  pick = functools.partial(_pick, train)
  unpick = functools.partial(_unpick, train)
  def client_update(frozen, global_params, client_state, data: ClientData, key, client: ClientInfo | None = None):
    client = default_client_info() if client is None else client
    x, y, count = data
    num_rows = jax.tree.leaves(x)[0].shape[0]
    idx = batch_indices(key, num_rows, count, batch_size=batch_size, num_epochs=num_epochs, shuffle=shuffle)
    params = pick(global_params, client_state)
    opt_state = optimizer.init(params)

    def grads_of(params, rows, key):
      """``(grads, metrics, overrides)`` of the loss on the batch of index ``rows``."""
      mask = rows < count
      safe = jnp.minimum(rows, num_rows - 1)
      batch = Batch(jax.tree.map(lambda a: a[safe], x), jax.tree.map(lambda a: a[safe], y), mask)

      def loss_of(p):
        return loss_fn(unpick(p, global_params, client_state), frozen, batch, key, (global_params, client_state),
                       client)

      (_, (metrics, overrides)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      return grads, metrics, overrides

    def step(carry, inp):
      params, opt_state = carry
      rows, i = inp
      mask = rows < count
      key_i = jax.random.fold_in(key, 1_000_003 + i)
      grads, metrics, overrides = accumulate_grads(grads_of, params, rows, count, key_i, micro_batch=micro_batch,
                                                   micro_weight=micro_weight)
      updates, new_opt = optimizer.update(grads, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      if overrides and train != 'client':
        # Batch-norm running statistics come from the forward pass, not from the optimizer.
        g_new, l_new = unpick(new_params, global_params, client_state)
        new_params = pick(deep_update(g_new, overrides), l_new)
      active = jnp.any(mask)
      carry = _where(active, (new_params, new_opt), (params, opt_state))
      metrics = jax.tree.map(lambda m: jnp.where(active, m, jnp.zeros_like(m)), metrics)
      return carry, metrics

    steps = jnp.arange(idx.shape[0])
    (params, _), metrics = jax.lax.scan(step, (params, opt_state), (idx, steps))
    new_global, new_local = unpick(params, global_params, client_state)
    aux = output_aux(new_global, new_local) if output_aux is not None else ()
    metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
    return ClientOutput(new_global, count, aux), new_local, metrics

  return client_update
