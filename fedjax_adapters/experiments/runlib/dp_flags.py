"""The runners' user-level differential privacy flags (``--dp-*``), validated before JAX is imported.

``--dp-clip C`` turns DP on; the noise is ``--dp-noise-multiplier z`` or calibrated from ``--dp-epsilon`` for
``--dp-delta`` (default ``1 / num_clients``) over the run's rounds with ``dp-accounting``. ``--dp-sampling``
picks how clients are drawn (and what the accountant models): ``fixed`` (``M`` without replacement, the runners'
default sampling) or ``poisson`` (each client with rate ``M / num_clients``). ``--dp-mechanism tree`` is DP-FTRL
(noisy prefix sums by tree aggregation, no sampling): it needs ``--dp-sampling cyclic`` (every client once per epoch
of ``num_clients // M`` rounds, one tree per epoch). See docs/privacy.md.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from fedjax_adapters.experiments.runlib import cli
from fedjax_adapters.experiments.runlib.cli import UserError


def _unit_open(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
  if not 0 < value < 1:
    raise argparse.ArgumentTypeError(f'must lie in (0, 1), got {text}')
  return value


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the ``--dp-*`` group to ``parser``."""
  g = parser.add_argument_group('user-level differential privacy (docs/privacy.md)')
  g.add_argument('--dp-clip', type=cli.positive_float, default=None,
                 help='L2 bound of each client\'s federated update; turns DP on (initial bound with '
                      '--dp-adaptive-quantile)')
  noise = g.add_mutually_exclusive_group()
  noise.add_argument('--dp-noise-multiplier', type=cli.nonnegative_float, default=None,
                     help='noise std / clip on the clipped sum')
  noise.add_argument('--dp-epsilon', type=cli.positive_float, default=None,
                     help='target epsilon after all rounds: the noise multiplier is calibrated with dp-accounting')
  g.add_argument('--dp-delta', type=_unit_open, default=None, help='delta of the guarantee (default 1/num_clients)')
  g.add_argument('--dp-sampling', choices=('fixed', 'poisson', 'cyclic'), default='fixed',
                 help='client sampling the accountant models (fixed: M without replacement; poisson: rate M/K; '
                      'cyclic: each client once per epoch of K//M rounds, for --dp-mechanism tree)')
  g.add_argument('--dp-mechanism', choices=('gaussian', 'tree'), default='gaussian',
                 help='gaussian: DP-FedAvg, fresh noise every round; tree: DP-FTRL, noisy prefix sums by tree '
                      'aggregation restarted every epoch (needs --dp-sampling cyclic)')
  g.add_argument('--dp-adaptive-quantile', type=_unit_open, default=None,
                 help='adapt the clip to this quantile of the update norms (Andrew et al. 2021)')


def make_dp_plan(args: argparse.Namespace, *, num_clients: int | None, fraction: float,
                 rounds: int) -> dict[str, Any] | None:
  """The validated DP settings of a run (None without ``--dp-clip``); raises UserError naming the bad value.

  ``fraction`` of ``num_clients`` gives the round's ``M`` as the runner samples it (the expected cohort).
  """
  others = [f for f in ('dp_noise_multiplier', 'dp_epsilon', 'dp_delta', 'dp_adaptive_quantile')
            if getattr(args, f, None) is not None]
  if args.dp_clip is None:
    if others:
      raise UserError(f'--{others[0].replace("_", "-")} needs --dp-clip')
    return None
  if args.dp_noise_multiplier is None and args.dp_epsilon is None:
    raise UserError('--dp-clip needs --dp-noise-multiplier or --dp-epsilon')
  if not num_clients:
    raise UserError('--dp-* needs a task with a known number of clients (set num_clients)')
  # Only a DP run imports these (dp-accounting, and JAX for the aggregator's config check).
  from fedjax_adapters import privacy_accounting as pa  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.federated.sampling import clients_per_round as per_round  # pylint: disable=g-import-not-at-top
  delta = args.dp_delta if args.dp_delta is not None else 1.0 / num_clients
  clients_per_round = per_round(num_clients, fraction)
  mechanism = getattr(args, 'dp_mechanism', 'gaussian')
  try:
    pa.check_accounting(args.dp_sampling, num_clients, clients_per_round, delta, mechanism)
    z = args.dp_noise_multiplier
    if z is None:
      z = pa.calibrate_noise(args.dp_epsilon, delta=delta, rounds=rounds, sampling=args.dp_sampling,
                             num_clients=num_clients, clients_per_round=clients_per_round, mechanism=mechanism)
    plan = dict(clip=args.dp_clip, noise_multiplier=z, delta=delta, sampling=args.dp_sampling,
                adaptive_quantile=args.dp_adaptive_quantile, num_clients=num_clients,
                clients_per_round=clients_per_round, target_epsilon=args.dp_epsilon, mechanism=mechanism)
    check(plan)
  except ValueError as e:
    raise UserError(str(e)) from None
  return plan


def check(plan: dict[str, Any]) -> None:
  """The DP config the round will build (ValueError naming the value), without JAX."""
  from fedjax_adapters.federated.privacy import check_dp  # pylint: disable=g-import-not-at-top
  check_dp(config(plan))


def config(plan: dict[str, Any]):
  """The :class:`~fedjax_adapters.federated.privacy.DPConfig` of ``plan``."""
  from fedjax_adapters.federated.privacy import DPConfig  # pylint: disable=g-import-not-at-top
  cfg = DPConfig(clip=float(plan['clip']), noise_multiplier=float(plan['noise_multiplier']),
                 expected_clients=float(plan['clients_per_round']), adaptive_quantile=plan['adaptive_quantile'])
  return tree_config(plan, cfg)


def tree_config(plan: dict[str, Any], cfg):
  """``cfg`` as DP-FTRL's ``DPConfig(mechanism='tree', tree_steps=num_clients // M)`` for a tree plan, else as is."""
  if plan.get('mechanism', 'gaussian') != 'tree':
    return cfg
  return cfg._replace(mechanism='tree', tree_steps=int(plan['num_clients']) // int(plan['clients_per_round']))


def round_sampling(plan: dict[str, Any] | None, num_clients: int, clients_per_round: int) -> dict[str, Any]:
  """``make_round``'s sampling arguments for the plan's ``sampling`` (fixed ``M`` without a plan)."""
  from fedjax_adapters.federated import sampling  # pylint: disable=g-import-not-at-top
  kind = plan['sampling'] if plan else 'fixed'
  if kind == 'poisson':
    return {'sampling': sampling.poisson_sampling(clients_per_round / num_clients, num_clients=num_clients)}
  if kind == 'cyclic':
    return {'sampling': sampling.cyclic_sampling(clients_per_round)}
  return {'clients_per_round': clients_per_round}


def epsilon_after(plan: dict[str, Any], rounds: int, cache: dict[int, float]) -> float:
  """Epsilon for the plan's delta after ``rounds`` rounds (cached per rounds)."""
  from fedjax_adapters import privacy_accounting as pa  # pylint: disable=g-import-not-at-top
  if rounds not in cache:
    cache[rounds] = pa.epsilon(plan['noise_multiplier'], rounds, delta=plan['delta'], sampling=plan['sampling'],
                               num_clients=plan['num_clients'], clients_per_round=plan['clients_per_round'],
                               mechanism=plan.get('mechanism', 'gaussian'))
  return cache[rounds]


def summary(plan: dict[str, Any], rounds: int) -> dict[str, Any]:
  """The results document's ``dp`` record: the settings and epsilon after ``rounds``."""
  eps = epsilon_after(plan, rounds, {})
  return dict(plan, rounds=rounds, epsilon=eps if math.isfinite(eps) else None)
