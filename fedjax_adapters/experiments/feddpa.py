"""FedDPA on the paper's Dataset 1: FedIT, Local, FedDPA-T, FedDPA-F (and Centralized), scored on personalization
(each client on its own task) and test-time personalization (each client over every task), with paired bootstrap
intervals.

Usage::

  python -m fedjax_adapters.experiments.feddpa --data DATASET1 --config smoke     # first contact, ~1 min
  python -m fedjax_adapters.experiments.feddpa --data DIR --config cpu --out runs/feddpa_cpu             # about an hour, 2 cores
  python -m fedjax_adapters.experiments.feddpa --resume runs/feddpa_cpu                                  # continue after a stop
  python -m fedjax_adapters.experiments.feddpa --data DIR --config gpu                                   # one GPU, the paper's schedule
  python -m fedjax_adapters.experiments.feddpa --data DIR --config paper --model /path/to/llama-7b-hf    # the paper's setting
  python -m fedjax_adapters.experiments.feddpa --data DIR --config cpu --lr 3e-4 --set num_refs=3 --print-config
  python -m fedjax_adapters.experiments.report runs/feddpa_cpu                                           # table and P/TTP bars

Every client's final model answers the whole test pool. Its own task is *personalization* (P); the average over all
tasks is *test-time personalization* (TTP). Every setting of the config can be changed by its flag below, by
``--set key=value`` or by ``--config-file FILE`` (a JSON object of settings, or a run's config.json); flags win over
--set, which wins over the file.

The run directory (``--out``) receives config.json, metrics.jsonl (one line per round per method and seed, the
evaluation on the last), results.json (per-task and average ROUGE-1, every prompt's score, 95 % paired bootstrap
intervals of every average and of the paper's claimed differences), the clients' answers under predictions/ and
checkpoints of the adapters (the frozen base is not stored). Ctrl-C (or SIGTERM) saves a checkpoint and exits;
``--resume DIR`` continues with bit-identical results. ``--export-peft DIR`` writes every method's adapters as PEFT
folders. See docs/feddpa.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from fedjax_adapters.experiments.configs import feddpa as configs
from fedjax_adapters.experiments.runlib import cli
from fedjax_adapters.experiments.runlib.cli import UserError

RUNNER = 'feddpa'
METHODS = ('centralized', 'fedit', 'local', 'feddpa_t', 'feddpa_f')
DEFAULT_METHODS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')

# Settings with a flag of their own: name -> (flags, argparse type or choices, help). --set reaches every setting.
_FLAGS = {
    'rounds': (('--rounds',), cli.int_at_least(0), 'federated rounds'),
    'lr': (('--lr',), cli.positive_float, 'client AdamW peak learning rate (linear decay to 0 in each phase)'),
    'num_epochs': (('--epochs',), cli.int_at_least(1), 'local epochs per training phase'),
    'batch_size': (('--batch-size',), cli.int_at_least(1), 'examples per optimizer step'),
    'rank': (('--rank',), cli.int_at_least(1), 'LoRA rank of both adapters'),
    'alpha': (('--alpha',), cli.positive_float, 'LoRA alpha (scale alpha / rank)'),
    'dropout': (('--dropout',), cli.nonnegative_float, 'LoRA dropout while training'),
    'mix_weight': (('--mix-weight',), cli.nonnegative_float,
                   "FedDPA-T's weight of the local adapter while it trains (the paper's alpha)"),
    'lam': (('--lam', '--lambda'), cli.nonnegative_float, 'lambda, the scale of the instance-wise weight'),
    'num_refs': (('--num-refs', '--S'), cli.int_at_least(1), 'S, local reference prompts per test prompt'),
    'weight_target': (('--weight-target',), configs.WEIGHT_TARGETS,
                      'the adapter the instance-wise weight scales (global: the public code)'),
    'embed_adapter': (('--embed-adapter',), configs.EMBED_ADAPTERS, 'the adapters that embed prompts for the weight'),
    'max_new_tokens': (('--max-new-tokens',), cli.int_at_least(1), 'decoded tokens per answer'),
    'num_beams': (('--num-beams',), cli.int_at_least(1), 'beams (1: greedy decoding)'),
    'test_per_task': (('--test-per-task',), cli.int_at_least(1), 'test prompts per task (200: all)'),
    'train_per_client': (('--train-per-client',), cli.int_at_least(1), 'training examples per client (300: all)'),
    'max_length': (('--max-length',), cli.int_at_least(2), 'training sequences are cut at this many tokens'),
    'prompt_length': (('--prompt-length',), cli.int_at_least(1), 'longer test prompts keep their last tokens'),
    'eval_batch': (('--eval-batch',), cli.int_at_least(1), 'prompts decoded per batch'),
    'backend': (('--backend',), configs.BACKENDS, 'train all clients at once (vmap) or one by one (sequential)'),
}


def _defaults(name: str) -> str:
  return 'defaults: ' + ', '.join(f'{c} {getattr(cfg, name)!r}' for c, cfg in configs.CONFIGS.items())


def build_parser() -> cli.Parser:
  p = cli.Parser(prog='python -m fedjax_adapters.experiments.feddpa', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', default=None, help='a folder laid out like FedDPA Dataset 1, or a databricks-dolly-15k '
                 'file (.jsonl / .parquet; one client per category) (required unless --resume)')
  p.add_argument('--config', default='cpu', help=f'one of: {", ".join(configs.CONFIGS)} (default: cpu)')
  p.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS),
                 help=f'subset of: {", ".join(METHODS)} (default: {" ".join(DEFAULT_METHODS)})')
  p.add_argument('--model', default=None, help="HF LLaMA folder or .gguf file (default: the config's model)")
  p.add_argument('--seed', type=cli.int_at_least(0), default=None, help='one seed (default: 0)')
  p.add_argument('--seeds', nargs='+', default=None, help='several seeds: N (0..N-1), a list, or A:B')
  g = p.add_argument_group('run directory, checkpoints, output')
  g.add_argument('--out', default=None, help='run directory (default: runs/feddpa-<config>-<YYYYmmdd-HHMMSS>)')
  g.add_argument('--resume', metavar='DIR', default=None, help='continue the run in DIR with its own settings')
  g.add_argument('--json', default=None, help='also write the results document here')
  g.add_argument('--export-peft', metavar='DIR', default=None,
                 help="write every finished method's adapters as PEFT folders under DIR/<method>[-seed<k>]")
  g.add_argument('--checkpoint-every', type=cli.int_at_least(1), default=1,
                 help='checkpoint the adapters every this many rounds, and after the last (default: 1)')
  g.add_argument('--keep-checkpoints', type=cli.int_at_least(1), default=2, help='checkpoints kept (default: 2)')
  g.add_argument('--bootstrap-samples', type=cli.int_at_least(1), default=10_000,
                 help='paired bootstrap resamples of the test prompts (default: 10000)')
  g.add_argument('--quiet', action='store_true', help='no progress output; only errors and the final tables')
  cli.add_settings_arguments(p, configs.FedDPAConfig, file_flag='--config-file')
  t = p.add_argument_group("FedDPA settings (default: the config's)")
  for name, (flags, kind, text) in _FLAGS.items():
    extra = {'choices': kind} if isinstance(kind, tuple) else {'type': kind}
    t.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=f'{text} ({_defaults(name)})', **extra)
  return p


def resolve_config(args: argparse.Namespace) -> configs.FedDPAConfig:
  """The config with --config-file, then --set, then the flags applied (each later one wins); validated."""
  if args.config not in configs.CONFIGS:
    raise UserError(f'unknown config {args.config!r}; valid configs: {", ".join(configs.CONFIGS)}')
  cfg = configs.CONFIGS[args.config]
  try:
    if args.config_file:
      settings = cli.read_config_file(args.config_file)
      cfg = cli.apply_overrides(cfg, settings, source=f'--config-file {args.config_file}')
    cfg = cli.apply_overrides(cfg, args.overrides)
    cfg = cfg.replace(**{name: vars(args)[name] for name in _FLAGS if name in vars(args)})
  except ValueError as e:  # the config's own checks (FedDPAConfig.__post_init__)
    raise UserError(str(e)) from None
  if args.model:
    cfg = cfg.replace(model=args.model)
  return cfg


def one_line(message: str) -> str:
  """A multi-line loader message as one line (the CLI reports every user error on one line)."""
  return '; '.join(line.strip(' -') for line in str(message).splitlines() if line.strip())


def check_model(cfg: configs.FedDPAConfig) -> str:
  """The model source, checked to exist and look parseable (a GGUF header, or an HF folder's config.json)."""
  if cfg.model in configs.MODELS:
    return cfg.model
  if not cfg.model:
    raise UserError(f'config {cfg.name!r} needs --model (a Hugging Face LLaMA folder or a .gguf file)')
  path = os.path.abspath(os.path.expanduser(cfg.model))
  if os.path.isfile(path) and path.endswith('.gguf'):
    with open(path, 'rb') as f:
      if f.read(4) != b'GGUF':
        raise UserError(f'--model {cfg.model}: not a GGUF file (no GGUF header)')
    return path
  config_json = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.isfile(config_json):
    raise UserError(f'--model {cfg.model}: expected a Hugging Face folder with config.json, or a .gguf file')
  try:
    with open(config_json) as f:
      json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'--model {cfg.model}: config.json does not parse ({e})') from None
  return path


def check_data(path: str | None, cfg: configs.FedDPAConfig) -> str:
  """The data folder, loaded once so a missing or malformed dataset, or a client with fewer training examples than
  the S references it must draw, fails before any training."""
  if not path:
    raise UserError('--data is required (a folder laid out like FedDPA Dataset 1, or a databricks-dolly-15k '
                    'file), or --resume DIR')
  from fedjax_adapters.data import dolly  # pylint: disable=g-import-not-at-top
  try:
    data = dolly.load_instruction_data(path)
  except (ValueError, OSError) as e:
    raise UserError(f'--data {path}: {one_line(e)}') from None
  for k, examples in enumerate(data.train):
    n = min(len(examples), cfg.train_per_client)
    if n < cfg.num_refs:
      raise UserError(f'--data {path}: client {k} has {n} training examples, fewer than num_refs={cfg.num_refs} '
                      f'references per test prompt; lower --num-refs')
  return os.path.abspath(os.path.expanduser(path))


def _seeds(args) -> list[int]:
  if args.seed is not None and args.seeds is not None:
    raise UserError('pass --seed or --seeds, not both')
  if args.seeds is not None:
    return cli.parse_seeds(args.seeds)
  return [0 if args.seed is None else args.seed]


def _resume_plan(args) -> dict:
  """The plan stored in the run directory ``args.resume``; other settings may not be given with --resume."""
  path, config = cli.resumed_run(args, build_parser(), RUNNER, 'FedDPA', allowed=('resume', 'quiet', 'json',
                                                                                  'export_peft'))
  plan = dict(config['plan'], out=path, json=args.json, quiet=args.quiet, resuming=True,
              export_peft=args.export_peft and cli.probe_writable_dir(args.export_peft, '--export-peft'))
  plan['cfg'] = configs.FedDPAConfig(**config['settings'])
  check_data(plan['data'], plan['cfg'])
  check_model(plan['cfg'])
  return plan


def make_plan(args) -> dict:
  """Everything a run needs, validated, before JAX is imported (errors raise UserError)."""
  if args.resume:
    return _resume_plan(args)
  cfg = resolve_config(args)
  plan = dict(cfg=cfg, methods=cli.check_methods(args.methods, METHODS), seeds=_seeds(args),
              checkpoint_every=args.checkpoint_every, keep=args.keep_checkpoints,
              bootstrap_samples=args.bootstrap_samples, json=args.json,
              quiet=args.quiet, out=args.out, data=args.data, export_peft=args.export_peft)
  if args.print_config:
    return plan
  plan['data'] = check_data(args.data, cfg)
  check_model(cfg)
  if args.json:
    cli.probe_writable_file(args.json, '--json')
  if args.export_peft:
    plan['export_peft'] = cli.probe_writable_dir(args.export_peft, '--export-peft')
  from fedjax_adapters.experiments.runlib.rundir import default_path  # pylint: disable=g-import-not-at-top
  plan['out'] = cli.probe_writable_dir(args.out or default_path(f'feddpa-{cfg.name}'), '--out')  # created last
  return plan


def main(argv: typing.Sequence[str] | None = None) -> dict:
  """Parses ``argv``, trains and evaluates every (method, seed), returns the results (exit statuses: ``cli.runner_main``)."""
  return cli.run_cli(lambda a: cli.runner_main(a, parser=build_parser(), make_plan=make_plan,
                                               settings=lambda plan: plan['cfg'],
                                               run_module='fedjax_adapters.experiments.feddpa_run'), argv)


if __name__ == '__main__':
  main(sys.argv[1:])
