"""``--aggregator NAME[:param]``, ``--attack NAME[:param]`` and ``--attack-fraction F``: parsed and checked before any
JAX import (one line ``error: ...``), stored in the plan as plain strings and numbers, re-checked on ``--resume``, and
turned into a reducer, an adversary and (label flipping) new labels when a unit is built.

The tables here mirror ``federated.robust.REDUCERS`` and ``federated.attacks.ATTACKS`` without importing JAX
(tests/test_robust_flags.py checks they agree).
"""
from __future__ import annotations

import math
from typing import Any

from fedjax_adapters.experiments.runlib.cli import UserError

# name -> (parameter, check, what it must be)
AGGREGATORS = {
    'mean': None, 'median': None,
    'trimmed_mean': ('fraction', lambda v: 0 <= v < 0.5, 'in [0, 0.5)'),
    'geomed': ('iterations', lambda v: v >= 1 and v == int(v), 'an integer >= 1'),
    'krum': ('num_byzantine', lambda v: v >= 0 and v == int(v), 'an integer >= 0'),
    'multikrum': ('num_byzantine', lambda v: v >= 0 and v == int(v), 'an integer >= 0'),
    'bulyan': ('num_byzantine', lambda v: v >= 0 and v == int(v), 'an integer >= 0'),
    'centered_clip': ('radius', lambda v: v > 0, '> 0'),
    'norm_bound': ('quantile', lambda v: 0 < v <= 1, 'in (0, 1]'),
}
ATTACKS = {
    'sign_flip': ('scale', lambda v: True, 'a number'), 'scaling': ('scale', lambda v: True, 'a number'),
    'gaussian': ('sigma', lambda v: v > 0, '> 0'), 'alie': ('z', lambda v: v >= 0, '>= 0'),
    'ipm': ('epsilon', lambda v: v > 0, '> 0'), 'label_flip': None,
}


def add_arguments(parser) -> None:
  g = parser.add_argument_group('robustness experiments (docs/robustness.md)')
  g.add_argument('--aggregator', default=None, metavar='NAME[:PARAM]',
                 help=f'server reducer instead of the weighted mean: {", ".join(AGGREGATORS)} (e.g. krum:2)')
  g.add_argument('--attack', default=None, metavar='NAME[:PARAM]',
                 help=f'attacking clients (experiments only): {", ".join(ATTACKS)} (e.g. sign_flip:10)')
  g.add_argument('--attack-fraction', default=None, type=float, metavar='F',
                 help='share of the clients that attack, chosen by the seed (required with --attack)')


def parse_spec(spec: str, table: dict, flag: str) -> tuple[str, float | None]:
  """``'NAME'`` or ``'NAME:PARAM'`` -> ``(name, param or None)`` checked against ``table``."""
  name, _, text = str(spec).partition(':')
  if name not in table:
    raise UserError(f'{flag} {spec!r}: unknown name {name!r}; choose one of {", ".join(table)}')
  if not text:
    return name, None
  if table[name] is None:
    raise UserError(f'{flag} {spec!r}: {name} takes no parameter')
  pname, ok, what = table[name]
  try:
    value = float(text)
  except ValueError:
    raise UserError(f'{flag} {spec!r}: {pname} must be a number, got {text!r}') from None
  if not math.isfinite(value) or not ok(value):
    raise UserError(f'{flag} {spec!r}: {pname} must be {what}, got {text}')
  return name, value


def check(aggregator: str | None, attack: str | None, fraction: float | None, where: str = '') -> dict[str, Any]:
  """The plan's ``robust`` entry: ``{'aggregator': str|None, 'attack': str|None, 'attack_fraction': float}``."""
  pre = f'{where}: ' if where else ''
  try:
    if aggregator is not None:
      parse_spec(aggregator, AGGREGATORS, '--aggregator')
    if attack is not None:
      parse_spec(attack, ATTACKS, '--attack')
      if fraction is None:
        raise UserError('--attack needs --attack-fraction F (the share of clients that attack)')
    elif fraction is not None:
      raise UserError('--attack-fraction needs --attack NAME')
    if fraction is not None and not 0 <= fraction <= 1:
      raise UserError(f'--attack-fraction must be in [0, 1], got {fraction}')
  except UserError as e:
    raise UserError(pre + str(e)) from None
  return {'aggregator': aggregator, 'attack': attack, 'attack_fraction': float(fraction or 0.0)}


def from_args(args) -> dict[str, Any]:
  return check(args.aggregator, args.attack, args.attack_fraction)


def from_plan(plan: dict, where: str) -> dict[str, Any]:
  """The stored ``robust`` entry re-checked (a run made before these flags has none: no defense, no attack)."""
  r = plan.get('robust') or {}
  if not isinstance(r, dict):
    raise UserError(f'{where}: plan.robust must be an object, got {r!r}')
  fraction = r.get('attack_fraction') if r.get('attack') is not None else None
  return check(r.get('aggregator'), r.get('attack'), fraction, where)


def reducer(robust: dict):
  """The reducer of ``robust['aggregator']`` (None: the algorithm's own weighted mean)."""
  if robust.get('aggregator') is None:
    return None
  from fedjax_adapters.federated import robust as robust_lib  # pylint: disable=g-import-not-at-top  (JAX)
  return robust_lib.reducer_from_name(*parse_spec(robust['aggregator'], AGGREGATORS, '--aggregator'))


def attackers(robust: dict, num_clients: int, seed: int):
  from fedjax_adapters.federated import attacks  # pylint: disable=g-import-not-at-top  (JAX)
  return attacks.attacker_mask(num_clients, robust['attack_fraction'], seed)


def adversary(robust: dict, num_clients: int, seed: int):
  """The round's adversary (None without an update attack: no attack, or label flipping on the data)."""
  if robust.get('attack') is None:
    return None
  name, param = parse_spec(robust['attack'], ATTACKS, '--attack')
  if name == 'label_flip':
    return None
  from fedjax_adapters.federated import attacks  # pylint: disable=g-import-not-at-top  (JAX)
  return attacks.make_adversary(name, attackers(robust, num_clients, seed), param)


def poison_labels(robust: dict, y, num_classes: int, seed: int):
  """``y [K, N]`` with the attackers' labels flipped when the attack is ``label_flip``; else ``y``."""
  if robust.get('attack') is None or parse_spec(robust['attack'], ATTACKS, '--attack')[0] != 'label_flip':
    return y
  from fedjax_adapters.federated import attacks  # pylint: disable=g-import-not-at-top  (JAX)
  return attacks.flip_labels(y, attackers(robust, len(y), seed), num_classes)
