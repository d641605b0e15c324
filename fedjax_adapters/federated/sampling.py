"""Seeded client sampling: a fixed number of clients per round, so the compiled round keeps one shape."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def clients_per_round(num_clients: int, fraction: float, *, minimum: int = 1) -> int:
  """``max(minimum, int(fraction * num_clients))`` (capped at ``num_clients``)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'client fraction must lie in (0, 1]; got {fraction}.')
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1; got {num_clients}.')
  return min(num_clients, max(minimum, int(fraction * num_clients)))


def sample_clients(key: jax.Array, num_clients: int, num_sampled: int) -> jax.Array:
  """``num_sampled`` distinct client ids drawn uniformly (sorted, so gathers are deterministic). ``[M] int32``."""
  if num_sampled == num_clients:
    return jnp.arange(num_clients, dtype=jnp.int32)
  ids = jax.random.choice(key, num_clients, (num_sampled,), replace=False)
  return jnp.sort(ids).astype(jnp.int32)
