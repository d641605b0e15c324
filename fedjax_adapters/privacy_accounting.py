"""Privacy accounting of :func:`~fedjax_adapters.federated.privacy.dp_aggregator` with ``dp-accounting`` (RDP).

One round is a sampled Gaussian mechanism on the clipped sum:

* Poisson sampling with rate ``q`` (add/remove one client, sensitivity ``clip``): ``PoissonSampledDpEvent(q,
  GaussianDpEvent(z))``;
* fixed-size sampling of ``m`` of ``N`` clients without replacement: ``dp-accounting`` models it under the
  replace-one relation, where the clipped sum moves by up to ``2 clip``, so the event is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``.

``r`` rounds compose as ``SelfComposedDpEvent(event, r)``. Adaptive clipping adds nothing here: its noised count
is paid for inside ``z`` (see :func:`~fedjax_adapters.federated.privacy.update_noise_multiplier`).

DP-FTRL (``mechanism='tree'``, :mod:`fedjax_adapters.federated.dp_ftrl`) needs ``sampling='cyclic'``: every client
at most once per tree of ``P = num_clients // M`` rounds. Each tree is dp-accounting's
``SingleEpochTreeAggregationDpEvent(z, P)`` (replace-one-by-a-null-client relation, ``REPLACE_SPECIAL``); ``r``
rounds are ``r // P`` full trees and one tree of ``r mod P`` steps, composed.
"""
from __future__ import annotations

import math

import dp_accounting
from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

SAMPLINGS = ('poisson', 'fixed', 'cyclic')
MECHANISMS = ('gaussian', 'tree')
MIN_NOISE_MULTIPLIER = 0.1  # the calibration's search starts here (targets needing less noise are not served)


def check_accounting(sampling: str, num_clients: int, clients_per_round: float, delta: float,
                     mechanism: str = 'gaussian') -> None:
  """Raises ValueError naming the offending value."""
  if sampling not in SAMPLINGS:
    raise ValueError(f'dp sampling must be one of {SAMPLINGS}; got {sampling!r}.')
  if mechanism not in MECHANISMS:
    raise ValueError(f'dp mechanism must be one of {MECHANISMS}; got {mechanism!r}.')
  if mechanism == 'tree' and sampling != 'cyclic':
    raise ValueError(f"dp mechanism 'tree' needs sampling 'cyclic' (each client at most once per tree, what the tree's "
                     f"accounting assumes; no amplification by sampling); got sampling {sampling!r}.")
  if sampling == 'cyclic' and mechanism != 'tree':
    raise ValueError(f"dp sampling 'cyclic' needs mechanism 'tree' (the Gaussian mechanism's accounting models random "
                     f"sampling); got mechanism {mechanism!r}.")
  if not 0 < delta < 1:
    raise ValueError(f'dp delta must lie in (0, 1); got {delta}.')
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f'clients per round must lie in (0, num_clients={num_clients}]; got {clients_per_round}.')
  if sampling in ('fixed', 'cyclic') and clients_per_round != int(clients_per_round):
    raise ValueError(f'fixed-size sampling needs a whole number of clients per round; got {clients_per_round}.')


def round_event(noise_multiplier: float, sampling: str, num_clients: int, clients_per_round: float):
  """The ``DpEvent`` of one round (``clients_per_round``: ``m`` for fixed, ``q N`` for Poisson)."""
  if sampling == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients,
                                               dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, int(clients_per_round),
                                                        dp_accounting.GaussianDpEvent(noise_multiplier / 2))


def tree_event(noise_multiplier: float, rounds: int, tree_steps: int):
  """``rounds`` of DP-FTRL with a tree restarted every ``tree_steps``: full trees, then the partial one, composed."""
  full, rest = divmod(int(rounds), int(tree_steps))
  events = []
  if full:
    events.append(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, int(tree_steps)), full))
  if rest:
    events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rest))
  return dp_accounting.ComposedDpEvent(events)


def run_event(noise_multiplier: float, rounds: int, *, sampling: str, num_clients: int, clients_per_round: float):
  """The ``DpEvent`` of ``rounds`` rounds (``cyclic``: DP-FTRL's trees of ``num_clients // M`` rounds)."""
  if sampling == 'cyclic':
    return tree_event(noise_multiplier, rounds, num_clients // int(clients_per_round))  # cyclic_sampling's epoch
  return dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, sampling, num_clients, clients_per_round),
                                           rounds)


def make_accountant(sampling: str) -> dp_accounting.rdp.RdpAccountant:
  """A fresh RDP accountant with the neighbouring relation the sampling's event needs."""
  rel = dp_accounting.NeighboringRelation
  relation = {'poisson': rel.ADD_OR_REMOVE_ONE, 'fixed': rel.REPLACE_ONE, 'cyclic': rel.REPLACE_SPECIAL}[sampling]
  return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(noise_multiplier: float, rounds: int, *, delta: float, sampling: str, num_clients: int,
            clients_per_round: float, mechanism: str = 'gaussian') -> float:
  """Epsilon for ``delta`` after ``rounds`` rounds (``inf`` without noise; 0 after 0 rounds)."""
  check_accounting(sampling, num_clients, clients_per_round, delta, mechanism)
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  acc = make_accountant(sampling)
  acc.compose(run_event(noise_multiplier, rounds, sampling=sampling, num_clients=num_clients,
                        clients_per_round=clients_per_round))
  return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, *, delta: float, rounds: int, sampling: str, num_clients: int,
                    clients_per_round: float, mechanism: str = 'gaussian') -> float:
  """The smallest noise multiplier whose epsilon after ``rounds`` is at most ``target_epsilon`` (for ``delta``)."""
  check_accounting(sampling, num_clients, clients_per_round, delta, mechanism)
  if not (math.isfinite(target_epsilon) and target_epsilon > 0):
    raise ValueError(f'dp epsilon must be a finite number > 0; got {target_epsilon}.')
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1 to calibrate noise; got {rounds}.')
  floor = epsilon(MIN_NOISE_MULTIPLIER, rounds, delta=delta, sampling=sampling, num_clients=num_clients,
                  clients_per_round=clients_per_round, mechanism=mechanism)
  if floor <= target_epsilon:
    raise ValueError(f'dp epsilon {target_epsilon} is reached with less noise than the calibration searches (noise '
                     f'multiplier {MIN_NOISE_MULTIPLIER} already gives epsilon {floor:.3g}); give the noise multiplier '
                     'instead.')
  try:
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(sampling),
        lambda z: run_event(z, rounds, sampling=sampling, num_clients=num_clients,
                            clients_per_round=clients_per_round),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0)))
  except (ValueError, RuntimeError, ArithmeticError, NoBracketIntervalFoundError) as e:
    raise ValueError(f'dp epsilon {target_epsilon} is unreachable for {rounds} rounds at delta {delta}: {e}') from e
