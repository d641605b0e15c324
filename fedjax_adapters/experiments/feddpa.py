"""FedDPA on the paper's Dataset 1: FedIT, Local, FedDPA-T, FedDPA-F (and Centralized), and the personalized-LoRA
family (fedsa_lora, ditto, flora, hetlora; docs/family.md), scored on personalization (each client on its own task)
and test-time personalization (each client over every task), with paired bootstrap intervals.

Usage::

  python -m fedjax_adapters.experiments.feddpa --data DATASET1 --preset smoke     # first contact, ~1 min (scores mean nothing)
  python -m fedjax_adapters.experiments.feddpa --data DIR --preset mid --out runs/feddpa_mid             # ~25 min, 2 shared cores
  python -m fedjax_adapters.experiments.feddpa --data DIR --preset cpu --out runs/feddpa_cpu             # about an hour, 2 cores
  python -m fedjax_adapters.experiments.feddpa --resume runs/feddpa_cpu                                  # continue after a stop
  python -m fedjax_adapters.experiments.feddpa --data DIR --preset gpu                                   # one GPU, the paper's schedule
  python -m fedjax_adapters.experiments.feddpa --data DIR --preset paper --model /path/to/llama-7b-hf    # the paper's setting
  python -m fedjax_adapters.experiments.feddpa --data DIR --preset cpu --lr 3e-4 --set num_refs=3 --print-config
  python -m fedjax_adapters.experiments.report runs/feddpa_cpu                                           # table and P/TTP bars

Every client's final model answers the whole test pool. Its own task is *personalization* (P); the average over all
tasks is *test-time personalization* (TTP). Every setting of the preset can be changed by its flag below, by
``--set key=value`` or by ``--config FILE`` (a JSON object of settings, or a run's config.json); flags win over
--set, which wins over the file. The flags are spelled as in the FLoRAL runner (``--seeds``, ``--num-epochs``,
``--config FILE``); the old ``--seed``, ``--epochs``, ``--config NAME`` and ``--config-file`` still work and warn.

The run directory (``--out``) receives config.json, metrics.jsonl (one line per round per method and seed, the
evaluation on the last), results.json (per-task and average ROUGE-1, every prompt's score, 95 % paired bootstrap
intervals of every average and of the paper's claimed differences), the clients' answers under predictions/ and
checkpoints of the adapters (the frozen base is not stored). Ctrl-C (or SIGTERM) saves a checkpoint and exits;
``--resume DIR`` continues with bit-identical results. ``--export-peft DIR`` writes every method's adapters as PEFT
folders. ``--dp-clip`` with ``--dp-noise-multiplier`` or ``--dp-epsilon`` makes the federated global LoRA user-level
differentially private (the local LoRA never leaves a client); see docs/privacy.md. See docs/feddpa.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

from fedjax_adapters.experiments.configs import feddpa as configs
from fedjax_adapters.experiments.runlib import cli, dp_flags, robust_flags
from fedjax_adapters.experiments.runlib.cli import UserError

RUNNER = 'feddpa'
MAX_ROUNDS = 2 ** 31 - 1
MAX_EPOCHS = 1000
HIDDEN_SIZES = {'tiny': 32, 'smollm2': 576}  # the built-in models (configs.MODELS); feddpa_run.load_base builds them
BASE_DTYPES = ('f32', 'bf16')   # runlib.memory.BASE_DTYPES (kept here: no JAX before the plan is checked)
REMAT_POLICIES = ('full', 'dots', 'dots_no_batch')   # models.llama.REMAT_POLICIES
QUANTIZE = ('int8', 'int4', 'gguf')
# The personalized-LoRA family (docs/family.md) on the decoder: feddpa_family.FAMILY (kept here: no JAX before the
# plan is checked), and FedALT, which is refused (REFUSED says why).
FAMILY = ('fedsa_lora', 'ditto', 'flora', 'hetlora')
METHODS = ('centralized', 'fedit', 'local', 'feddpa_t', 'feddpa_f') + FAMILY + ('fedalt',)
DEFAULT_METHODS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')
REFUSED = {'fedalt': "fedalt cannot run on the LLaMA decoder: its gate is a linear function of the flattened "
                     "fixed-width model input, and the decoder's input is token ids whose width changes between "
                     "training sequences and prompts (docs/family.md)"}

# Settings with a flag of their own: name -> (flags, argparse type or choices, help). --set reaches every setting.
_FLAGS = {
    'rounds': (('--rounds',), cli.int_at_least(0), 'federated rounds'),
    'lr': (('--lr',), cli.positive_float, 'client AdamW peak learning rate (linear decay to 0 in each phase)'),
    'num_epochs': (('--num-epochs',), cli.int_at_least(1), 'local epochs per training phase'),
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
    'micro_batch': (('--micro-batch',), cli.int_at_least(1),
                    'rows per micro-batch: gradient accumulation over batch-size / K micro-batches in one step '
                    '(activation memory scales with K; must divide --batch-size)'),
}
NEW_SETTINGS = ('micro_batch',)   # added after runs were stored: an older config.json lacks them (their default)


def _defaults(name: str) -> str:
  return 'defaults: ' + ', '.join(f'{c} {getattr(cfg, name)!r}' for c, cfg in configs.CONFIGS.items())


def build_parser() -> cli.Parser:
  p = cli.Parser(prog='python -m fedjax_adapters.experiments.feddpa', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', default=None, help='a folder laid out like FedDPA Dataset 1, or a databricks-dolly-15k '
                 'file (.jsonl / .parquet; one client per category) (required unless --resume)')
  p.add_argument('--preset', default=None, help=f'one of: {", ".join(configs.CONFIGS)} (default: cpu)')
  p.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS),
                 help=f'subset of: {", ".join(METHODS)} (default: {" ".join(DEFAULT_METHODS)})')
  p.add_argument('--model', default=None, help="HF LLaMA folder or .gguf file (default: the config's model)")
  p.add_argument('--seeds', nargs='+', default=None,
                 help='one number N: seeds 0..N-1; several numbers: those seeds; A:B: seeds A..B-1 (default: seed 0)')
  p.add_argument('--seed', type=cli.int_at_least(0), default=None, action=cli.Renamed, new='--seeds K:K+1',
                 help=argparse.SUPPRESS)
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
  cli.add_run_arguments(g)
  robust_flags.add_arguments(p)
  dp_flags.add_flags(p)
  cli.add_settings_arguments(p, configs.FedDPAConfig)
  p.add_argument('--config-file', default=None, action=cli.Renamed, new='--config FILE',
                 help=argparse.SUPPRESS)
  t = p.add_argument_group("FedDPA settings (default: the preset's)")
  for name, (flags, kind, text) in _FLAGS.items():
    extra = {'choices': kind} if isinstance(kind, tuple) else {'type': kind}
    t.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=f'{text} ({_defaults(name)})', **extra)
  m = p.add_argument_group('memory levers and the memory report (docs/accelerators.md)')
  m.add_argument('--base-dtype', choices=BASE_DTYPES, default='f32',
                 help='storage dtype of the frozen base; LoRA and AdamW state stay float32 (default: f32)')
  m.add_argument('--remat', choices=REMAT_POLICIES, default=None,
                 help='recompute each decoder layer in the backward pass (full: save nothing; dots: save matmuls)')
  m.add_argument('--quantize', choices=QUANTIZE, default=None,
                 help='quantized frozen base linears, dequantized inside the matmul (QLoRA-style): int8 per output '
                      'channel, int4 in blocks of 64 inputs with a scale and an offset, or gguf: a GGUF model\'s own '
                      'Q8_0 / Q4_0 / Q4_1 blocks kept as stored (smollm2 ships Q4_1)')
  m.add_argument('--device-memory', type=cli.positive_float, default=None, metavar='GB',
                 help="memory to fit the training step in, GB (default: the device's own; the CPU reports none)")
  m.add_argument('--dry-run', action='store_true',
                 help="compile one training step from abstract shapes, print XLA's memory analysis and the largest "
                      'clients per step that fit, and exit')
  t.add_argument('--epochs', dest='num_epochs', type=cli.int_at_least(1), default=argparse.SUPPRESS,
                 action=cli.Renamed, new='--num-epochs', help=argparse.SUPPRESS)
  return p


def _preset(args: argparse.Namespace) -> str:
  """The preset's name: ``--preset``, or the old ``--config NAME`` (warns), default ``cpu``."""
  if args.config and args.config in configs.CONFIGS and not os.path.isfile(args.config):
    if args.preset:
      raise UserError(f'--config {args.config} names a preset and --preset {args.preset} another; keep --preset')
    print(f'warning: --config {args.config} is now spelled --preset {args.config}; --config takes a settings file',
          file=sys.stderr, flush=True)
    args.preset, args.config = args.config, None
  if args.config_file:
    if args.config:
      raise UserError(f'--config {args.config} and --config-file {args.config_file} both name a settings file')
    args.config, args.config_file = args.config_file, None
  if args.config and not os.path.isfile(args.config) and not args.config.endswith('.json'):
    raise UserError(f'--config {args.config}: no such settings file, and not a preset ({", ".join(configs.CONFIGS)}); '
                    'choose a preset with --preset NAME')
  name = args.preset or 'cpu'
  if name not in configs.CONFIGS:
    raise UserError(f'unknown preset {name!r}; valid presets: {", ".join(configs.CONFIGS)}')
  return name


def resolve_config(args: argparse.Namespace) -> configs.FedDPAConfig:
  """The preset with --config FILE, then --set, then the flags applied (each later one wins); validated."""
  cfg = configs.CONFIGS[_preset(args)]
  try:
    if args.config:
      settings = cli.read_config_file(args.config)
      cfg = cli.apply_overrides(cfg, settings, source=f'--config {args.config}')
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
  return checked_data(path, cfg)[0]


def checked_data(path: str | None, cfg: configs.FedDPAConfig) -> tuple[str, int]:
  """``(absolute data path, number of clients)``, checked as :func:`check_data` checks it."""
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
  return os.path.abspath(os.path.expanduser(path)), len(data.train)


def _seeds(args) -> list[int]:  # --seed is the old spelling of --seeds K:K+1
  if args.seed is not None and args.seeds is not None:
    raise UserError('pass --seed or --seeds, not both')
  if args.seeds is not None:
    return cli.parse_seeds(args.seeds)
  return [0 if args.seed is None else args.seed]


def settings_from_config(config: dict, where: str) -> configs.FedDPAConfig:
  """The settings stored in a run's config.json, checked exactly as the command line checks them."""
  settings = config.get('settings')
  if not isinstance(settings, dict):
    raise UserError(f'{where}: no "settings" object')
  missing = [f.name for f in dataclasses.fields(configs.FedDPAConfig)
             if f.name not in settings and f.name not in NEW_SETTINGS]
  if missing:
    raise UserError(f'{where}: settings lack {", ".join(missing)}')
  try:
    cfg = cli.apply_overrides(configs.CONFIGS['smoke'], settings, source=where)
  except ValueError as e:  # UserError, or the config's own checks (FedDPAConfig.__post_init__)
    raise UserError(f'{where}: {e}' if not str(e).startswith(where) else str(e)) from None
  check_plausible(cfg)
  return cfg


def _resume_plan(args) -> dict:
  """The plan stored in the run directory ``args.resume``, re-validated; other settings may not be given."""
  path, config = cli.resumed_run(args, build_parser(), RUNNER, 'FedDPA',
                                 allowed=('resume', 'quiet', 'json', 'writer', 'export_peft'))
  where = f'{path}/config.json'
  plan = cli.checked_plan(config, where, {'checkpoint_every': cli.int_at_least(1), 'keep': cli.int_at_least(1),
                                          'bootstrap_samples': cli.int_at_least(1)})
  plan['methods'] = cli.check_methods(cli.checked_list(plan, 'methods', str, where), METHODS)
  plan.update(out=path, resuming=True, **cli.resume_options(args, config, path),
              export_peft=args.export_peft and cli.probe_writable_dir(args.export_peft, '--export-peft'))
  plan['cfg'] = settings_from_config(config, where)
  plan['robust'] = _check_robust(robust_flags.from_plan(plan, where), plan['methods'])
  check_family(plan['methods'], plan.get('levers') or {})
  check_levers(plan['cfg'], plan.get('levers') or {})
  num_clients = checked_data(plan.get('data'), plan['cfg'])[1]
  plan['dp'] = checked_dp_record(plan.get('dp'), plan['methods'], num_clients, where)
  check_model(plan['cfg'])
  return plan


def check_plausible(cfg: configs.FedDPAConfig) -> configs.FedDPAConfig:
  """Values of the right type that still cannot work: rounds past the int32 round counter, more local epochs than
  compile, a LoRA rank above the model's hidden size (every adapted projection's smaller side is at most that)."""
  if cfg.rounds > MAX_ROUNDS:
    raise UserError(f'rounds must be <= {MAX_ROUNDS} (the round counter is an int32); got {cfg.rounds}')
  if cfg.num_epochs > MAX_EPOCHS:
    raise UserError(f'num_epochs must be <= {MAX_EPOCHS}: local epochs are unrolled into the compiled round; got '
                    f'{cfg.num_epochs}')
  hidden = model_hidden_size(cfg.model)
  if hidden is not None and cfg.rank > hidden:
    raise UserError(f'rank {cfg.rank} is larger than model {cfg.model!r} allows (hidden size {hidden}; a LoRA rank '
                    'above the smaller side of a projection cannot be used)')
  return cfg


def model_hidden_size(model: str) -> int | None:
  """The hidden size of a built-in model or an HF folder's config.json (None when not known without loading)."""
  if model in HIDDEN_SIZES:
    return HIDDEN_SIZES[model]
  config_json = os.path.join(os.path.abspath(os.path.expanduser(model)), 'config.json')
  try:
    with open(config_json) as f:
      size = json.load(f).get('hidden_size')
  except (OSError, ValueError, AttributeError):
    return None
  return size if isinstance(size, int) else None


def _check_robust(robust: dict, methods: typing.Sequence[str] = ()) -> dict:
  """Label flipping needs class labels; FedDPA's tasks are next-token generation. The family keeps its own
  aggregation and client state, so --aggregator and --attack apply to FedDPA's methods only."""
  if (robust['attack'] or '').startswith('label_flip'):
    raise UserError('--attack label_flip needs class labels; FedDPA trains on instruction text (choose an update '
                    'attack: sign_flip, scaling, gaussian, alie, ipm)')
  family = [m for m in methods if m in FAMILY]
  if family and (robust['aggregator'] is not None or robust['attack']):
    raise UserError(f'--aggregator and --attack apply to centralized, fedit, local, feddpa_t and feddpa_f; '
                    f'{", ".join(family)} keep their own aggregation (choose --methods among the others)')
  return robust


FEDERATED = ('fedit', 'feddpa_t', 'feddpa_f')   # the methods whose clients send their global LoRA to the server
DP_KEYS = ('clip', 'noise_multiplier', 'delta', 'sampling', 'adaptive_quantile', 'num_clients', 'clients_per_round',
           'target_epsilon')


def _check_dp_methods(dp: dict | None, methods: list[str], where: str = '--dp-clip') -> dict | None:
  """DP applies to the federated methods; Local sends nothing (epsilon 0); Centralized is not federated."""
  if dp is None:
    return None
  if 'centralized' in methods:
    raise UserError(f'{where}: user-level DP applies to the federated methods; centralized pools every client\'s data '
                    'on one machine (no federation, no user-level guarantee): drop it from --methods')
  family = [m for m in methods if m in FAMILY]
  if family:
    raise UserError(f'{where}: user-level DP is wired for fedit, feddpa_t and feddpa_f in this runner, not for '
                    f'{" ".join(family)} (they keep their own aggregation): drop them from --methods or the --dp-* flags')
  if not any(m in FEDERATED for m in methods):
    raise UserError(f'{where}: --methods {" ".join(methods)} sends nothing to the server (Local trains only its local '
                    'LoRA, epsilon 0 without noise), so there is nothing to privatize: drop the --dp-* flags')
  return dp


def dp_plan(args, methods: list[str], num_clients: int, rounds: int) -> dict | None:
  """The ``--dp-*`` plan (None without ``--dp-clip``): every client takes part in every round (fraction 1)."""
  return _check_dp_methods(dp_flags.make_dp_plan(args, num_clients=num_clients, fraction=1.0, rounds=rounds), methods)


def checked_dp_record(dp, methods: list[str], num_clients: int, where: str) -> dict | None:
  """A run's stored ``plan.dp`` (or None) re-checked as the command line checks it, against the data's clients."""
  if dp is None:
    return None
  name = f'{where}: plan.dp'
  if not isinstance(dp, dict) or not set(DP_KEYS) <= set(dp):
    raise UserError(f'{name} must be an object with the keys {", ".join(DP_KEYS)}; got {dp!r}')
  if dp['num_clients'] != num_clients or dp['clients_per_round'] != num_clients:
    raise UserError(f'{name} was planned for {dp["num_clients"]} clients ({dp["clients_per_round"]} per round) but '
                    f'the data has {num_clients}')
  from fedjax_adapters import privacy_accounting as pa  # pylint: disable=g-import-not-at-top  (a DP run only)
  try:
    for key in ('clip', 'noise_multiplier', 'delta'):
      if isinstance(dp[key], bool) or not isinstance(dp[key], (int, float)):
        raise ValueError(f'dp {key} must be a number; got {dp[key]!r}.')
    pa.check_accounting(dp['sampling'], num_clients, num_clients, dp['delta'])
    dp_flags.check(dp)
  except (ValueError, TypeError) as e:
    raise UserError(f'{name}: {e}') from None
  return _check_dp_methods(dp, methods, name)


def check_levers(cfg: configs.FedDPAConfig, levers: dict) -> None:
  """``--quantize gguf`` keeps a GGUF file's blocks, so the model must be one (smollm2 or a .gguf path)."""
  if levers.get('quantize') == 'gguf' and cfg.model != 'smollm2' and not str(cfg.model).endswith('.gguf'):
    raise UserError(f'--quantize gguf keeps the quantized blocks of a GGUF model, and --model {cfg.model} is not one '
                    '(smollm2 or a .gguf file); use --quantize int8 or int4')


def check_family(methods: list[str], levers: dict) -> list[str]:
  """Refuses FedALT (:data:`REFUSED`) and FLoRA on a quantized base (FLoRA merges its LoRA into the base kernels)."""
  for m in methods:
    if m in REFUSED:
      raise UserError(REFUSED[m])
  if 'flora' in methods and levers.get('quantize'):
    raise UserError(f'flora merges every round into the base kernels, which --quantize {levers["quantize"]} stores as '
                    'integers; drop '
                    '--quantize or flora')
  return methods


def make_plan(args) -> dict:
  """Everything a run needs, validated, before JAX is imported (errors raise UserError)."""
  if args.resume:
    return _resume_plan(args)
  cfg = check_plausible(resolve_config(args))
  plan = dict(cfg=cfg, methods=cli.check_methods(args.methods, METHODS), seeds=_seeds(args),
              checkpoint_every=args.checkpoint_every, keep=args.keep_checkpoints,
              bootstrap_samples=args.bootstrap_samples, json=args.json, quiet=args.quiet, out=args.out,
              data=args.data, export_peft=args.export_peft, writers=cli.check_writers(args.writer),
              robust=_check_robust(robust_flags.from_args(args), args.methods))
  plan.update(levers={'base_dtype': args.base_dtype, 'remat': args.remat, 'quantize': args.quantize},
              dry_run=args.dry_run, device_memory=args.device_memory)
  check_family(plan['methods'], plan['levers'])
  check_levers(cfg, plan['levers'])
  if args.print_config:
    return plan
  plan['data'], num_clients = checked_data(args.data, cfg)
  plan['dp'] = dp_plan(args, plan['methods'], num_clients, cfg.rounds)
  check_model(cfg)
  if args.dry_run:
    return plan
  if args.export_peft:
    plan['export_peft'] = cli.probe_writable_dir(args.export_peft, '--export-peft')
  cli.check_outputs(plan, f'feddpa-{cfg.name}')  # --out is created last
  return plan


def resume(path: str, *, quiet: bool = False, json: str | None = None) -> tuple[dict, int]:
  """Continues the FedDPA run in ``path`` (``--resume path``) from Python; returns ``(results, exit status)``.

  Raises:
    UserError: what the command line reports as ``error: ...`` (nothing is written then).
  """
  argv = ['--resume', path] + (['--quiet'] if quiet else []) + (['--json', json] if json else [])
  return cli.run_plan(argv, parser=build_parser(), make_plan=make_plan,
                      run_module='fedjax_adapters.experiments.feddpa_run')


def main(argv: typing.Sequence[str] | None = None) -> dict:
  """Parses ``argv``, trains and evaluates every (method, seed), returns the results (exit statuses: ``cli.runner_main``)."""
  return cli.run_cli(lambda a: cli.runner_main(a, parser=build_parser(), make_plan=make_plan,
                                               settings=lambda plan: plan['cfg'],
                                               run_module='fedjax_adapters.experiments.feddpa_run'), argv)


if __name__ == '__main__':
  main(sys.argv[1:])
