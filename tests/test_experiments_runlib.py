"""The runners' shared infrastructure (experiments/runlib): CLI checks, strict JSON, run directory, progress, loop."""
import argparse
import dataclasses
import io
import json
import os
import shutil
import signal
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_adapters.experiments.runlib import cli, loop, rundir, strict_json
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import RunDir
from fedjax_adapters import checkpoint
from fedjax_adapters.federated import REJECT_REASONS

# ----------------------------------------------------------------------------------------------------------------------
# CLI helpers
# ----------------------------------------------------------------------------------------------------------------------


def test_parse_seeds_count_list_and_ranges():
  assert cli.parse_seeds(['3']) == [0, 1, 2]
  assert cli.parse_seeds(['0', '2', '5']) == [0, 2, 5]
  assert cli.parse_seeds(['3:4']) == [3]
  assert cli.parse_seeds(['4:6', '9']) == [4, 5, 9]
  for bad, words in [(['0'], 'must be >= 1'), (['-1'], 'must be >= 0'), (['1', '1'], 'twice'), (['a'], "'a'"),
                     (['5:5'], 'selects no seed')]:
    with pytest.raises(cli.UserError, match=words):
      cli.parse_seeds(bad)


def test_argument_types_reject_out_of_range_values():
  assert cli.int_at_least(1)('3') == 3 and cli.fraction('1') == 1.0 and cli.nonnegative_float('0') == 0.0
  for parse, text in [(cli.int_at_least(1), '0'), (cli.int_at_least(0), '1.5'), (cli.positive_float, 'nan'),
                      (cli.positive_float, '-inf'), (cli.positive_float, '0'), (cli.fraction, '0'),
                      (cli.nonnegative_float, '-0.1')]:
    with pytest.raises(argparse.ArgumentTypeError):
      parse(text)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  lr: float = 0.1
  rounds: int = 5
  floor: float | None = 0.01
  rank: int | float = 0.01
  precondition: bool = True
  name: str = 'x'


def test_overrides_are_typed_by_the_dataclass():
  cfg = cli.apply_overrides(_Cfg(), ['lr=0.5', 'rounds=7', 'floor=none', 'rank=8', 'precondition=off', 'name=y'])
  assert cfg == _Cfg(0.5, 7, None, 8, False, 'y') and isinstance(cfg.rank, int)
  assert cli.apply_overrides(_Cfg(), ['rank=0.1']).rank == 0.1
  assert cli.apply_overrides(_Cfg(), {'lr': 1, 'floor': None}) == _Cfg(lr=1.0, floor=None)
  for bad, words in [(['lr'], 'expected key=value'), (['lr=x'], 'expected a number'), (['rounds=1.5'], 'integer'),
                     (['precondition=maybe'], 'true or false'), (['nope=1'], 'unknown setting'),
                     ({'rounds': 2.5}, 'integer'), ({'name': 3}, 'string')]:
    with pytest.raises(cli.UserError, match=words):
      cli.apply_overrides(_Cfg(), bad)


def test_parser_and_run_cli_report_one_line_and_status_2(capsys):
  p = cli.Parser(prog='x')
  p.add_argument('--n', type=cli.int_at_least(1))
  with pytest.raises(SystemExit) as e:
    p.parse_args(['--n', '0'])
  assert e.value.code == 2 and capsys.readouterr().err == 'error: argument --n: must be >= 1, got 0\n'

  def main(argv):
    raise cli.UserError(f'bad {argv}')

  with pytest.raises(SystemExit) as e:
    cli.run_cli(main, ['a'])
  assert e.value.code == 2 and capsys.readouterr().err == "error: bad ['a']\n"


def test_path_probes(tmp_path):
  assert cli.probe_writable_dir(str(tmp_path / 'a' / 'b'), '--out') == str(tmp_path / 'a' / 'b')
  assert list((tmp_path / 'a' / 'b').iterdir()) == []  # the probe file is gone
  (tmp_path / 'f').write_text('')
  with pytest.raises(cli.UserError, match='--out .* is not writable'):
    cli.probe_writable_dir(str(tmp_path / 'f' / 'x'), '--out')
  with pytest.raises(cli.UserError, match='is a directory'):
    cli.probe_writable_file(str(tmp_path), '--json')
  with pytest.raises(cli.UserError, match='no such directory'):
    cli.existing_dir(str(tmp_path / 'missing'), '--data-dir')



def test_runner_command_line_helpers(tmp_path):
  assert cli.check_methods(('a', 'c'), ('a', 'b', 'c')) == ['a', 'c']
  with pytest.raises(cli.UserError, match='unknown method.s. x; valid methods: a, b'):
    cli.check_methods(['x'], ('a', 'b'))
  with pytest.raises(cli.UserError, match='lists a method twice: a a'):
    cli.check_methods(['a', 'a'], ('a', 'b'))
  parser = cli.Parser()
  parser.add_argument('--resume')
  parser.add_argument('--quiet', action='store_true')
  parser.add_argument('--rounds', type=int, default=None)
  RunDir.create(str(tmp_path / 'run'), {'runner': 'one', 'plan': {}, 'settings': {}})
  path, config = cli.resumed_run(parser.parse_args(['--resume', str(tmp_path / 'run'), '--quiet']), parser, 'one',
                                 'One')
  assert path == str(tmp_path / 'run') and config['runner'] == 'one'
  with pytest.raises(cli.UserError, match='drop --rounds'):
    cli.resumed_run(parser.parse_args(['--resume', str(tmp_path / 'run'), '--rounds', '3']), parser, 'one', 'One')
  with pytest.raises(cli.UserError, match="holds a 'one' run, not a Two run"):
    cli.resumed_run(parser.parse_args(['--resume', str(tmp_path / 'run')]), parser, 'two', 'Two')

# ----------------------------------------------------------------------------------------------------------------------
# Strict JSON and the run directory
# ----------------------------------------------------------------------------------------------------------------------


def test_strict_json_turns_nonfinite_numbers_into_null_with_a_reason(tmp_path):
  doc = {'a': [1.0, float('nan')], 'b': {'c': np.float32(np.inf)}, 'd': np.arange(3), 'e': (jnp.float32(2.5), None),
         'f': -float('inf'), 'g': np.int64(4), 'h': True}
  text = strict_json.dumps(doc)
  back = json.loads(text, parse_constant=lambda name: pytest.fail(f'bare {name}'))
  assert back['a'] == [1.0, None] and back['b'] == {'c': None} and back['d'] == [0, 1, 2] and back['e'] == [2.5, None]
  assert back['g'] == 4 and back['h'] is True and back['f'] is None
  assert back['null_reasons'] == {'a[1]': 'NaN', 'b.c': 'Infinity', 'f': '-Infinity'}
  with pytest.raises(ValueError, match='NaN'):
    strict_json.loads('{"x": NaN}')
  strict_json.write(tmp_path / 'x.json', doc)
  assert strict_json.read(tmp_path / 'x.json') == back
  with pytest.raises(TypeError, match='object at b'):
    strict_json.dumps({'b': object()})


def test_run_dir_refuses_a_second_run_and_survives_a_cut_last_line(tmp_path):
  run = RunDir.create(str(tmp_path / 'r'), {'runner': 't'})
  with pytest.raises(cli.UserError, match='already holds a run; continue it with --resume'):
    RunDir.create(str(tmp_path / 'r'), {})
  with pytest.raises(cli.UserError, match='not a run directory'):
    RunDir.open(str(tmp_path))
  for i in range(3):
    run.append({'method': 'm', 'seed': 0, 'round': i + 1, 'x': float('nan') if i == 1 else i})
  run.close()
  with open(run.file('metrics.jsonl'), 'a') as f:
    f.write('{"method": "m", "se')  # a kill -9 in the middle of a line
  records = list(RunDir.open(run.path).records())
  assert [r['round'] for r in records] == [1, 2, 3] and records[1]['x'] is None
  run.keep_records(lambda r: r['round'] <= 2)
  assert [r['round'] for r in run.records()] == [1, 2]
  assert run.config == {'runner': 't', 'fingerprint': rundir.fingerprint({'runner': 't'})}


def test_progress_prints_plain_lines_when_not_a_terminal():
  stream = io.StringIO()
  progress = Progress(stream=stream)
  bar = progress.bar('m seed 0', 20, 0)
  for r in range(1, 21):
    bar.update(r, {'loss': f'{1 / r:.3g}'}, force_line=r == 5)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert [line.split('round ')[1].split('/')[0] for line in lines] == ['2', '4', '5', '6', '8', '10', '12', '14', '16',
                                                                        '18', '20']
  assert lines[-1].startswith('m seed 0: round 20/20 (100 %), ') and 'rounds/s, ETA' in lines[-1]
  assert lines[-1].endswith('loss 0.05')
  quiet = io.StringIO()
  q = Progress(quiet=True, stream=quiet)
  q.bar('x', 2).update(2)
  q.print('hidden')
  q.always('shown')
  assert quiet.getvalue() == 'shown\n'


# ----------------------------------------------------------------------------------------------------------------------
# The loop, on a toy state (cheap to compile)
# ----------------------------------------------------------------------------------------------------------------------


class _State(NamedTuple):
  global_params: jax.Array
  clients: jax.Array
  round: jax.Array
  key: jax.Array


@jax.jit
def _toy_round(state, blow_up):
  noise = jax.random.normal(jax.random.fold_in(state.key, state.round), (3,))
  g = state.global_params * 0.9 + noise + jnp.where(state.round >= blow_up, jnp.nan, 0.0)
  return state._replace(global_params=g, clients=state.clients + noise[0], round=state.round + 1)


def _toy_unit(blow_up=10**9, rejected=0, record=None):
  def step(state, n):
    out = []
    for _ in range(n):
      state = _toy_round(state, blow_up)
      if record is not None:
        record.append(int(state.round))
      out.append({'train_loss': float(jnp.sum(state.global_params ** 2)), 'clients': 2,
                  'rejected': rejected, **({'reject_reasons': {'nonfinite_update': rejected}} if rejected else {})})
    return state, out

  return loop.Unit('toy', 3, init=lambda: _State(jnp.zeros(3), jnp.zeros(2), jnp.int32(0), jax.random.key(7)),
                   step=step, evaluate=lambda s: {'test': {'g0': float(s.global_params[0])}})


class _StopAfter(loop.StopRequest):
  """Behaves as if SIGTERM arrived once ``rounds`` rounds had run."""

  def __init__(self, record, rounds):
    super().__init__()
    self.record, self.rounds = record, rounds

  @property
  def requested(self):
    return bool(self.record) and self.record[-1] >= self.rounds


def _lines(run):
  return [{k: v for k, v in r.items() if k != 'wall_s'} for r in run.records()]


@pytest.mark.parametrize('chunk', [False, True])
def test_interrupted_unit_resumes_bit_for_bit(tmp_path, chunk):
  schedule = loop.Schedule(rounds=23, eval_every=5, checkpoint_every=4, keep=2, chunk=chunk)
  quiet = Progress(quiet=True)
  ref_run = RunDir.create(str(tmp_path / 'ref'), {})
  ref = loop.train_unit(_toy_unit(), ref_run, schedule, progress=quiet, stop=loop.StopRequest())
  assert ref.status == 'done' and ref.round == 23
  assert [r for r, _ in ref.curve] == [5, 10, 15, 20, 23]
  lines = _lines(ref_run)
  assert [r['round'] for r in lines] == list(range(1, 24))
  assert [r['round'] for r in lines if 'eval' in r] == [5, 10, 15, 20, 23]
  ckpts = checkpoint.Manager(ref_run.checkpoint_dir('toy', 3))
  assert ckpts.all_steps() == [20, 23]  # keep=2, and the last round always

  run = RunDir.create(str(tmp_path / 'cut'), {})
  record = []
  cut = loop.train_unit(_toy_unit(record=record), run, schedule, progress=quiet, stop=_StopAfter(record, 11))
  assert cut.status == 'interrupted' and cut.round == (12 if chunk else 11)  # chunks end at 4, 5, 8, 10, 12, ...
  assert checkpoint.Manager(run.checkpoint_dir('toy', 3)).latest_step() == cut.round
  record.clear()
  done = loop.train_unit(_toy_unit(record=record), RunDir.open(run.path), schedule, progress=quiet,
                         stop=loop.StopRequest())
  assert record[0] == cut.round + 1  # continued, not restarted
  assert done.status == 'done' and done.curve == ref.curve and done.evaluation == ref.evaluation
  assert _lines(run) == lines
  for a, b in zip(jax.tree.leaves(jax.random.key_data(done.state.key)), jax.tree.leaves(
      jax.random.key_data(ref.state.key))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(done.state[:3], ref.state[:3]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_killed_unit_resumes_from_its_last_checkpoint_and_drops_later_lines(tmp_path):
  schedule = loop.Schedule(rounds=12, eval_every=3, checkpoint_every=5)
  quiet = Progress(quiet=True)
  ref = loop.train_unit(_toy_unit(), RunDir.create(str(tmp_path / 'ref'), {}), schedule, progress=quiet,
                        stop=loop.StopRequest())
  run = RunDir.create(str(tmp_path / 'run'), {})
  record = []
  loop.train_unit(_toy_unit(record=record), run, schedule, progress=quiet, stop=_StopAfter(record, 7))
  # As if killed at round 7 before any checkpoint there: remove it, so the latest is round 5 with lines up to 7.
  shutil.rmtree(os.path.join(run.checkpoint_dir('toy', 3), '7'))
  assert [r['round'] for r in run.records()] == list(range(1, 8))
  done = loop.train_unit(_toy_unit(), RunDir.open(run.path), schedule, progress=quiet, stop=loop.StopRequest())
  assert done.curve == ref.curve and [r['round'] for r in run.records()] == list(range(1, 13))
  np.testing.assert_array_equal(done.state.global_params, ref.state.global_params)


def test_nonfinite_state_fails_the_unit_naming_method_seed_and_round(tmp_path):
  run = RunDir.create(str(tmp_path / 'r'), {})
  out = loop.train_unit(_toy_unit(blow_up=6), run, loop.Schedule(rounds=20, eval_every=4, checkpoint_every=100),
                        progress=Progress(quiet=True), stop=loop.StopRequest())
  assert out.status == 'failed' and out.round == 8
  assert out.error == 'toy seed 3 round 8: the state is not finite (global_params hold NaN or Inf); diverged'
  last = list(run.records())[-1]
  assert last['round'] == 8 and last['error'] == out.error and 'eval' not in last


def test_all_clients_rejected_for_n_rounds_fails_the_unit(tmp_path):
  run = RunDir.create(str(tmp_path / 'r'), {})
  out = loop.train_unit(_toy_unit(rejected=2), run, loop.Schedule(rounds=20, eval_every=100, checkpoint_every=100,
                                                                   max_rejected_rounds=3),
                        progress=Progress(quiet=True), stop=loop.StopRequest())
  assert out.status == 'failed' and out.round == 3
  assert 'toy seed 3 round 3: every sampled client was rejected for 3 consecutive rounds (nonfinite_update 2)' in \
      out.error
  # A run shorter than the limit fails when every one of its rounds rejected everyone.
  short = loop.train_unit(_toy_unit(rejected=2), RunDir.create(str(tmp_path / 's'), {}),
                          loop.Schedule(rounds=2, eval_every=1, checkpoint_every=1, max_rejected_rounds=5),
                          progress=Progress(quiet=True), stop=loop.StopRequest())
  assert short.status == 'failed' and short.round == 2


def test_schedule_stops_at_evaluations_checkpoints_and_the_end():
  s = loop.Schedule(rounds=23, eval_every=5, checkpoint_every=4)
  stops, done = [], 0
  while done < 23:
    done = s.next_stop(done)
    stops.append(done)
  assert stops == [4, 5, 8, 10, 12, 15, 16, 20, 23]


def test_round_summaries_count_only_accepted_clients():
  reason = {name: i for i, name in enumerate(REJECT_REASONS)}
  metrics = {'loss': np.array([[2.0, np.nan, 4.0, 9.0]]), 'count': np.array([[1.0, 1.0, 3.0, 1.0]]),
             'client_mask': np.array([[True, True, True, False]]), 'rejected': np.array([[False, True, False, False]]),
             'reject_reason': np.array([[0, reason['nonfinite_loss'], 0, 0]])}
  (s,) = loop.round_summaries(metrics, 1)
  assert s == {'train_loss': 6.0 / 4.0, 'clients': 3, 'rejected': 1, 'reject_reasons': {'nonfinite_loss': 1}}
  one = {k: v[0] for k, v in metrics.items()}  # a single round's metrics: [M]
  assert loop.round_summaries(one, 1) == [s]
  everyone = dict(metrics, rejected=np.array([[True, True, True, False]]))
  assert np.isnan(loop.round_summaries(everyone, 1)[0]['train_loss'])


def test_stop_request_catches_sigterm_and_restores_the_handler(capsys):
  before = signal.getsignal(signal.SIGTERM)
  with loop.StopRequest() as stop:
    signal.raise_signal(signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM
    deadline = time.monotonic() + 60
    while 'SIGTERM received' not in capsys.readouterr().err:  # said by the helper thread that reads the signals
      assert time.monotonic() < deadline
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGTERM) == before


def test_a_nonfinite_test_metric_fails_the_unit_even_when_the_state_is_finite(tmp_path):
  unit = dataclasses.replace(_toy_unit(), evaluate=lambda s: {'test': {'mse': float('inf') if s.round >= 4 else 1.0}})
  out = loop.train_unit(unit, RunDir.create(str(tmp_path / 'r'), {}),
                        loop.Schedule(rounds=10, eval_every=2, checkpoint_every=100), progress=Progress(quiet=True),
                        stop=loop.StopRequest())
  assert out.status == 'failed' and out.round == 4 and out.curve == [[2, {'mse': 1.0}]]
  assert out.error == 'toy seed 3 round 4: the test metrics are not finite (mse inf); diverged'
