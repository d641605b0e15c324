"""Privacy accounting of :func:`~fedjax_adapters.federated.privacy.dp_aggregator` with ``dp-accounting`` (RDP).

One round is a sampled Gaussian mechanism on the clipped sum:

* Poisson sampling with rate ``q`` (add/remove one client, sensitivity ``clip``): ``PoissonSampledDpEvent(q,
  GaussianDpEvent(z))``;
* fixed-size sampling of ``m`` of ``N`` clients without replacement: ``dp-accounting`` models it under the
  replace-one relation, where the clipped sum moves by up to ``2 clip``, so the event is
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``.

``r`` rounds compose as ``SelfComposedDpEvent(event, r)``. Adaptive clipping adds nothing here: its noised count
is paid for inside ``z`` (see :func:`~fedjax_adapters.federated.privacy.update_noise_multiplier`).
"""
from __future__ import annotations

import math

import dp_accounting
from dp_accounting.mechanism_calibration import NoBracketIntervalFoundError

SAMPLINGS = ('poisson', 'fixed')
MIN_NOISE_MULTIPLIER = 0.1  # the calibration's search starts here (targets needing less noise are not served)


def check_accounting(sampling: str, num_clients: int, clients_per_round: float, delta: float) -> None:
  """Raises ValueError naming the offending value."""
  if sampling not in SAMPLINGS:
    raise ValueError(f'dp sampling must be one of {SAMPLINGS}; got {sampling!r}.')
  if not 0 < delta < 1:
    raise ValueError(f'dp delta must lie in (0, 1); got {delta}.')
  if not 0 < clients_per_round <= num_clients:
    raise ValueError(f'clients per round must lie in (0, num_clients={num_clients}]; got {clients_per_round}.')
  if sampling == 'fixed' and clients_per_round != int(clients_per_round):
    raise ValueError(f'fixed-size sampling needs a whole number of clients per round; got {clients_per_round}.')


def round_event(noise_multiplier: float, sampling: str, num_clients: int, clients_per_round: float):
  """The ``DpEvent`` of one round (``clients_per_round``: ``m`` for fixed, ``q N`` for Poisson)."""
  if sampling == 'poisson':
    return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients,
                                               dp_accounting.GaussianDpEvent(noise_multiplier))
  return dp_accounting.SampledWithoutReplacementDpEvent(num_clients, int(clients_per_round),
                                                        dp_accounting.GaussianDpEvent(noise_multiplier / 2))


def make_accountant(sampling: str) -> dp_accounting.rdp.RdpAccountant:
  """A fresh RDP accountant with the neighbouring relation the sampling's event needs."""
  rel = dp_accounting.NeighboringRelation
  return dp_accounting.rdp.RdpAccountant(
      neighboring_relation=rel.ADD_OR_REMOVE_ONE if sampling == 'poisson' else rel.REPLACE_ONE)


def epsilon(noise_multiplier: float, rounds: int, *, delta: float, sampling: str, num_clients: int,
            clients_per_round: float) -> float:
  """Epsilon for ``delta`` after ``rounds`` rounds (``inf`` without noise; 0 after 0 rounds)."""
  check_accounting(sampling, num_clients, clients_per_round, delta)
  if rounds == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  acc = make_accountant(sampling)
  acc.compose(round_event(noise_multiplier, sampling, num_clients, clients_per_round), rounds)
  return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, *, delta: float, rounds: int, sampling: str, num_clients: int,
                    clients_per_round: float) -> float:
  """The smallest noise multiplier whose epsilon after ``rounds`` is at most ``target_epsilon`` (for ``delta``)."""
  check_accounting(sampling, num_clients, clients_per_round, delta)
  if not (math.isfinite(target_epsilon) and target_epsilon > 0):
    raise ValueError(f'dp epsilon must be a finite number > 0; got {target_epsilon}.')
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1 to calibrate noise; got {rounds}.')
  floor = epsilon(MIN_NOISE_MULTIPLIER, rounds, delta=delta, sampling=sampling, num_clients=num_clients,
                  clients_per_round=clients_per_round)
  if floor <= target_epsilon:
    raise ValueError(f'dp epsilon {target_epsilon} is reached with less noise than the calibration searches (noise '
                     f'multiplier {MIN_NOISE_MULTIPLIER} already gives epsilon {floor:.3g}); give the noise multiplier '
                     'instead.')
  try:
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(sampling),
        lambda z: dp_accounting.SelfComposedDpEvent(round_event(z, sampling, num_clients, clients_per_round), rounds),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0)))
  except (ValueError, RuntimeError, ArithmeticError, NoBracketIntervalFoundError) as e:
    raise ValueError(f'dp epsilon {target_epsilon} is unreachable for {rounds} rounds at delta {delta}: {e}') from e
