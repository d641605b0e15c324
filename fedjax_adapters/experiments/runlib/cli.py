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


class UserError(ValueError):
  """A mistake in the command line, in the files it names or in the run directory; one line ``error: ...``.

  The command line exits with ``exit_status`` (2; a failed write of the run's files, 1). The Python API
  (:mod:`fedjax_adapters.experiment`) raises it as is: it is a ``ValueError``.
  """
  exit_status = EXIT_USER_ERROR


class Parser(argparse.ArgumentParser):
  """``ArgumentParser`` whose errors are one line ``error: <message>`` on stderr and exit status 2; with
  ``raise_errors`` set (a runner called from Python, :func:`run_plan`) they raise :class:`UserError` instead."""

  raise_errors = False

  def error(self, message: str):
    if self.raise_errors:
      raise UserError(message)
    self.exit(EXIT_USER_ERROR, f'error: {message}\n')


class Renamed(argparse.Action):
  """An old spelling of a flag: stores into the new flag's ``dest`` and warns once on stderr that it was renamed."""

  def __init__(self, option_strings, dest, *, new: str, **kwargs):
    self.new = new
    super().__init__(option_strings, dest, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    print(f'warning: {option_string} is now spelled {self.new}; the old spelling still works but will go',
          file=sys.stderr, flush=True)
    setattr(namespace, self.dest, values)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> Any:
  """``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and ``SystemExit(e.exit_status)``."""
  try:
    return main(argv)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    raise SystemExit(e.exit_status) from None


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
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own message
      return _convert(text, options[0], key)
    for option in options:
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
  if typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis:
    items = text.split(',') if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)):
      raise UserError(f'{key}={text!r}: expected comma-separated values')
    return tuple(_convert(i.strip() if isinstance(i, str) else i, args[0], key) for i in items)
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


def add_run_arguments(group) -> None:
  """Flags both runners share beside --out / --resume / --json: ``--writer`` and ``--quiet``."""
  from fedjax_adapters.experiments.runlib import writers  # pylint: disable=g-import-not-at-top  (no JAX)
  group.add_argument('--writer', nargs='+', default=[], metavar='NAME', choices=list(writers.BUILTIN),
                     help='also send every round\'s metrics to: ' + ', '.join(writers.BUILTIN) + ' (off by default; '
                          'metrics.jsonl is always written; pip install "fedjax_adapters[tracking]")')
  group.add_argument('--quiet', action='store_true', help='no progress output; only errors and the final table')


def add_settings_arguments(parser: argparse.ArgumentParser, settings: type, *, what: str = 'setting',
                           file_flag: str = '--config') -> None:
  """The configuration group both runners share: ``--config FILE`` (JSON settings or a run's config.json),
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
                allowed: Sequence[str] = ('resume', 'quiet', 'json', 'writer')) -> tuple[str, dict[str, Any]]:
  """``(run directory, its config.json)`` for ``--resume DIR``, which continues a run with its own settings.

  The config.json is checked before anything else: strict JSON, this runner's, and settings that match the
  fingerprint stored when the run started (an edited file is refused).

  Raises:
    UserError: a flag outside ``allowed`` was given, ``DIR`` is not a run directory, holds another runner's run
      (``label`` names this runner's runs in the message), or its config.json was edited.
  """
  from fedjax_adapters.experiments.runlib.rundir import FINGERPRINT, RunDir, fingerprint  # pylint: disable=g-import-not-at-top  (rundir imports this module)
  given = [f'--{k.replace("_", "-")}' for k, v in vars(args).items()
           if k not in allowed and v != parser.get_default(k)]
  if given:
    raise UserError(f'--resume continues a run with its own settings; drop {", ".join(given)}')
  run = RunDir.open(args.resume)
  config = run.config
  if config.get('runner') != runner:
    raise UserError(f'{args.resume} holds a {config.get("runner")!r} run, not a {label} run')
  stored = config.get(FINGERPRINT)
  if stored is not None and stored != fingerprint(config):
    raise UserError(f'{run.file("config.json")} was edited after the run started: its settings or plan differ from '
                    'those its checkpoints were written with; restore the file, or start a new run with the new '
                    'settings (--config that file); nothing was written')
  return run.path, config


def checked_value(value: Any, parse: Callable[[str], Any], name: str) -> Any:
  """A number from a JSON file checked by the argparse type ``parse`` exactly as if typed on the command line."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise UserError(f'{name}: expected a number, got {value!r}')
  try:
    return parse(str(value))
  except argparse.ArgumentTypeError as e:
    raise UserError(f'{name}: {e}') from None


def checked_plan(config: dict[str, Any], where: str, types: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
  """A run's stored ``plan``: a dict whose ``seeds`` and the entries in ``types`` pass the command line's checks."""
  plan = config.get('plan')
  if not isinstance(plan, dict):
    raise UserError(f'{where}: no "plan" object')
  plan = dict(plan)
  missing = [k for k in ('seeds', *types) if k not in plan]
  if missing:
    raise UserError(f'{where}: the plan lacks {", ".join(missing)}')
  for key, parse in types.items():
    plan[key] = checked_value(plan[key], parse, f'{where}: plan.{key}')
  seeds = checked_list(plan, 'seeds', int, where)
  plan['seeds'] = parse_seeds([str(s) for s in seeds]) if len(seeds) > 1 else [
      checked_value(seeds[0], int_at_least(0), f'{where}: plan.seeds')]
  return plan


def checked_list(plan: dict[str, Any], key: str, kind: type, where: str) -> list:
  """``plan[key]``: a nonempty list of ``kind`` values (booleans are not integers)."""
  value = plan.get(key)
  if not isinstance(value, list) or not value or any(not isinstance(v, kind) or isinstance(v, bool) for v in value):
    raise UserError(f'{where}: plan.{key} must be a nonempty list of {kind.__name__} values, got {value!r}')
  return value


def check_writers(names: Sequence[str]) -> list[str]:
  """``--writer`` names, each installed (see :mod:`~fedjax_adapters.experiments.runlib.writers`)."""
  from fedjax_adapters.experiments.runlib import writers  # pylint: disable=g-import-not-at-top  (no JAX)
  return writers.check_names(list(names or []))


def resume_options(args: argparse.Namespace, config: dict[str, Any], path: str) -> dict[str, Any]:
  """What a ``--resume`` may choose anew: ``quiet``, ``json`` (checked), ``writers`` (default: the run's own)."""
  from fedjax_adapters.experiments.runlib.rundir import check_output_file  # pylint: disable=g-import-not-at-top
  stored = (config.get('plan') or {}).get('writers') or []
  json_path = args.json and check_output_file(args.json, '--json', path)
  if json_path:
    probe_writable_file(json_path, '--json')
  return {'quiet': args.quiet, 'json': json_path, 'writers': check_writers(args.writer or stored)}


def check_outputs(plan: dict[str, Any], name: str) -> None:
  """Checks ``plan['json']`` (not inside the run, no link or device) and creates ``plan['out']`` (default
  ``runs/<name>-<time>-<random>``), refusing a folder that holds a run or a run's files without its config.json."""
  from fedjax_adapters.experiments.runlib import rundir  # pylint: disable=g-import-not-at-top  (no JAX)
  out = os.path.abspath(os.path.expanduser(plan['out'] or rundir.default_path(name)))
  if plan.get('json'):
    plan['json'] = rundir.check_output_file(plan['json'], '--json', out)
    probe_writable_file(plan['json'], '--json')
  if os.path.isfile(os.path.join(out, rundir.CONFIG)):
    raise UserError(f'--out {out} already holds a run; continue it with --resume {out}, or pick another --out')
  leftovers = rundir.run_files_without_config(out) if os.path.isdir(out) else []
  if leftovers:
    raise UserError(f'--out {out} holds {" and ".join(leftovers)} of an earlier run but no {rundir.CONFIG}, so they '
                    'cannot be continued or trusted; pick another --out or remove them')
  plan['out'] = probe_writable_dir(out, '--out')


def print_to_pipe(text: str) -> None:
  """Prints ``text``; a reader that stopped early (``--print-config | head``) ends the output quietly."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit either


def run_plan(argv: Sequence[str], *, parser: argparse.ArgumentParser,
             make_plan: Callable[[argparse.Namespace], dict], run_module: str) -> tuple[dict, int]:
  """Parses ``argv``, checks it into a plan and runs it: ``(results, exit status)``; user errors raise."""
  parser.raise_errors = True
  plan = make_plan(parser.parse_args(list(argv)))
  return importlib.import_module(run_module).run(plan, argv=list(argv))


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
  argv = list(sys.argv[1:] if argv is None else argv)
  results, status = importlib.import_module(run_module).run(plan, argv=argv)
  if status:
    raise SystemExit(status)
  return results
