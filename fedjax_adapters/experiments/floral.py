"""Runs FLoRAL's comparison (FedAvg, Local Adaptor, Ensemble, FLoRAL 1 % / 10 %; learned and oracle routers).

Usage::

  python -m fedjax_adapters.experiments.floral --task synthetic_linear                      # -> runs/synthetic_linear-<time>/
  python -m fedjax_adapters.experiments.floral --task mnist_offline_label_shift --seeds 3 --out runs/mnist_ls
  python -m fedjax_adapters.experiments.floral --resume runs/mnist_ls                       # continue an interrupted run
  python -m fedjax_adapters.experiments.floral --task cifar10_rotate --data-dir ~/tensorflow_datasets --seeds 0 1 2 3
  python -m fedjax_adapters.experiments.floral --task synthetic_mlp --set lr=0.05 floor=none --print-config
  python -m fedjax_adapters.experiments.report runs/mnist_ls                                # plots and tables

Tasks and methods are the registries of ``experiments/configs/floral.py``: the synthetic tasks and one task per
column of the paper's Table 1. Methods, by the table's rows: fedavg, local_adaptor, ensemble, ensemble_oracle,
floral_1, floral_1_oracle, floral_10, floral_10_oracle (FLoRAL 1 % / 10 % = rank budget 0.01 / 0.1); floral and
floral_oracle are the synthetic table's names for the 1 % ones.

Every setting of the task can be changed: by its flag below, by ``--set key=value``, or by ``--config FILE`` (a
JSON object of settings, or a run's config.json); flags win over --set, which wins over --config.

The run directory (``--out``) receives config.json, metrics.jsonl (one line per round per method and seed),
results.json and checkpoints; ``--json PATH`` also writes results.json's content to PATH. Ctrl-C (or SIGTERM)
saves a checkpoint and exits; ``--resume DIR`` continues. A method whose state becomes non-finite, or whose sampled
clients are all rejected for --max-rejected-rounds rounds, fails with an error naming it, its seed and the round;
the others still run, and the exit status is 1. See docs/experiments.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters.experiments.runlib import cli, dp_flags, robust_flags
from fedjax_adapters.experiments.runlib.cli import UserError

RUNNER = 'floral'
DEFAULT_SERVER_LR = {'sgd': 1.0, 'adam': 1e-3}

# Settings that are flags of their own (the rest of FloralTask describes the task itself; --set reaches all).
_FLAG_HELP = {
    'rounds': 'federated rounds',
    'fraction': 'share of clients sampled per round',
    'batch_size': 'local batch size',
    'num_epochs': 'local epochs per round',
    'shuffle': 'shuffle each client\'s examples every epoch',
    'lr': 'client SGD learning rate',
    'lora_lr': 'client rate of FLoRAL\'s / the Local Adaptor\'s adaptors (none: --lr)',
    'router_lr': 'router-logit learning rate',
    'rank': 'Local Adaptor rank (an int) or rank budget (a float < 1)',
    'noise_std': 'scale of the uniform U[0, 1) noise on the router logits in training (0: off)',
    'temperature': 'router softmax temperature',
    'floor': 'lower bound of each router probability (none: no floor)',
    'aggregation_temperature': 'FLoRAL: the server weighs adaptors by softmax(logits / T) with this T (none: '
                               '--temperature, the paper; 0.1 sharpens, see experiments/router_study)',
    'balance_rate': 'FLoRAL: server-held router offsets pushed toward equal adaptor use at this rate (0: off, the '
                    'paper)',
    'precondition': 'LoRA gradient preconditioning',
    'bias_init': 'bias-adaptor init',
    'server_optimizer': 'server optimizer on the pseudo-gradient',
    'server_lr': 'server learning rate (changing --server-opt alone picks 1 for sgd, 1e-3 for adam)',
    'server_adaptor_lr': 'separate server rate for FLoRAL\'s adaptors (none: --server-lr; the public code in effect '
                         'uses the client lr)',
    'augment': 'CIFAR crop + flip augmentation',
}
_FLAG_NAMES = {'noise_std': ('--router-noise', '--noise-std'), 'server_optimizer': ('--server-opt',)}
_CHOICES = {'bias_init': configs.BIAS_INITS, 'server_optimizer': configs.SERVER_OPTIMIZERS}


def _task_defaults(name: str) -> str:
  values = {dataclasses.asdict(t)[name] for t in configs.TASKS.values()}
  text = [repr(v) for v in sorted(values, key=lambda v: (type(v).__name__, v))]
  if len(text) == 1:
    return f'default: {text[0]}'
  return f'default per task: {" | ".join(text)}; --print-config shows the one in effect'


def _number(text: str) -> int | float:
  """An int if ``text`` is one, else a float (a rank: 8 is a rank, 0.01 a budget)."""
  try:
    return cli.int_at_least(1)(text)
  except argparse.ArgumentTypeError:
    return cli.positive_float(text)


def _optional(parse):
  return lambda text: None if text.lower() in ('none', 'null') else parse(text)


_FLAG_TYPES = {'rounds': cli.int_at_least(0), 'batch_size': cli.int_at_least(1), 'num_epochs': cli.int_at_least(1),
               'fraction': cli.fraction, 'rank': _number, 'noise_std': cli.nonnegative_float,
               'floor': _optional(cli.nonnegative_float), 'lora_lr': _optional(cli.positive_float),
               'server_adaptor_lr': _optional(cli.positive_float),
               'aggregation_temperature': _optional(cli.positive_float), 'balance_rate': cli.nonnegative_float}


def build_parser() -> cli.Parser:
  p = cli.Parser(prog='python -m fedjax_adapters.experiments.floral', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--task', help=f'one of: {", ".join(configs.TASKS)}')
  p.add_argument('--methods', nargs='+', default=None,
                 help=f'subset of: {", ".join(configs.METHODS)} (default: the table\'s eight rows; synthetic tasks: '
                      f'{" ".join(configs.SYNTHETIC_METHODS)})')
  p.add_argument('--seeds', nargs='+', default=['1'],
                 help='one number N: seeds 0..N-1; several numbers: those seeds; A:B: seeds A..B-1 (default: 1, i.e. '
                      'seed 0); each seed repartitions the data and initializes the models')
  p.add_argument('--smoke', action='store_true', help='the task shrunk to a few clients, 2 rounds, random images')
  p.add_argument('--data-dir', default=None, help='tensorflow_datasets directory (array_record) for MNIST / CIFAR; '
                 'the folder of the local copies for femnist, shakespeare, stackoverflow_nwp, cifar100_pachinko')
  g = p.add_argument_group('run directory, checkpoints, progress')
  g.add_argument('--out', default=None, help='run directory (default: runs/<task>-<YYYYmmdd-HHMMSS>)')
  g.add_argument('--resume', metavar='DIR', default=None,
                 help='continue the run in DIR: finished methods/seeds are kept, the others restart from their latest '
                      'checkpoint (takes every setting from DIR/config.json)')
  g.add_argument('--json', default=None, help='also write the results document here')
  g.add_argument('--eval-every', type=cli.int_at_least(1), default=None,
                 help='evaluate every this many rounds (default: rounds / 20); the state is checked for NaN/Inf then')
  g.add_argument('--checkpoint-every', type=cli.int_at_least(1), default=None,
                 help='checkpoint every this many rounds (default: rounds / 10), and after the last round')
  g.add_argument('--keep-checkpoints', type=cli.int_at_least(1), default=2, help='checkpoints kept per method and seed '
                 '(default: 2)')
  g.add_argument('--max-rejected-rounds', type=cli.int_at_least(1), default=5,
                 help='fail a method after this many consecutive rounds with every sampled client rejected '
                      '(default: 5)')
  g.add_argument('--compiled-loop', action=argparse.BooleanOptionalAction, default=True,
                 help='run the rounds between evaluations / checkpoints in one compiled loop: the same results, '
                      '1.75-2.4x faster on the MNIST MLP on a CPU (default: on; --no-compiled-loop dispatches every '
                      'round from Python)')
  cli.add_run_arguments(g)
  robust_flags.add_arguments(p)
  cli.add_settings_arguments(p, configs.FloralTask, what='task setting')
  hints = typing.get_type_hints(configs.FloralTask)
  dp_flags.add_flags(p)
  t = p.add_argument_group('training settings (default: the task\'s, i.e. the public code\'s settings)')
  for name, text in _FLAG_HELP.items():
    flags = _FLAG_NAMES.get(name, ('--' + name.replace('_', '-'),))
    help_text = f'{text} ({_task_defaults(name)})'
    if hints[name] is bool:
      t.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                     help=help_text)
    elif name in _CHOICES:
      t.add_argument(*flags, dest=name, choices=_CHOICES[name], default=argparse.SUPPRESS, help=help_text)
    else:
      t.add_argument(*flags, dest=name, type=_FLAG_TYPES.get(name, cli.positive_float), default=argparse.SUPPRESS,
                     help=help_text)
  return p


def resolve_config(args: argparse.Namespace) -> configs.FloralTask:
  """The task's settings with --config, then --set, then the flags applied (each later one wins); validated.

  Raises:
    UserError: an unknown task or setting, or a value out of range.
  """
  if args.task not in configs.TASKS:
    raise UserError(f'unknown task {args.task!r}; valid tasks: {", ".join(configs.TASKS)}')
  task = configs.TASKS[args.task]
  if args.smoke:
    task = configs.smoke(task)
  if args.config:
    task = cli.apply_overrides(task, cli.read_config_file(args.config), source=f'--config {args.config}')
  task = cli.apply_overrides(task, args.overrides)
  flags = {name: vars(args)[name] for name in _FLAG_HELP if name in vars(args)}  # only the flags given
  if 'server_optimizer' in flags and 'server_lr' not in flags and flags['server_optimizer'] != task.server_optimizer:
    flags['server_lr'] = DEFAULT_SERVER_LR[flags['server_optimizer']]
  task = dataclasses.replace(task, **flags)
  try:
    return configs.validate(task)
  except ValueError as e:
    raise UserError(str(e)) from None


def _methods(args, task) -> list[str]:
  methods = cli.check_methods(args.methods or list(configs.default_methods(task)), configs.METHODS)
  try:
    configs.check_methods(task, methods)
  except ValueError as e:
    raise UserError(str(e)) from None
  return methods


def settings_from_config(config: dict, where: str) -> configs.FloralTask:
  """The task settings stored in a run's config.json, checked exactly as the command line checks them.

  Raises:
    UserError: a missing, unknown or mistyped setting, or a value out of range (named, with ``where``).
  """
  settings = config.get('settings')
  if not isinstance(settings, dict):
    raise UserError(f'{where}: no "settings" object')
  missing = [f.name for f in dataclasses.fields(configs.FloralTask) if f.name not in settings
             and f.name not in configs.ADDED_SETTINGS]
  if missing:
    raise UserError(f'{where}: settings lack {", ".join(missing)}')
  if settings['name'] not in configs.TASKS:
    raise UserError(f'{where}: unknown task {settings["name"]!r}; valid tasks: {", ".join(configs.TASKS)}')
  try:
    return configs.validate(cli.apply_overrides(configs.TASKS[settings['name']], settings, source=where))
  except ValueError as e:  # UserError (a mistyped value) or the task's own checks
    raise UserError(str(e) if str(e).startswith(where) else f'{where}: {e}') from None


def plan_from_config(config: dict, where: str) -> dict:
  """The plan stored in a run's config.json (methods, seeds, cadences), checked as the command line checks it."""
  plan = cli.checked_plan(config, where, {'eval_every': cli.int_at_least(1), 'checkpoint_every': cli.int_at_least(1),
                                          'keep': cli.int_at_least(1), 'max_rejected_rounds': cli.int_at_least(1)})
  plan['methods'] = cli.check_methods(cli.checked_list(plan, 'methods', str, where), configs.METHODS)
  if not isinstance(plan.get('compiled_loop'), bool):
    raise UserError(f'{where}: plan.compiled_loop must be true or false, got {plan.get("compiled_loop")!r}')
  if plan.get('data_dir') is not None:
    plan['data_dir'] = cli.existing_dir(str(plan['data_dir']), f'{where}: plan.data_dir')
  plan['robust'] = robust_flags.from_plan(plan, where)
  return plan


def _check_robust(robust: dict, task: configs.FloralTask, methods: list[str]) -> dict:
  """--aggregator replaces the weighted mean of the fedavg and floral kinds; label flipping needs class labels."""
  other = [m for m in methods if configs.METHODS[m].kind not in ('fedavg', 'floral')]
  if robust['aggregator'] is not None and other:
    raise UserError(f'--aggregator applies to the fedavg and floral methods; {", ".join(other)} keep their own '
                    f'aggregation (choose --methods among the others)')
  if (robust['attack'] or '').startswith('label_flip') and task.loss != 'xent':
    raise UserError(f"--attack label_flip needs a classification task (loss 'xent'); {task.name} uses {task.loss}")
  return robust


def _resume_plan(args) -> dict:
  """The plan stored in the run directory ``args.resume``, re-validated; other settings may not be given."""
  path, config = cli.resumed_run(args, build_parser(), RUNNER, 'FLoRAL')
  where = f'{path}/config.json'
  plan = dict(plan_from_config(config, where), out=path, resuming=True, **cli.resume_options(args, config, path))
  plan['task'] = settings_from_config(config, where)
  return plan


def make_plan(args) -> dict:
  """Everything a run needs, validated, before JAX is imported (errors raise UserError)."""
  if args.resume:
    return _resume_plan(args)
  if args.task is None:
    raise UserError('--task is required (or --resume DIR)')
  task = resolve_config(args)
  methods = _methods(args, task)
  seeds = cli.parse_seeds(args.seeds)
  rounds = task.rounds
  eval_every = args.eval_every or max(1, rounds // 20)
  plan = dict(task=task, methods=methods, seeds=seeds, eval_every=eval_every,
              checkpoint_every=args.checkpoint_every or max(1, rounds // 10), keep=args.keep_checkpoints,
              max_rejected_rounds=args.max_rejected_rounds, compiled_loop=args.compiled_loop,
              data_dir=args.data_dir and cli.existing_dir(args.data_dir, '--data-dir'), json=args.json,
              quiet=args.quiet, out=args.out, writers=cli.check_writers(args.writer),
              dp=dp_flags.make_dp_plan(args, num_clients=task.num_clients, fraction=task.fraction, rounds=rounds),
              robust=_check_robust(robust_flags.from_args(args), task, methods))
  if args.print_config:
    return plan
  if task.dataset in configs.TFDS_DATASETS and not task.smoke:
    from fedjax_adapters.experiments.runlib import tfds_check  # pylint: disable=g-import-not-at-top  (no JAX)
    hint = ' (The mnist_offline_* tasks need no download.)' if task.dataset == 'mnist' else ''
    missing = tfds_check.missing(task.dataset, plan['data_dir'], hint=hint)
    if missing:
      raise UserError(missing)
  if task.dataset in configs.NATURAL_DATASETS and not task.smoke:
    try:
      configs.natural_files(task.dataset, plan['data_dir'])
    except ValueError as e:
      raise UserError(str(e)) from None
  cli.check_outputs(plan, task.name)
  return plan


def resume(path: str, *, quiet: bool = False, json: str | None = None) -> tuple[dict, int]:
  """Continues the FLoRAL run in ``path`` (``--resume path``) from Python; returns ``(results, exit status)``.

  Raises:
    UserError: what the command line reports as ``error: ...`` (nothing is written then).
  """
  argv = ['--resume', path] + (['--quiet'] if quiet else []) + (['--json', json] if json else [])
  return cli.run_plan(argv, parser=build_parser(), make_plan=make_plan,
                      run_module='fedjax_adapters.experiments.floral_run')


def main(argv: typing.Sequence[str] | None = None) -> dict:
  """Parses ``argv``, runs every (method, seed), returns the results (exit statuses: ``cli.runner_main``)."""
  return cli.run_cli(lambda a: cli.runner_main(a, parser=build_parser(), make_plan=make_plan,
                                               settings=lambda plan: plan['task'],
                                               run_module='fedjax_adapters.experiments.floral_run'), argv)


def build_algorithm(method: str, task: configs.FloralTask, data):
  """The algorithm of ``method`` on ``task`` (``data`` gives the oracle clusters); see floral_tasks."""
  from fedjax_adapters.experiments import floral_tasks  # pylint: disable=g-import-not-at-top
  return floral_tasks.build_algorithm(method, task, data)


def load_data(task: configs.FloralTask, seed: int, *, data_dir: str | None = None):
  """The task's federated dataset for ``seed``; see floral_tasks."""
  from fedjax_adapters.experiments import floral_tasks  # pylint: disable=g-import-not-at-top
  return floral_tasks.load_data(task, seed, data_dir=data_dir)


TASKS = configs.TASKS
METHODS = tuple(configs.METHODS)

if __name__ == '__main__':
  main(sys.argv[1:])
