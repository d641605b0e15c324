"""Client steps and client-steps per second: the cost column beside the accuracy in both runners' report tables.

A *client step* is one local optimizer step of one client on a batch holding at least one of its real examples
(a batch of padding only is skipped by the client update, ``federated.client_update``). A round's client steps are
summed over the clients it trains; a unit's over its rounds. The rate divides them by the unit's recorded wall
``seconds`` (compile, training, evaluation and checkpoints included), on the machine the run was made on.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def local_steps(counts, *, batch_size: int, num_epochs: int) -> np.ndarray:
  """``[K]`` optimizer steps of one local phase: ``num_epochs * ceil(n_k / batch_size)`` (0 for an empty client)."""
  n = np.asarray(counts, np.int64)
  return num_epochs * (-(-n // int(batch_size)))


def method_steps(units: Iterable[dict[str, Any]]) -> int | None:
  """The client steps of a method's units summed, or None when a unit did not record them (an older run)."""
  steps = [u.get('client_steps') for u in units]
  if not steps or any(s is None for s in steps):
    return None
  return int(sum(steps))


def rate(client_steps: float | None, seconds: float | None) -> float | None:
  """Client steps per second, or None when either is unknown or no time was recorded."""
  if client_steps is None or not seconds:
    return None
  return float(client_steps) / float(seconds)


def format_rate(value: float | None) -> str:
  """``'3,846'`` (client-steps/s to the unit; ``''`` when unknown)."""
  return '' if value is None else f'{value:,.0f}'
