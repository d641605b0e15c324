"""Command-line checks shared by the runners: every user error is caught before any training, in one line.

* :class:`Parser`: an ``argparse.ArgumentParser`` whose errors are one line ``error: ...`` with exit status 2.
* Argument types (:func:`int_at_least`, :func:`positive_float`, :func:`fraction`, ...) that reject out-of-range
  values while parsing.
* :func:`parse_seeds`: ``--seeds 3`` (seeds 0, 1, 2), ``--seeds 0 2 5`` (those seeds), ``--seeds 4:6`` (4, 5).
* :func:`apply_overrides`: ``key=value`` strings (``--set``) and JSON config files onto a config dataclass, each
  value converted to the field's type.
* :func:`probe_writable_dir` / :func:`probe_writable_file`: create the parent, write and remove a probe file.
* :func:`run_cli`: runs ``main(argv)``, turning a :class:`UserError` into ``error: ...`` and exit status 2;
  anything else (a bug) keeps its traceback.
* What both runners' command lines share: :func:`check_methods`, :func:`resumed_run` (``--resume DIR``) and
  :func:`runner_main` (parse, plan, ``--print-config``, then the JAX half).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake in the command line or in the files it names; reported as one line ``error: ...``, exit 2."""


class Parser(argparse.ArgumentParser):
  """``ArgumentParser`` whose errors are one line ``error: <message>`` on stderr and exit status 2."""

  def error(self, message: str):
    self.exit(EXIT_USER_ERROR, f'error: {message}\n')


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
  """``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and ``SystemExit(2)``."""
  try:
    return main(argv)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR) from None


# ---------------------------------------------------------------------------------------------------------------------
# Argument types (raise argparse.ArgumentTypeError, which Parser reports as one line).
# ---------------------------------------------------------------------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
  """An argparse type: an integer ``>= low``."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value < low:
      raise argparse.ArgumentTypeError(f'must be >= {low}, got {value}')
    return value
  parse.__name__ = f'integer >= {low}'
  return parse


def _float(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None


def positive_float(text: str) -> float:
  """An argparse type: a finite number ``> 0``."""
  value = _float(text)
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f'must be finite and > 0, got {text}')
  return value


def nonnegative_float(text: str) -> float:
  """An argparse type: a finite number ``>= 0``."""
  value = _float(text)
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f'must be finite and >= 0, got {text}')
  return value


def fraction(text: str) -> float:
  """An argparse type: a number in ``(0, 1]``."""
  value = _float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f'must lie in (0, 1], got {text}')
  return value


def parse_seeds(items: Sequence[str]) -> list[int]:
  """Seeds from ``--seeds`` items.

  One plain integer ``N`` means seeds ``0 .. N-1`` (the runners' historical meaning); several plain integers are the
  seeds themselves; ``A:B`` adds seeds ``A .. B-1`` (so ``--seeds 3:4`` runs seed 3 alone).

  Raises:
    UserError: a malformed item, a negative seed, an empty list or a repeated seed.
  """
  def integer(text):
    try:
      v = int(text)
    except ValueError:
      raise UserError(f'--seeds: expected integers or ranges A:B, got {text!r}') from None
    if v < 0:
      raise UserError(f'--seeds: seeds must be >= 0, got {v}')
    return v

  if len(items) == 1 and ':' not in items[0]:
    n = integer(items[0])
    if n < 1:
      raise UserError(f'--seeds {n}: a single number is a count of seeds (0 .. N-1) and must be >= 1')
    return list(range(n))
  seeds: list[int] = []
  for item in items:
    if ':' in item:
      a, _, b = item.partition(':')
      seeds.extend(range(integer(a), integer(b)))
    else:
      seeds.append(integer(item))
  if not seeds:
    raise UserError(f'--seeds {" ".join(items)} selects no seed')
  if len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds lists a seed twice: {seeds}')
  return seeds


# ---------------------------------------------------------------------------------------------------------------------
# key=value overrides and config files
# ---------------------------------------------------------------------------------------------------------------------

_TRUE, _FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')


def _convert(text: Any, kind: Any, key: str) -> Any:
  """``text`` (a string, or a JSON value from a file) as a value of the annotated type ``kind``."""
  args = typing.get_args(kind)
  if typing.get_origin(kind) in (typing.Union, types.UnionType):
    if type(None) in args and (text is None or (isinstance(text, str) and text.lower() in ('none', 'null'))):
      return None
    for option in (a for a in args if a is not type(None)):
      try:
        return _convert(text, option, key)
      except UserError:
        continue
    raise UserError(f'{key}={text!r}: expected one of {" | ".join(a.__name__ for a in args)}')
  if kind is bool:
    if isinstance(text, bool):
      return text
    if isinstance(text, str) and text.lower() in _TRUE + _FALSE:
      return text.lower() in _TRUE
    raise UserError(f'{key}={text!r}: expected true or false')
  if kind in (int, float):
    if isinstance(text, bool):
      raise UserError(f'{key}={text!r}: expected a number')
    try:
      value = kind(text)
    except (TypeError, ValueError):
      raise UserError(f'{key}={text!r}: expected {"an integer" if kind is int else "a number"}') from None
    if kind is int and isinstance(text, float) and text != value:
      raise UserError(f'{key}={text!r}: expected an integer')
    return value
  if kind is str:
    if not isinstance(text, str):
      raise UserError(f'{key}={text!r}: expected a string')
    return text
  raise UserError(f'{key}: fields of type {kind} cannot be set from the command line')


def apply_overrides(config: Any, overrides: dict[str, Any] | Sequence[str], *, source: str = '--set') -> Any:
  """``config`` (a dataclass instance) with fields replaced, each value converted to the field's type.

  Args:
    config: a dataclass instance.
    overrides: ``['key=value', ...]`` (command line) or ``{key: value}`` (a JSON config file).
    source: where the overrides came from, for messages.

  Raises:
    UserError: an unknown key (the message lists the valid ones), a missing ``=``, or a value of the wrong type.
  """
  hints = typing.get_type_hints(type(config))
  names = [f.name for f in dataclasses.fields(config)]
  if not isinstance(overrides, dict):
    pairs = {}
    for item in overrides:
      key, eq, value = item.partition('=')
      if not eq:
        raise UserError(f'{source} {item!r}: expected key=value')
      pairs[key.strip()] = value.strip()
    overrides = pairs
  unknown = [k for k in overrides if k not in names]
  if unknown:
    raise UserError(f'{source}: unknown setting(s) {", ".join(unknown)}; valid settings: {", ".join(names)}')
  return dataclasses.replace(config, **{k: _convert(v, hints[k], k) for k, v in overrides.items()})


def read_config_file(path: str) -> dict[str, Any]:
  """The settings in a JSON file: a flat object ``{key: value}``, or a run's ``config.json`` (its ``settings``)."""
  try:
    with open(path) as f:
      data = json.load(f)
  except OSError as e:
    raise UserError(f'--config {path}: {e.strerror}') from None
  except json.JSONDecodeError as e:
    raise UserError(f'--config {path}: not valid JSON ({e})') from None
  if isinstance(data, dict) and isinstance(data.get('settings'), dict):
    data = data['settings']
  if not isinstance(data, dict):
    raise UserError(f'--config {path}: expected a JSON object of settings')
  return data


# ---------------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------------


def probe_writable_dir(path: str, what: str) -> str:
  """Creates directory ``path`` (and parents) and writes + removes a probe file in it; returns its absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  probe = os.path.join(path, f'.write-probe-{os.getpid()}')
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('probe')
    os.remove(probe)
  except OSError as e:
    raise UserError(f'{what} {path} is not writable: {e.strerror or e}') from None
  return path


def probe_writable_file(path: str, what: str) -> str:
  """Checks that file ``path`` can be written (creates its directory, probes it) without touching ``path``."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    raise UserError(f'{what} {path} is a directory; expected a file path')
  try:
    probe_writable_dir(os.path.dirname(path), what)
  except UserError as e:
    raise UserError(f'{what} {path}: cannot write there ({e})') from None
  return path


def existing_dir(path: str, what: str) -> str:
  """``path`` as an absolute path if it is a directory, else a UserError naming ``what``."""
  full = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(full):
    raise UserError(f'{what} {path}: no such directory')
  return full


# ---------------------------------------------------------------------------------------------------------------------
# What the runners' command lines share
# ---------------------------------------------------------------------------------------------------------------------


def add_settings_arguments(parser: argparse.ArgumentParser, settings: type, *, file_flag: str,
                           what: str = 'setting') -> None:
  """The configuration group both runners share: ``file_flag FILE`` (JSON settings or a run's config.json),
  ``--set KEY=VALUE ...`` over the fields of the dataclass ``settings``, and ``--print-config``."""
  c = parser.add_argument_group('configuration')
  c.add_argument(file_flag, metavar='FILE', default=None,
                 help="JSON settings: an object {setting: value} or a run's config.json")
  c.add_argument('--set', nargs='+', metavar='KEY=VALUE', default=[], dest='overrides',
                 help=f'override any {what}: {", ".join(f.name for f in dataclasses.fields(settings))}')
  c.add_argument('--print-config', action='store_true', help='print the resolved settings as JSON and exit')


def check_methods(methods: Sequence[str], valid: Sequence[str]) -> list[str]:
  """``methods`` as a list, each one of ``valid`` and none twice (a UserError lists the valid ones)."""
  bad = [m for m in methods if m not in valid]
  if bad:
    raise UserError(f'unknown method(s) {", ".join(bad)}; valid methods: {", ".join(valid)}')
  if len(set(methods)) != len(methods):
    raise UserError(f'--methods lists a method twice: {" ".join(methods)}')
  return list(methods)


def resumed_run(args: argparse.Namespace, parser: argparse.ArgumentParser, runner: str, label: str,
                allowed: Sequence[str] = ('resume', 'quiet', 'json')) -> tuple[str, dict[str, Any]]:
  """``(run directory, its config.json)`` for ``--resume DIR``, which continues a run with its own settings.

  Raises:
    UserError: a flag outside ``allowed`` was given, ``DIR`` is not a run directory, or it holds another runner's run
      (``label`` names this runner's runs in the message).
  """
  from fedjax_adapters.experiments.runlib.rundir import RunDir  # pylint: disable=g-import-not-at-top  (rundir imports this module)
  given = [f'--{k.replace("_", "-")}' for k, v in vars(args).items()
           if k not in allowed and v != parser.get_default(k)]
  if given:
    raise UserError(f'--resume continues a run with its own settings; drop {", ".join(given)}')
  run = RunDir.open(args.resume)
  config = run.config
  if config.get('runner') != runner:
    raise UserError(f'{args.resume} holds a {config.get("runner")!r} run, not a {label} run')
  return run.path, config


def print_to_pipe(text: str) -> None:
  """Prints ``text``; a reader that stopped early (``--print-config | head``) ends the output quietly."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit either


def runner_main(argv: Sequence[str] | None, *, parser: argparse.ArgumentParser,
                make_plan: Callable[[argparse.Namespace], dict], settings: Callable[[dict], Any],
                run_module: str) -> dict:
  """A runner's main: parse ``argv``, check everything into a plan (no JAX yet), print the resolved ``settings(plan)``
  for ``--print-config``, else import ``run_module`` and call its ``run(plan, argv) -> (results, status)``.

  Wrapped in :func:`run_cli`, a user error exits with status 2 (one line ``error: ...``); a run with a failed method
  exits with 1 after the other methods ran, an interrupted one with 128 + the signal number.
  """
  args = parser.parse_args(argv)
  plan = make_plan(args)
  if getattr(args, 'print_config', False):
    from fedjax_adapters.experiments.runlib import strict_json  # pylint: disable=g-import-not-at-top
    print_to_pipe(strict_json.dumps(dataclasses.asdict(settings(plan)), indent=1))
    return {}
  results, status = importlib.import_module(run_module).run(plan, argv=list(sys.argv[1:] if argv is None else argv))
  if status:
    raise SystemExit(status)
  return results
