"""User-level differential privacy in the aggregator: per-client clipping, a fixed denominator, Gaussian noise.

:func:`dp_aggregator` wraps any :class:`Aggregator`. Every round, for each sampled client ``k`` with weight > 0
(padding, rejected and empty clients contribute nothing):

* ``u_k = params_k - global_params`` over everything the aggregator receives (the federated part of the update;
  local adapters and router logits stay on the client and are never read), optionally re-weighted per adaptor
  (``mixture_keys``, FLoRAL: adaptor ``c`` of client ``k`` enters as ``C p(c|k) u_{k,c}``);
* clipped: ``u_k * min(1, clip / ||u_k||_2)``;
* summed with uniform weights, noised and divided by the *fixed* expected cohort size ``n``:
  ``mean = (sum_k clip(u_k) + N(0, (z clip)^2 I)) / n``.

Changing one client's data then moves the noiseless sum by at most ``clip`` (add/remove a client), whatever its
example count, so the Gaussian mechanism with noise multiplier ``z`` applies. Example-count weights
``n_k / sum n_k`` would let one client with many examples dominate the mean and make the realized denominator depend
on the client set: the sensitivity would be unbounded. The noisy mean ``global_params + mean`` is then handed to the
wrapped aggregator as a single client of weight 1, so its server optimizer (FedAvg, FedAdam) and any user reducer run
as usual on released, already private values.

With ``DPConfig(mechanism='tree', tree_steps=P)`` the same clipped sums are released as noisy prefix sums through
the binary-tree mechanism instead (DP-FTRL, no sampling needed): :mod:`fedjax_adapters.federated.dp_ftrl`.

The noise is drawn from ``RoundInfo.key`` (the server key, the same on every host and in every client mapping), so a
chunked, sequential or sharded round adds the same noise as the vmapped one.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"): with
``adaptive_quantile=gamma`` the clip norm is state of the aggregator; every round
``b = (sum_k 1[||u_k|| <= clip] + N(0, sigma_b^2)) / n`` and ``clip <- clip * exp(-lr (b - gamma))``. The given
``noise_multiplier`` ``z`` is then the total one the accountant sees; the update's noise uses
``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Theorem 1 of the paper), so the quantile estimate costs no extra epsilon.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from fedjax_adapters.federated.aggregators import Aggregator, RoundInfo
from fedjax_adapters.federated.client_update import ClientOutput

Array = jax.Array


class DPConfig(NamedTuple):
  """The Gaussian mechanism's parameters (validated by :func:`check_dp`).

  Attributes:
    clip: L2 bound of one client's update (the initial bound with adaptive clipping).
    noise_multiplier: ``z``: the noise std on the clipped sum is ``z * clip``.
    expected_clients: the fixed denominator ``n`` (the expected cohort: ``M`` fixed, ``q N`` Poisson).
    adaptive_quantile: target quantile ``gamma`` in (0, 1) of the client norms (None: fixed clip).
    clip_lr: geometric step ``lr`` of the adaptive clip.
    count_stddev: ``sigma_b`` of the noised count (None: ``expected_clients / 20``, the paper's choice).
    mechanism: ``'gaussian'`` (DP-FedAvg: fresh noise on every round's sum) or ``'tree'`` (DP-FTRL: noisy prefix
      sums by tree aggregation, :mod:`fedjax_adapters.federated.dp_ftrl`; ``noise_multiplier`` is per tree node).
    tree_steps: ``P``, the rounds of one tree before it restarts (``'tree'`` only; ``num_clients // M`` with
      cyclic sampling).
  """
  clip: float
  noise_multiplier: float
  expected_clients: float
  adaptive_quantile: float | None = None
  clip_lr: float = 0.2
  count_stddev: float | None = None
  mechanism: str = 'gaussian'
  tree_steps: int | None = None


MECHANISMS = ('gaussian', 'tree')


def check_dp(cfg: DPConfig) -> DPConfig:
  """Raises ValueError naming the offending value; returns ``cfg``."""
  if not (math.isfinite(cfg.clip) and cfg.clip > 0):
    raise ValueError(f'dp clip must be a finite number > 0; got {cfg.clip}.')
  if not (math.isfinite(cfg.noise_multiplier) and cfg.noise_multiplier >= 0):
    raise ValueError(f'dp noise_multiplier must be a finite number >= 0; got {cfg.noise_multiplier}.')
  if not cfg.expected_clients > 0:
    raise ValueError(f'dp expected_clients must be > 0; got {cfg.expected_clients}.')
  _check_mechanism(cfg)
  q = cfg.adaptive_quantile
  if q is not None and not 0 < q < 1:
    raise ValueError(f'dp adaptive_quantile must lie in (0, 1); got {q}.')
  if q is not None and not cfg.clip_lr > 0:
    raise ValueError(f'dp clip_lr must be > 0; got {cfg.clip_lr}.')
  if q is not None and cfg.noise_multiplier > 0 and not 2 * count_stddev(cfg) > cfg.noise_multiplier:
    raise ValueError(f'dp noise_multiplier {cfg.noise_multiplier} must be below 2 * count_stddev = '
                     f'{2 * count_stddev(cfg)} for adaptive clipping (the count would take all the noise).')
  return cfg


def _check_mechanism(cfg: DPConfig) -> None:
  if cfg.mechanism not in MECHANISMS:
    raise ValueError(f'dp mechanism must be one of {MECHANISMS}; got {cfg.mechanism!r}.')
  if cfg.mechanism == 'gaussian':
    if cfg.tree_steps is not None:
      raise ValueError(f"dp tree_steps={cfg.tree_steps} needs mechanism='tree'.")
    return
  if not (isinstance(cfg.tree_steps, int) and cfg.tree_steps >= 1):
    raise ValueError(f"dp mechanism='tree' needs tree_steps, an int >= 1; got {cfg.tree_steps!r}.")
  if cfg.adaptive_quantile is not None:
    raise ValueError(f"dp adaptive_quantile={cfg.adaptive_quantile} is not supported with mechanism='tree'.")


def count_stddev(cfg: DPConfig) -> float:
  """``sigma_b`` of the adaptive clip's noised count (``expected_clients / 20`` unless given)."""
  return cfg.expected_clients / 20.0 if cfg.count_stddev is None else float(cfg.count_stddev)


def update_noise_multiplier(cfg: DPConfig) -> float:
  """The noise multiplier of the update itself: ``z``, or ``(z^-2 - (2 sigma_b)^-2)^-1/2`` with adaptive clipping."""
  z = cfg.noise_multiplier
  if cfg.adaptive_quantile is None or z == 0:
    return z
  return (z ** -2 - (2 * count_stddev(cfg)) ** -2) ** -0.5


def client_contributions(global_params: Any, params: Any, probs: Array | None = None,
                         mixture_keys: Sequence[str] = ()) -> Any:
  """``u_k = params_k - global_params`` (``[M, ...]`` leaves); under ``mixture_keys`` adaptor ``c``: ``C p(c|k) u``.

  Args:
    global_params: the server's params (dict when ``mixture_keys`` is given).
    params: the clients' updated global params, leaves ``[M, ...]``.
    probs: ``[M, C]`` ``p(c|k)`` (needed with ``mixture_keys``); the factor ``C`` makes the fixed denominator ``n``
      the expected weight ``sum_k p(c|k) ~ n / C`` of each adaptor under balanced use.
    mixture_keys: top-level keys whose leaves carry the adaptor axis ``[M, C, ...]``.
  """
  delta = jax.tree.map(lambda p, g: p.astype(jnp.float32) - g.astype(jnp.float32)[None], params, global_params)
  if not mixture_keys:
    return delta
  w = probs.astype(jnp.float32) * probs.shape[1]

  def scale(x):
    return x * w.reshape(w.shape + (1,) * (x.ndim - 2))

  return {k: (jax.tree.map(scale, v) if k in mixture_keys else v) for k, v in delta.items()}


def flat_norms(tree: Any) -> Array:
  """``[M]`` L2 norm of each client's row over every leaf ``[M, ...]``."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1) for x in jax.tree.leaves(tree)))


def clipped_sum(contrib: Any, norms: Array, mask: Array, clip: Array) -> Any:
  """``sum_k mask_k u_k min(1, clip / ||u_k||)`` leaf by leaf (rows off the mask may hold anything, even NaN)."""
  factor = jnp.where(mask, jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30)), 0.0)

  def one(x):
    x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, 0.0)
    return jnp.tensordot(factor, x, axes=(0, 0))

  return jax.tree.map(one, contrib)


def gaussian_noise(key: Array, tree: Any, std: Array) -> Any:
  """``N(0, std^2)`` with the shape of every leaf, one key per leaf split from ``key``."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])


def adapt_clip(clip: Array, norms: Array, mask: Array, key: Array, cfg: DPConfig) -> Array:
  """One step of the adaptive clip: ``clip * exp(-lr (b - gamma))`` with the noised fraction ``b`` under ``clip``."""
  below = jnp.sum(jnp.where(mask & (norms <= clip), 1.0, 0.0))
  noise = count_stddev(cfg) * jax.random.normal(key, (), jnp.float32) if cfg.noise_multiplier > 0 else 0.0
  b = (below + noise) / cfg.expected_clients
  return clip * jnp.exp(-cfg.clip_lr * (b - cfg.adaptive_quantile))


def single_client(target: Any, client_outputs: ClientOutput, weights: Array) -> tuple[ClientOutput, Array]:
  """``(outputs, weights)`` of one client holding ``target`` (``[1, ...]`` params, weight 1, aux of ones)."""
  one = ClientOutput(jax.tree.map(lambda x: x[None], target), jnp.ones((1,), client_outputs.num_examples.dtype),
                     jax.tree.map(lambda a: jnp.ones_like(a[:1]), client_outputs.aux))
  return one, jnp.ones((1,), weights.dtype)


class DPState(NamedTuple):
  """The DP aggregator's state: the wrapped aggregator's and the current clip norm ``[]``."""
  inner: Any
  clip: Array


def dp_aggregator(aggregator: Aggregator, cfg: DPConfig, *, mixture_keys: Sequence[str] = (),
                  probs_key: str = 'router_probs') -> Aggregator:
  """``aggregator`` fed the clipped, noised mean of the clients' updates (see the module docstring).

  Args:
    aggregator: the algorithm's aggregator (``mean_aggregator``, ``router_aggregator``, FLoRAL's balanced one, yours).
      It receives one client (``[1, ...]`` params ``global + mean``, weight 1, aux of ones ``[1, ...]``).
    cfg: the :class:`DPConfig` (checked here).
    mixture_keys: keys of per-adaptor leaves weighted by ``C p(c|k)`` (FLoRAL: ``('adapters',)``); others uniform.
    probs_key: key of ``client_outputs.aux`` with ``p(c|k)`` ``[M, C]`` (used with ``mixture_keys``).

  With ``cfg.mechanism == 'tree'`` this is :func:`~fedjax_adapters.federated.dp_ftrl.dp_ftrl_aggregator`.
  """
  check_dp(cfg)
  if cfg.mechanism == 'tree':
    from fedjax_adapters.federated.dp_ftrl import dp_ftrl_aggregator  # pylint: disable=g-import-not-at-top  (cycle)
    return dp_ftrl_aggregator(aggregator, cfg, mixture_keys=mixture_keys, probs_key=probs_key)
  z_update = update_noise_multiplier(cfg)

  def init(global_params):
    return DPState(aggregator.init(global_params), jnp.asarray(cfg.clip, jnp.float32))

  def aggregate(global_params, client_outputs: ClientOutput, weights, agg_state: DPState, info: RoundInfo):
    probs = client_outputs.aux[probs_key] if mixture_keys else None
    contrib = client_contributions(global_params, client_outputs.params, probs, mixture_keys)
    mask = weights > 0
    # Without adaptor re-weighting the contribution is the screen's update, so its norms are reused.
    norms = flat_norms(contrib) if mixture_keys or info.update_norms is None else info.update_norms
    clip = agg_state.clip
    total = clipped_sum(contrib, norms, mask, clip)
    noise_key, count_key = jax.random.split(info.key)
    noise = gaussian_noise(noise_key, total, z_update * clip)
    target = jax.tree.map(lambda g, s, e: (g.astype(jnp.float32) + (s + e) / cfg.expected_clients).astype(g.dtype),
                          global_params, total, noise)
    new, inner = aggregator.aggregate(global_params, *single_client(target, client_outputs, weights), agg_state.inner,
                                      info)
    if cfg.adaptive_quantile is not None:
      clip = adapt_clip(clip, norms, mask, count_key, cfg)
    return new, DPState(inner, clip)

  return Aggregator(init, aggregate)
