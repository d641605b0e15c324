"""Runs that cannot clobber, mix or outlive a signal, and damaged run directories: the lock, unique names, --json and
--out refusals, re-validated resumes, bounded signal latency, damaged checkpoints, a full disk."""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fedjax_adapters as fa
from fedjax_adapters import checkpoint
from fedjax_adapters.experiments import floral
from fedjax_adapters.experiments.runlib import rundir
import experiment_job
from run_helpers import strip_wall_clock, wait_for_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = ['--task', 'synthetic_linear', '--methods', 'floral', '--rounds', '1000000', '--eval-every', '1000000',
        '--checkpoint-every', '1000000', '--quiet']


def _start(argv, **kwargs):
  return subprocess.Popen([sys.executable, '-m', 'fedjax_adapters.experiments.floral', *argv], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _error(capsys, argv, code=2) -> str:
  with pytest.raises(SystemExit) as e:
    floral.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == code and err.startswith('error: ') and err.count('\n') == 1, err
  return err


def _snapshot(path):
  """Every file under ``path`` (but the lock, which records its holder) with its content hash."""
  out = {}
  for folder, _, files in os.walk(path):
    for name in files:
      full = os.path.join(folder, name)
      if name != rundir.LOCK:
        with open(full, 'rb') as f:
          out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Processes: a second writer, SIGTERM mid-chunk, a second Ctrl-C
# ----------------------------------------------------------------------------------------------------------------------


def test_sigterm_mid_chunk_is_answered_within_seconds_and_a_second_writer_is_refused(capsys, tmp_path):
  out = tmp_path / 'run'
  proc = _start(LONG + ['--out', str(out)])  # one evaluation interval of a million rounds
  wait_for_round(proc, out, 'floral', 1)
  err = _error(capsys, ['--resume', str(out)])
  assert f'{out} is in use by process {proc.pid}' in err
  err = _error(capsys, LONG + ['--out', str(out)])
  assert 'already holds a run; continue it with --resume' in err
  time.sleep(1.0)  # well inside a sub-chunk
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  while json.loads((out / 'results.json').read_text())['status'] != 'interrupted':
    assert proc.poll() is None or proc.returncode == 128 + signal.SIGTERM, proc.communicate()
    time.sleep(0.02)
  answered = time.monotonic() - sent
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM and 'Traceback' not in stderr, stderr
  assert answered < 5.0, answered
  saved = json.loads((out / 'results.json').read_text())
  stopped = saved['units']['floral']['0']['round']
  assert 0 < stopped < 1000000 and saved['units']['floral']['0']['status'] == 'interrupted'
  with checkpoint.Manager(out / 'checkpoints' / 'floral' / 'seed0') as ckpts:
    assert ckpts.all_steps() == [stopped]  # saved where it stopped
  lines = (out / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(x)['round'] for x in lines] == list(range(1, stopped + 1))


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
  out = tmp_path / 'run'
  proc = _start(LONG + ['--out', str(out)])
  wait_for_round(proc, out, 'floral', 1)
  proc.send_signal(signal.SIGINT)
  first = ''
  while 'SIGINT received: stopping after the current chunk' not in first:  # the first one arrived
    first += proc.stderr.readline()
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  stderr = first + stderr
  assert proc.returncode == 128 + signal.SIGINT, stderr
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr and 'stopped at once' in stderr, stderr
  saved = json.loads((out / 'results.json').read_text())
  assert saved['status'] == 'interrupted' and saved['units']['floral']['0']['status'] == 'interrupted'


def test_default_run_names_differ_within_one_second():
  names = {rundir.default_path('synthetic_linear') for _ in range(20)}
  assert len(names) == 20
  assert all(re.fullmatch(r'runs/synthetic_linear-\d{8}-\d{6}-[0-9a-f]{6}', n) for n in names), names


# ----------------------------------------------------------------------------------------------------------------------
# --json and --out
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A small finished FLoRAL run (fedavg, 6 rounds, checkpoints at 3 and 6)."""
  out = tmp_path_factory.mktemp('safety') / 'run'
  floral.main(['--task', 'synthetic_linear', '--methods', 'fedavg', '--rounds', '6', '--eval-every', '3',
               '--checkpoint-every', '3', '--out', str(out), '--quiet'])
  return out


def test_json_inside_a_run_through_a_link_or_onto_a_device_is_refused(capsys, finished, tmp_path):
  out = tmp_path / 'new'
  for target, words in [(out / 'config.json', 'lies inside the run directory'),
                        (out / 'sub' / 'r.json', 'lies inside the run directory'),
                        (finished / 'metrics.jsonl', f'lies inside the run directory {finished}'),
                        ('/dev/null', 'exists and is not a regular file')]:
    err = _error(capsys, ['--task', 'synthetic_linear', '--out', str(out), '--json', str(target)])
    assert words in err, err
  link = tmp_path / 'link.json'
  os.symlink(tmp_path / 'elsewhere.json', link)
  err = _error(capsys, ['--task', 'synthetic_linear', '--out', str(out), '--json', str(link)])
  assert 'is a symbolic link' in err
  err = _error(capsys, ['--resume', str(finished), '--json', str(finished / 'results.json')])
  assert 'lies inside the run directory' in err
  assert not out.exists() and not (tmp_path / 'elsewhere.json').exists()


def test_out_holding_checkpoints_but_no_config_is_refused(capsys, finished, tmp_path):
  out = tmp_path / 'old'
  shutil.copytree(finished / 'checkpoints', out / 'checkpoints')
  before = _snapshot(out)
  err = _error(capsys, ['--task', 'synthetic_linear', '--methods', 'fedavg', '--out', str(out)])
  assert 'holds checkpoints/ of an earlier run but no config.json' in err
  assert _snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------------------
# --resume checks what it reads before writing anything
# ----------------------------------------------------------------------------------------------------------------------


def _crashed_copy(finished, tmp_path):
  """A copy of the finished run as a kill -9 right after its last checkpoint would leave it."""
  out = tmp_path / 'run'
  shutil.copytree(finished, out)
  results = json.loads((out / 'results.json').read_text())
  results['status'], results['units']['fedavg']['0'] = 'running', {'status': 'running'}
  (out / 'results.json').write_text(json.dumps(results))
  return out


def _edit_config(out, edit, refresh=True):
  config = json.loads((out / 'config.json').read_text())
  edit(config)
  if refresh:  # as if someone also recomputed the stored fingerprint
    config['fingerprint'] = rundir.fingerprint(config)
  (out / 'config.json').write_text(json.dumps(config))


@pytest.mark.parametrize('edit, refresh, words', [
    (lambda c: c['settings'].update(lr=0.5), False, 'config.json was edited after the run started'),
    (lambda c: c['settings'].update(rounds=2), False, 'config.json was edited after the run started'),
    (lambda c: c['settings'].update(lr=-1), True, 'config.json: lr must be finite and > 0; got -1'),
    (lambda c: c['settings'].update(rounds='abc'), True, "config.json: rounds='abc': expected an integer"),
    (lambda c: c['settings'].pop('lr'), True, 'config.json: settings lack lr'),
    (lambda c: c['settings'].update(rank=100000), True, "rank 100000 is larger than model 'linear' allows"),
    (lambda c: c['plan'].update(eval_every=0), True, 'config.json: plan.eval_every: must be >= 1, got 0'),
    (lambda c: c['plan'].update(seeds='0'), True, 'plan.seeds must be a nonempty list of int values'),
    (lambda c: c['plan'].update(methods=['fedprox']), True, 'unknown method(s) fedprox'),
    (lambda c: c.update(settings=dict(c['settings'], name='mnist_offline_label_shift', dataset='mnist_offline',
                                      model='mlp', loss='xent', metric='test_accuracy', shift='label_shift',
                                      num_clients=300, num_clusters=4, column='MNIST-LS 5%', train_arg='train')),
     True, 'was written under other settings than this run'),
])
def test_resume_revalidates_config_json_and_writes_nothing(capsys, finished, tmp_path, edit, refresh, words):
  out = _crashed_copy(finished, tmp_path)
  _edit_config(out, edit, refresh)
  before = _snapshot(out)
  err = _error(capsys, ['--resume', str(out)])
  assert words in err, err
  assert _snapshot(out) == before


def test_non_json_config_is_one_line(capsys, finished, tmp_path):
  out = _crashed_copy(finished, tmp_path)
  (out / 'config.json').write_text('{"runner": "floral", "settings": {"lr": NaN}}')
  err = _error(capsys, ['--resume', str(out)])
  assert 'config.json cannot be read: non-standard JSON constant NaN' in err


def _damage(step_dir, how):
  """Cuts every file of a checkpoint step in half, or removes its contents."""
  for folder, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(folder, name)
      if how == 'truncate':
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
  if how == 'empty':
    for entry in os.listdir(step_dir):
      full = os.path.join(step_dir, entry)
      shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def test_no_intact_checkpoint_is_one_line_and_leaves_the_run_as_it_was(capsys, finished, tmp_path):
  out = _crashed_copy(finished, tmp_path)
  _damage(out / 'checkpoints' / 'fedavg' / 'seed0' / '6', 'truncate')
  _damage(out / 'checkpoints' / 'fedavg' / 'seed0' / '3', 'empty')
  before = _snapshot(out)
  err = _error(capsys, ['--resume', str(out)])
  assert 'no intact checkpoint of fedavg seed 0' in err and 'every step is damaged: 6 (' in err and '), 3 (' in err
  assert 'the run directory was left as it is' in err
  assert _snapshot(out) == before


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  alg, train, test = experiment_job.job()
  out = tmp_path_factory.mktemp('damage') / 'reference'
  return out, fa.experiment.run(alg, train, test, rounds=40, out=str(out), **_DAMAGE_OPTIONS)


_DAMAGE_OPTIONS = dict(name='damaged', seeds=[0], clients_per_round=5, eval_every=10, checkpoint_every=5,
                       keep_checkpoints=3, quiet=True)


class _Crash:
  """A metric writer that fails at one round: the process dies there as after kill -9 (checkpoints at 20/25/30)."""

  def write(self, method, seed, round_, record):
    del method, seed, record
    if round_ == 32:
      raise RuntimeError('crash')

  def close(self):
    pass


@pytest.mark.parametrize('how', ['truncate', 'empty'])
def test_a_damaged_newest_step_falls_back_to_the_newest_intact_one_and_resumes_equal(capsys, tmp_path, uninterrupted,
                                                                                     how):
  ref_dir, ref = uninterrupted
  alg, train, test = experiment_job.job()
  out = tmp_path / 'run'
  with pytest.raises(RuntimeError, match='crash'):
    fa.experiment.run(alg, train, test, rounds=40, out=str(out), writers=[_Crash()], **_DAMAGE_OPTIONS)
  seed_dir = out / 'checkpoints' / 'floral' / 'seed0'
  assert sorted(int(s) for s in os.listdir(seed_dir)) == [20, 25, 30]
  _damage(seed_dir / '30', how)
  capsys.readouterr()
  result = fa.experiment.resume(str(out), alg, train, test, quiet=True)
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and err.startswith('warning: checkpoint step 30 of floral seed 0 is damaged ('), \
      err
  assert result.status == 'done' and result.metrics == ref.metrics
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(
      a.dtype, jax.dtypes.prng_key) else a), np.asarray(jax.random.key_data(b) if jax.dtypes.issubdtype(
          b.dtype, jax.dtypes.prng_key) else b)), result.states[0], ref.states[0])
  lines = [strip_wall_clock(json.loads(x)) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [strip_wall_clock(json.loads(x)) for x in (ref_dir / 'metrics.jsonl').read_text().splitlines()]
  assert os.listdir(str(seed_dir) + '.damaged')  # kept aside for inspection


# ----------------------------------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes(tmp_path):
  out = tmp_path / 'run'
  argv = ['--task', 'synthetic_linear', '--methods', 'fedavg', '--rounds', '300', '--eval-every', '50',
          '--checkpoint-every', '50', '--quiet', '--out', str(out)]
  limit = 24_000  # bytes per file: metrics.jsonl outgrows it after about a hundred rounds
  proc = _start(argv, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 1, stderr
  assert stderr == (f'error: cannot write {out}/metrics.jsonl: File too large (the disk is full or a file-size limit '
                    'was reached)\n'), stderr
  saved = json.loads((out / 'results.json').read_text())  # the old data is intact
  assert saved['units']['fedavg']['0']['status'] == 'running'
  with checkpoint.Manager(out / 'checkpoints' / 'fedavg' / 'seed0') as ckpts:
    last = ckpts.latest_step()
  assert last is not None and last % 50 == 0
  assert os.path.getsize(out / 'metrics.jsonl') <= limit
  result = floral.main(['--resume', str(out), '--quiet'])
  assert result['status'] == 'done'
  rounds = [json.loads(x)['round'] for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert rounds == list(range(1, 301))
  reference = floral.main(argv[:-1] + [str(tmp_path / 'reference')])
  assert strip_wall_clock(result['units']) == strip_wall_clock(reference['units'])
