"""The run API (fedjax_adapters.experiment) on a model of one's own: exact resume after kill -9, the report, metric
writers (TensorBoard, W&B offline, MLflow's file store) and progress that tells the truth."""
import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import jax
import numpy as np
import pytest

import fedjax_adapters as fa
from fedjax_adapters.experiments import report
from fedjax_adapters.experiments.runlib.progress import Progress
import experiment_job
from run_helpers import kill_after_round, strip_wall_clock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 200


@pytest.fixture(scope='module')
def job():
  return experiment_job.job()


@pytest.fixture(scope='module')
def reference(job, tmp_path_factory):
  alg, train, test = job
  out = tmp_path_factory.mktemp('api') / 'reference'
  result = fa.experiment.run(alg, train, test, rounds=ROUNDS, out=str(out), compiled_loop=False,
                             **experiment_job.OPTIONS)
  return out, result


def _lines(out):
  return [strip_wall_clock(json.loads(x)) for x in (out / 'metrics.jsonl').read_text().splitlines()]


def _assert_same_state(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_custom_model_run_killed_with_sigkill_resumes_bit_identical_and_reports(job, reference, tmp_path):
  ref_dir, ref = reference
  assert ref.status == 'done' and sorted(ref.metrics) == [0, 1]
  out = tmp_path / 'run'
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tests', 'experiment_job.py'), str(out), str(ROUNDS),
                           'dispatch'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  saved = kill_after_round(proc, out, 'floral', 90)
  assert saved['status'] == 'running' and saved['units']['floral']['0']['status'] == 'running'
  alg, train, test = job
  with pytest.raises(fa.experiment.UserError, match='pass the same algorithm, train and test'):
    fa.experiment.resume(str(out))
  with pytest.raises(ValueError, match='was run with another test_data'):  # a UserError is a ValueError
    fa.experiment.resume(str(out), alg, train, train)
  result = fa.experiment.resume(str(out), alg, train, test)
  assert result.status == 'done' and result.metrics == ref.metrics
  got, want = (json.loads((d / 'results.json').read_text()) for d in (out, ref_dir))
  assert strip_wall_clock(got) == strip_wall_clock(want)
  assert _lines(out) == _lines(ref_dir) and len(_lines(out)) == 2 * ROUNDS
  for seed in (0, 1):
    _assert_same_state(result.states[seed], ref.states[seed])
  made = report.main([str(out), '--no-plots'])  # the report reads the API's run directory
  assert "| floral | " in made['table'] and 'two_layer: test loss (2 seeds)' in made['table']
  assert made['table'].split('| floral | ')[1].startswith(report.format_cell('test_loss', [
      want['units']['floral'][s]['test_loss'] for s in ('0', '1')]))


def test_compiled_rounds_equal_round_run_and_single_rounds_bit_for_bit(job):
  alg, train, test = job
  del test
  round_fn = fa.make_round(alg, clients_per_round=5)
  data = fa.client_data(train)
  start = alg.init(jax.random.key(3), 10)
  want, want_metrics = round_fn.run(start, data, 7)
  chunks = fa.experiment.CompiledRounds(round_fn, size=4)
  state, metrics = start, []
  for n in (3, 1, 3):  # any lengths up to the size, one compile
    state, m = chunks(state, data, n)
    metrics.append(m)
  _assert_same_state(state, want)
  for key, value in want_metrics.items():
    np.testing.assert_array_equal(np.concatenate([m[key] for m in metrics]), np.asarray(value))
  single = start
  for _ in range(7):
    single, _ = round_fn(single, data)
  _assert_same_state(single, want)
  assert chunks._loop._cache_size() == 1  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r'n must lie in \[1, 4\]'):
    chunks(state, data, 5)


def test_api_errors_are_exceptions_naming_the_value(job, reference, tmp_path):
  alg, train, test = job
  ref_dir, _ = reference
  with pytest.raises(fa.experiment.UserError, match='already holds a run; continue it with --resume'):
    fa.experiment.run(alg, train, test, rounds=5, out=str(ref_dir))
  for kwargs, words in [({'rounds': -1}, 'rounds must be an integer in'), ({'rounds': 5, 'eval_every': 0},
                                                                           'eval_every must be an integer >= 1, got 0'),
                        ({'rounds': 5, 'seeds': [1, 1]}, 'seeds must be distinct'),
                        ({'rounds': 5, 'writers': ['comet']}, "unknown writer 'comet'")]:
    with pytest.raises(ValueError, match=words):
      fa.experiment.run(alg, train, test, out=str(tmp_path / 'x'), quiet=True, **kwargs)
  with pytest.raises(fa.experiment.UserError, match='not a run directory'):
    fa.experiment.resume(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# Metric writers, each with its real package writing locally
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tracked(job, tmp_path_factory):
  alg, train, test = job
  out = tmp_path_factory.mktemp('writers') / 'run'
  os.environ.setdefault('WANDB_SILENT', 'true')
  fa.experiment.run(alg, train, test, rounds=6, out=str(out), name='tracked', seeds=[0], eval_every=3, quiet=True,
                    writers=['tensorboard', 'wandb', 'mlflow'])
  lines = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  return out, lines


def test_tensorboard_event_file_is_read_back_by_tensorboard(tracked):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # pylint: disable=g-import-not-at-top
  out, lines = tracked
  events = EventAccumulator(str(out / 'tensorboard' / 'floral' / 'seed0'))
  events.Reload()
  assert set(events.Tags()['scalars']) == {'train/loss', 'train/clients', 'train/rejected', 'test/test_loss'}
  loss = events.Scalars('train/loss')
  assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([e.value for e in loss], [r['train_loss'] for r in lines], rtol=1e-6)
  test = events.Scalars('test/test_loss')
  assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in test] == [
      (r['round'], r['eval']['test']['test_loss']) for r in lines if 'eval' in r]


def test_wandb_writes_an_offline_run_directory(tracked):
  out, _ = tracked
  runs = [d for d in os.listdir(out / 'wandb') if d.startswith('offline-run-')]
  assert len(runs) == 1, os.listdir(out / 'wandb')
  files = os.listdir(out / 'wandb' / runs[0])
  assert any(f.endswith('.wandb') and os.path.getsize(out / 'wandb' / runs[0] / f) > 0 for f in files), files


def test_mlflow_file_store_holds_every_round(tracked):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  out, lines = tracked
  client = MlflowClient(tracking_uri='file://' + str(out / 'mlruns'))
  experiment = client.get_experiment_by_name('tracked')
  (run,) = client.search_runs([experiment.experiment_id])
  assert run.info.run_name == 'floral-seed0' and run.info.status == 'FINISHED'
  history = client.get_metric_history(run.info.run_id, 'train/loss')
  assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([m.value for m in history], [r['train_loss'] for r in lines], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------------------------------


def _read_all(fd: int) -> str:
  """Everything written to a pty whose other end is closed (one read may return only part of it)."""
  chunks = []
  while True:
    try:
      chunk = os.read(fd, 65536)
    except OSError:   # EIO: the other end is closed and the buffer is drained
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(fd)
  return b''.join(chunks).decode()


def test_a_terminal_without_width_gets_plain_lines():
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 0, 0, 0))  # 24 rows, 0 columns
  with os.fdopen(follower, 'w') as stream:
    progress = Progress(stream=stream)
    assert stream.isatty() and progress.columns == 0 and not progress.live
    bar = progress.bar('m seed 0', 10)
    for r in range(1, 11):
      bar.update(r, {'loss': '1'})
    bar.close()
  text = _read_all(leader)
  assert 'm seed 0: round 10/10 (100 %)' in text and '\r' not in text.replace('\r\n', '\n')
  live = io.StringIO()
  bar = Progress(stream=live, columns=60).bar('m seed 0', 10)
  bar.update(5, seconds=1.0, warm=False)
  assert live.getvalue().startswith('\rm seed 0: round 5/10') and len(live.getvalue()) == 60


def test_rate_and_eta_come_from_warm_steps_and_compile_time_is_shown_apart():
  stream = io.StringIO()
  bar = Progress(stream=stream).bar('u', 100)
  bar.update(5, seconds=8.0, warm=False)  # the first chunk: compile + 5 rounds
  assert bar.rate() is None and 'ETA ?' in bar.line() and 'compile 8.0 s' in bar.line()
  bar.update(10, seconds=0.5, warm=True)  # 5 rounds in 0.5 s once compiled
  assert bar.rate() == pytest.approx(10.0)
  assert 'ETA 0:09' in bar.line() and '10.0 rounds/s' in bar.line() and 'compile 8.0 s' in bar.line()
