"""The FedDPA runner's user-level DP (``--dp-*``): what is noised (the global LoRA only), epsilon per round, bad flags
before any training, and a DP run interrupted and resumed equal to an uninterrupted one."""
import functools
import json
import os
import signal

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_adapters import checkpoint
from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.data.federated import FederatedData
from fedjax_adapters.experiments import feddpa as exp
from fedjax_adapters.experiments import feddpa_run, report
from fedjax_adapters.experiments.configs.feddpa import CONFIGS
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.federated import client_data, make_round
from fedjax_adapters.federated.privacy import DPState
from fedjax_adapters.models import llama
import cli_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, '..', 'shared', 'data', 'feddpa', 'dataset1')   # as in test_experiments_feddpa.py
K = 4


# ---------------------------------------------------------------------------------------------------------------------
# The runner's algorithms, one round with DP on and off (a 64-token LLaMA on random tokens: cheap to compile)
# ---------------------------------------------------------------------------------------------------------------------


def small_base():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  return llama.Llama(config, rngs=nnx.Rngs(0))


def token_data():
  """K clients x 4 rows x 12 tokens, the second half of every row a response (loss) token; client 1 has 2 rows."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, size=(K, 4, 12)).astype(np.int32)
  counts = np.array([4, 2, 4, 4], np.int32)
  rows = (np.arange(4)[None, :] < counts[:, None])[..., None]
  loss = np.broadcast_to((np.arange(12) >= 6), ids.shape) & rows
  x = {'input_ids': ids * rows, 'attention_mask': np.broadcast_to(rows, ids.shape).astype(np.int32),
       'loss_mask': loss.astype(np.int32)}
  return client_data(FederatedData(x, np.zeros((K, 4), np.int32), counts))


CFG = CONFIGS['smoke'].replace(rank=2, num_epochs=1, batch_size=2, dropout=0.0, lr=1e-2)


def dp_record(clip, z):
  return dict(clip=clip, noise_multiplier=z, delta=1e-3, sampling='fixed', adaptive_quantile=None, num_clients=K,
              clients_per_round=K, target_epsilon=None)


def algorithms(method, base):
  """The runner's plain algorithm, its DP one (clip 0.01, z 2) and a DP one without noise and a huge clip."""
  plain = feddpa_run.build_algorithm(method, CFG, base)
  return (plain, feddpa_run.private(plain, dp_record(0.01, 2.0)), feddpa_run.private(plain, dp_record(1e9, 0.0)))


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def feddpa_t_rounds():
  """FedDPA-T after one plain round (so its local LoRA trains in the next), then one more round by each algorithm."""
  data = token_data()
  algs = algorithms('feddpa_t', small_base())
  rounds = [make_round(a, clients_per_round=K) for a in algs]
  start, _ = rounds[0](algs[0].init(jax.random.key(0), K), data)
  after = []
  for alg, round_fn in zip(algs, rounds):
    state = start._replace(agg_state=alg.aggregator.init(start.global_params))
    after.append(round_fn(state, data)[0])
  return start, after


def test_dp_noises_the_global_lora_and_leaves_the_local_lora_bit_identical(feddpa_t_rounds):
  start, (plain, private, _) = feddpa_t_rounds
  for a, b, s in zip(leaves(plain.clients['local']), leaves(private.clients['local']), leaves(start.clients['local'])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, s) for a, s in zip(leaves(plain.clients['local']), leaves(start.clients['local'])))
  assert not any(np.array_equal(a, b) for a, b in zip(leaves(plain.global_params), leaves(private.global_params)))


def test_no_noise_and_a_huge_clip_give_the_plain_round(feddpa_t_rounds):
  _, (plain, _, free) = feddpa_t_rounds
  for a, b in zip(leaves(plain.global_params), leaves(free.global_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_global_step_carries_noise_of_std_z_clip_over_the_cohort(feddpa_t_rounds):
  """The DP round's step is ``(sum_k clip(u_k) + N(0, (z C)^2)) / n`` with the runner's ``n`` = every client (K): at
  clip 0.01 the clipped sum is at most K * 0.01 in norm over 112 LoRA coordinates, so the step's spread is the
  noise's, z C / K = 0.005 (the mechanism itself is checked against its formula in test_privacy.py)."""
  start, (_, private, _) = feddpa_t_rounds
  step = np.concatenate([(b - a).ravel() for a, b in zip(leaves(start.global_params), leaves(private.global_params))])
  assert step.size == 112
  assert abs(np.std(step) / (2.0 * 0.01 / K) - 1) < 0.2


def test_local_sends_nothing_so_dp_leaves_it_unchanged_with_epsilon_zero():
  plain = feddpa_run.build_algorithm('local', CFG, small_base())
  dp = dp_record(1.0, 1.0)
  assert feddpa_run.private(plain, dp) is plain
  assert feddpa_run.round_epsilon(plain, dp)(5) == 0.0


def test_feddpa_f_personalization_is_bit_identical_with_dp_on_and_off():
  data = token_data()
  plain, private, _ = algorithms('feddpa_f', small_base())
  state = plain.init(jax.random.key(1), K)
  a = F.personalize(plain, state, data)
  b = F.personalize(private, state, data)
  for x, y, s in zip(leaves(a.clients['local']), leaves(b.clients['local']), leaves(state.clients['local'])):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, s) for x, s in zip(leaves(a.clients['local']), leaves(state.clients['local'])))


# ---------------------------------------------------------------------------------------------------------------------
# The command line: bad flags, and a DP run interrupted and resumed
# ---------------------------------------------------------------------------------------------------------------------


def _one_line_error(capsys, argv):
  return cli_testing.one_line_error(capsys, exp.main, argv)


@pytest.mark.parametrize('flags, words', [
    (['--dp-clip', '0', '--dp-epsilon', '3'], '--dp-clip: must be finite and > 0, got 0'),
    (['--dp-clip', '1', '--dp-noise-multiplier', '-1'], '--dp-noise-multiplier: must be finite and >= 0, got -1'),
    (['--dp-clip', '1', '--dp-epsilon', '3', '--dp-delta', '1'], '--dp-delta: must lie in (0, 1), got 1'),
    (['--dp-clip', '1', '--dp-epsilon', '1e9'], 'dp epsilon 1000000000.0 is reached with less noise'),
    (['--dp-clip', '1'], '--dp-clip needs --dp-noise-multiplier or --dp-epsilon'),
    (['--dp-epsilon', '3'], '--dp-epsilon needs --dp-clip'),
    (['--dp-clip', '1', '--dp-epsilon', '3', '--methods', 'fedit', 'centralized'],
     'centralized pools every client\'s data on one machine'),
    (['--dp-clip', '1', '--dp-epsilon', '3', '--methods', 'local'], 'sends nothing to the server'),
    (['--dp-clip', '1', '--dp-epsilon', '3', '--rounds', '0'], 'rounds must be >= 1 to calibrate noise'),
])
def test_bad_dp_flags_are_one_line_errors_before_any_training(capsys, tmp_path, flags, words):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(out)] + flags)
  assert words in err
  assert not out.exists()


ARGS = ['--preset', 'smoke', '--methods', 'fedit', '--num-beams', '1', '--max-new-tokens', '1', '--bootstrap-samples',
        '20', '--quiet', '--dp-clip', '0.5', '--dp-epsilon', '8', '--dp-delta', '1e-3']


@pytest.fixture(scope='module')
def shared():
  """The runs below share the tiny base (a random LLaMA and SmolLM2's tokenizer, ~10 s to load) and, as they have the
  same settings, the compiled round: the first run compiles it, the resumed run and the reference reuse it."""
  rounds = {}

  def make_round_once(alg, **kwargs):
    key = (alg.name, kwargs['clients_per_round'])
    if key not in rounds:
      rounds[key] = make_round(alg, **kwargs)
    return rounds[key]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(feddpa_run, 'load_base', functools.cache(feddpa_run.load_base))
    mp.setattr(feddpa_run, 'make_round', make_round_once)
    yield


def _interrupted_after_round_one(out):
  """Starts the DP run in ``out`` and stops it with a SIGINT as fedit's first round ends (the loop checkpoints)."""
  make_unit = feddpa_run.make_unit

  def make_unit_then_signal(ctx, method, seed):
    unit, finisher = make_unit(ctx, method, seed)
    step = unit.step

    def step_then_signal(state, n):
      state, summaries = step(state, n)
      if int(state.round) == 1:
        os.kill(os.getpid(), signal.SIGINT)
      return state, summaries

    unit.step = step_then_signal
    return unit, finisher

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(feddpa_run, 'make_unit', make_unit_then_signal)
    with pytest.raises(SystemExit) as e:
      exp.main(['--data', DATA, '--out', str(out)] + ARGS)
  assert e.value.code == 128 + signal.SIGINT


@pytest.fixture(scope='module')
def resumed(tmp_path_factory, shared):
  """A DP run interrupted after round 1, its results.json then, and the run resumed to the end."""
  del shared
  out = tmp_path_factory.mktemp('dp') / 'run'
  _interrupted_after_round_one(out)
  saved = json.loads((out / 'results.json').read_text())
  exp.main(['--resume', str(out), '--quiet'])
  return out, saved


def _lines(out):
  return [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]


def test_dp_run_interrupted_and_resumed_equals_the_uninterrupted_one(resumed):
  """Same epsilon per round, same losses, same final adapters and optimizer state, bit for bit, as the two rounds
  run without a stop (the runner's own unit, stepped twice)."""
  out, saved = resumed
  unit_then = saved['units']['fedit']['0']
  assert saved['status'] == 'interrupted' and (unit_then['status'], unit_then['round']) == ('interrupted', 1)
  argv = ['--data', DATA, '--out', str(out.parent / 'unused')] + ARGS
  plan = exp.make_plan(exp.build_parser().parse_args(argv))
  ctx = feddpa_run.load_context(plan, Progress(quiet=True))
  unit, _ = feddpa_run.make_unit(ctx, 'fedit', 0)
  state, summaries = unit.step(unit.init(), 2)
  lines = _lines(out)
  assert [(x['round'], x['dp_epsilon'], x['train_loss']) for x in lines] == \
      [(r + 1, x['dp_epsilon'], x['train_loss']) for r, x in enumerate(summaries)]
  with checkpoint.Manager(out / 'checkpoints' / 'fedit' / 'seed0') as ckpts:
    assert ckpts.latest_step() == 2
    restored = ckpts.restore(2, like=unit.init())
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert isinstance(state.agg_state, DPState)   # the noised aggregator's state (its clip) is checkpointed too


def test_epsilon_per_round_is_dp_accountings_and_the_report_shows_it(resumed):
  out, _ = resumed
  doc = json.loads((out / 'results.json').read_text())
  dp = doc['dp']
  assert (dp['num_clients'], dp['clients_per_round'], dp['delta'], dp['rounds']) == (8, 8, 1e-3, 2)
  z = dp['noise_multiplier']
  for line in _lines(out):
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(8, 8, dp_accounting.GaussianDpEvent(z / 2)),
                line['round'])
    assert line['dp_epsilon'] == acc.get_epsilon(1e-3)
  assert doc['methods']['fedit']['dp_epsilon'] == dp['epsilon'] == pytest.approx(8, rel=1e-6)
  assert json.loads((out / 'config.json').read_text())['plan']['dp']['noise_multiplier'] == z
  assert 'epsilon after 2 rounds: fedit 8.' in report.summary([doc])


def test_dp_flags_cannot_change_on_resume_and_a_stored_plan_is_rechecked(capsys, resumed):
  out, _ = resumed
  err = _one_line_error(capsys, ['--resume', str(out), '--dp-epsilon', '3'])
  assert 'drop --dp-epsilon' in err
  where = 'run/config.json'
  plan = json.loads((out / 'config.json').read_text())['plan']['dp']
  with pytest.raises(exp.UserError, match='plan.dp was planned for 8 clients .* but the data has 6'):
    exp.checked_dp_record(plan, ['fedit'], 6, where)
  with pytest.raises(exp.UserError, match=r'plan.dp: dp delta must lie in \(0, 1\); got 2'):
    exp.checked_dp_record({**plan, 'delta': 2}, ['fedit'], 8, where)
  with pytest.raises(exp.UserError, match='plan.dp: dp clip must be a finite number > 0; got -1'):
    exp.checked_dp_record({**plan, 'clip': -1}, ['fedit'], 8, where)
  with pytest.raises(exp.UserError, match='plan.dp must be an object with the keys'):
    exp.checked_dp_record({'clip': 1.0}, ['fedit'], 8, where)
  with pytest.raises(exp.UserError, match='centralized pools'):
    exp.checked_dp_record(plan, ['fedit', 'centralized'], 8, where)
  assert exp.checked_dp_record(plan, ['fedit', 'local'], 8, where) == plan
