"""FLoRAL's router: C logits per client -> mixture weights over the C shared adaptors.

pi = max(softmax((w + xi) / T), floor), with xi ~ noise_std * U[0, 1) redrawn for every training batch and no noise
at evaluation (FLoRAL public code, ``floral/model/router.py`` and ``LoRAList.forward``). The floor is not
renormalized, so every adaptor keeps receiving a gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def router_probs(logits: Array, key: Array | None = None, *, num_adaptors: int | None = None, train: bool = False,
                 temperature: float = 1.0, noise_std: float = 1.0, floor: float | None = 0.01) -> Array:
  """Mixture weights from router logits.

  Args:
    logits: ``[C]`` router logits.
    key: PRNG key for the training noise (required when ``train`` and ``noise_std > 0``).
    num_adaptors: if given, the number of adaptors the model holds; a different ``C`` raises.
    train: add uniform noise ``noise_std * U[0, 1)`` to the logits.
    temperature: softmax temperature ``T``.
    noise_std: scale of the uniform training noise.
    floor: lower bound applied after the softmax (``None`` disables it).

  Returns:
    ``[C]`` mixture weights.
  """
  if logits.ndim != 1:
    raise ValueError(f'router logits must be a vector [C]; got shape {tuple(logits.shape)}.')
  if num_adaptors is not None and logits.shape[0] != num_adaptors:
    raise ValueError(f'router has {logits.shape[0]} logits but the model holds {num_adaptors} adaptors.')
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0; got {temperature}.')
  z = logits
  if train and noise_std:
    if key is None:
      raise ValueError('router_probs(train=True) needs a PRNG key for the router noise.')
    z = z + noise_std * jax.random.uniform(key, z.shape, z.dtype)
  pi = jax.nn.softmax(z / temperature)
  if floor is not None:
    pi = jnp.maximum(pi, floor)
  return pi


def aggregation_probs(logits: Array, temperature: float = 1.0) -> Array:
  """``p(c|k) = softmax(w_k / T)`` without noise or floor, as the server uses it. ``[..., C] -> [..., C]``."""
  return jax.nn.softmax(logits / temperature, axis=-1)


def oracle_logits(cluster: Array, num_adaptors: int, *, off_value: float = -100.0) -> Array:
  """The public code's optimal router: 0 at the true cluster, ``off_value`` elsewhere. ``[K] -> [K, C]``."""
  return jnp.where(jax.nn.one_hot(cluster, num_adaptors) > 0, 0.0, off_value)
