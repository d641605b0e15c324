"""FedDPA's dual adapter: a global LoRA and a local LoRA combined with per-example weights.

FedDPA (arXiv 2403.19211) adds two LoRA deltas to a frozen layer, ``y = W0 x + s (w_g * dG(x) + w_l * dL(x))``:
training FedDPA-T's local phase uses ``w_l = a, w_g = 1 - a`` with the global delta detached; inference uses the
instance-wise weight ``w`` on one of the two (the public code: on the global one, local at 1). Weights are scalars or
one value per example (``[B]``), so a batch can mix every example differently.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def example_weight(weight: Array | float, like: Array) -> Array:
  """Broadcasts a scalar or per-example ``[B]`` weight against ``like: [B, ...]``."""
  weight = jnp.asarray(weight, like.dtype)
  if weight.ndim == 0:
    return weight
  if weight.ndim != 1 or weight.shape[0] != like.shape[0]:
    raise ValueError(f'per-example weights have shape {tuple(weight.shape)}, but the batch has '
                     f'{like.shape[0]} examples (activation shape {tuple(like.shape)}).')
  return weight.reshape(weight.shape + (1,) * (like.ndim - 1))


def dual_delta(global_delta: Array, local_delta: Array, global_weight: Array | float,
               local_weight: Array | float, *, stop_global: bool = False, stop_local: bool = False) -> Array:
  """``w_g * dG + w_l * dL`` with per-example weights; optionally detaches one side (FedDPA-T local phase).

  Args:
    global_delta: ``[B, ..., d]`` output of the global adapter.
    local_delta: ``[B, ..., d]`` output of the local adapter.
    global_weight: scalar or ``[B]``.
    local_weight: scalar or ``[B]``.
    stop_global: detach the global delta (only the local adapter gets gradients).
    stop_local: detach the local delta.

  Returns:
    ``[B, ..., d]``.
  """
  if stop_global:
    global_delta = jax.lax.stop_gradient(global_delta)
  if stop_local:
    local_delta = jax.lax.stop_gradient(local_delta)
  return (example_weight(global_weight, global_delta) * global_delta
          + example_weight(local_weight, local_delta) * local_delta)
