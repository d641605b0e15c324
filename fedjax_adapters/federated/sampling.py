"""Seeded client sampling. A round has a fixed number of slots ``M`` so that it compiles once; how the slots fill is a
:class:`Sampling` value:

* :func:`fixed_sampling` — ``M`` distinct clients drawn uniformly without replacement every round (the default);
* :func:`poisson_sampling` — every client joins independently with probability ``q``; the variable cohort fills the
  first slots and the rest are padding (``client_mask`` False). A cohort larger than ``max_clients`` is cut to a
  uniformly random subset of that size, and the round reports how many joined (``metrics['cohort']``), so a run can
  count or refuse overflowing rounds. Poisson sampling is what the differential-privacy accountants model as
  "sampling with probability q";
* :func:`cyclic_sampling` — no sampling: epoch ``e`` (``P = num_clients // M`` rounds) is a seeded permutation of the
  clients cut into ``P`` blocks of ``M``, so every client trains at most once per epoch (what DP-FTRL's tree
  aggregation assumes, see :mod:`fedjax_adapters.federated.dp_ftrl`).

All draw from the experiment key and the round only (:meth:`Sampling.sample_round`), so the same experiment key and
round pick the same clients on every host and in every round runner (device round, host store).
"""
from __future__ import annotations

import abc
import dataclasses
import math
import operator

import jax
import jax.numpy as jnp

Array = jax.Array


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


def round_key(key: Array, round_: Array) -> Array:
  """The sampling key of round ``round_`` of an experiment with PRNG ``key``."""
  return jax.random.fold_in(jax.random.fold_in(key, round_), 0x5A3)


class Sampling(abc.ABC):
  """How a round's ``slots`` fill with clients: ``sample(key, num_clients) -> (ids [M], mask [M], cohort [])``.

  ``mask`` marks the real slots; ``cohort`` is how many clients the draw selected (more than ``slots`` only when a
  Poisson cohort overflowed and was cut).
  """
  slots: int

  @abc.abstractmethod
  def sample(self, key: Array, num_clients: int) -> tuple[Array, Array, Array]:
    """``(ids [M] int32, mask [M] bool, cohort [] int32)`` for a population of ``num_clients``."""

  def sample_round(self, key: Array, round_: Array, num_clients: int) -> tuple[Array, Array, Array]:
    """Round ``round_``'s draw from the experiment's ``key`` (default: :meth:`sample` with :func:`round_key`)."""
    return self.sample(round_key(key, round_), num_clients)

  def check(self, num_clients: int) -> None:
    """Host-side check against the population (raises ValueError naming both numbers)."""
    if self.slots > num_clients:
      raise ValueError(f'the round samples {self.slots} clients per round but the data holds only {num_clients} '
                       f'clients; use clients_per_round <= {num_clients}.')


@dataclasses.dataclass(frozen=True)
class FixedSampling(Sampling):
  """``slots`` distinct clients uniformly without replacement, every slot real."""
  slots: int

  def __post_init__(self):
    object.__setattr__(self, 'slots', _slots(self.slots, 'clients_per_round'))

  def sample(self, key, num_clients):
    ids = sample_clients(key, num_clients, self.slots)
    return ids, jnp.ones(ids.shape, bool), jnp.asarray(self.slots, jnp.int32)


@dataclasses.dataclass(frozen=True)
class PoissonSampling(Sampling):
  """Each client independently with probability ``rate``; at most ``slots`` of them train (see the module doc)."""
  rate: float
  slots: int

  def __post_init__(self):
    if not 0.0 < float(self.rate) <= 1.0:
      raise ValueError(f'poisson_sampling needs a rate in (0, 1]; got {self.rate!r}.')
    object.__setattr__(self, 'slots', _slots(self.slots, 'max_clients'))

  def check(self, num_clients):
    if self.slots > num_clients:
      raise ValueError(f'poisson_sampling max_clients={self.slots} exceeds the population of {num_clients} '
                       'clients; use max_clients <= the number of clients.')

  def sample(self, key, num_clients):
    k_join, k_cut = jax.random.split(key)
    joined = jax.random.uniform(k_join, (num_clients,)) < self.rate
    cohort = jnp.sum(joined).astype(jnp.int32)
    # Among the clients that joined, the `slots` with the smallest random priority train (all of them unless the
    # cohort overflowed); the remaining slots take clients that did not join, as padding.
    score = jnp.where(joined, jax.random.uniform(k_cut, (num_clients,)), 2.0)
    _, picked = jax.lax.top_k(-score, self.slots)
    real = score[picked] < 2.0
    order = jnp.argsort(jnp.where(real, picked, num_clients + picked))  # real slots first, each part by id
    return picked[order].astype(jnp.int32), real[order], cohort


@dataclasses.dataclass(frozen=True)
class CyclicSampling(Sampling):
  """Epochs of ``P = num_clients // slots`` rounds; epoch ``e`` is a permutation of the clients (seeded by the
  experiment key and ``e``) cut into blocks of ``slots``: round ``t`` takes block ``t mod P`` of epoch ``t // P``.

  Each client trains at most once per epoch; the ``num_clients mod slots`` clients at the end of a permutation sit out
  that epoch.
  """
  slots: int

  def __post_init__(self):
    object.__setattr__(self, 'slots', _slots(self.slots, 'clients_per_round'))

  def sample(self, key, num_clients):
    raise TypeError('cyclic sampling follows the round number: call sample_round(key, round_, num_clients).')

  def sample_round(self, key, round_, num_clients):
    per_epoch = num_clients // self.slots
    epoch_key = jax.random.fold_in(jax.random.fold_in(key, round_ // per_epoch), 0x5A4)
    order = jax.random.permutation(epoch_key, num_clients)
    block = jax.lax.dynamic_slice(order, ((round_ % per_epoch) * self.slots,), (self.slots,))
    return jnp.sort(block).astype(jnp.int32), jnp.ones((self.slots,), bool), jnp.asarray(self.slots, jnp.int32)


def rounds_per_epoch(num_clients: int, clients_per_round: int) -> int:
  """``P = num_clients // clients_per_round``: the rounds of one :class:`CyclicSampling` epoch."""
  if not 1 <= clients_per_round <= num_clients:
    raise ValueError(f'clients_per_round must lie in [1, num_clients={num_clients}]; got {clients_per_round}.')
  return num_clients // clients_per_round


def _slots(value, name: str) -> int:
  try:
    slots = operator.index(value)
  except TypeError:
    raise ValueError(f'{name} must be an int >= 1; got {value!r}.') from None
  if slots < 1:
    raise ValueError(f'{name} must be an int >= 1; got {value!r}.')
  return slots


def fixed_sampling(clients_per_round: int) -> Sampling:
  """``clients_per_round`` distinct clients per round, uniformly without replacement (the default)."""
  return FixedSampling(clients_per_round)


def cyclic_sampling(clients_per_round: int) -> Sampling:
  """``clients_per_round`` clients per round, every client at most once per epoch (no sampling; see
  :class:`CyclicSampling`)."""
  return CyclicSampling(clients_per_round)


def poisson_sampling(rate: float, max_clients: int | None = None, *, num_clients: int | None = None,
                     overflow_probability: float = 1e-9) -> Sampling:
  """Every client joins each round with probability ``rate``; ``max_clients`` slots are compiled.

  Args:
    rate: ``q``, the probability that a client trains in a given round.
    max_clients: the round's slots ``M``. None picks the smallest ``M`` whose overflow probability (a cohort of more
      than ``M`` clients, from the binomial tail) is below ``overflow_probability``; this needs ``num_clients``.
    num_clients: the population size ``K`` (only to size ``max_clients``).
    overflow_probability: the target tail probability when ``max_clients`` is None.
  """
  if max_clients is None:
    if num_clients is None:
      raise ValueError('poisson_sampling needs max_clients, or num_clients to choose it from the binomial tail.')
    max_clients = poisson_slots(rate, num_clients, overflow_probability)
  return PoissonSampling(float(rate), max_clients)


def poisson_slots(rate: float, num_clients: int, overflow_probability: float = 1e-9) -> int:
  """The smallest ``M`` with ``P[Binomial(num_clients, rate) > M] <= overflow_probability``."""
  if not 0.0 < rate <= 1.0:
    raise ValueError(f'rate must lie in (0, 1]; got {rate}.')
  k = int(num_clients)
  if rate == 1.0:
    return k

  def pmf(i):
    return math.exp(math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * math.log(rate)
                    + (k - i) * math.log1p(-rate))

  tail = 0.0  # P[X > i], summed from the top down
  for i in range(k, 0, -1):
    if tail + pmf(i) > overflow_probability:  # P[X > i - 1] is too large, so M = i
      return i
    tail += pmf(i)
  return 1


def resolve(sampling: Sampling | None, clients_per_round: int | None) -> Sampling:
  """The round's :class:`Sampling` from ``make_round``'s two ways of saying it (exactly one must be given)."""
  if sampling is None and clients_per_round is None:
    raise ValueError('make_round needs clients_per_round=M (fixed-size sampling) or sampling=... '
                     '(fixed_sampling(M) or poisson_sampling(q, max_clients)).')
  if sampling is not None:
    if clients_per_round is not None and int(clients_per_round) != sampling.slots:
      raise ValueError(f'clients_per_round={clients_per_round} disagrees with sampling={sampling!r}; give one.')
    if not isinstance(sampling, Sampling):
      raise ValueError('sampling must be fixed_sampling(M), poisson_sampling(q, max_clients) or cyclic_sampling(M); '
                       f'got {sampling!r}.')
    return sampling
  return FixedSampling(clients_per_round)
