"""Resuming `python -m fedjax_adapters.experiments.floral`: a run killed (SIGKILL) or stopped (SIGTERM) mid-method and resumed
ends with the same results, metrics and final states, bit for bit, as a run that was never interrupted."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_adapters.experiments import floral, floral_tasks
from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters import checkpoint
from run_helpers import kill_after_round, strip_wall_clock, wait_for_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('fedavg', 'floral')
ARGS = ['--task', 'synthetic_linear', '--methods', *METHODS, '--rounds', '60', '--eval-every', '10',
        '--checkpoint-every', '7', '--quiet']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  out = tmp_path_factory.mktemp('resume') / 'reference'
  floral.main(ARGS + ['--out', str(out)])
  return out


def _start(out):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, '-m', 'fedjax_adapters.experiments.floral', *ARGS, '--out', str(out)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final_state(out, method):
  task = configs.TASKS['synthetic_linear']
  data = floral_tasks.load_data(task, 0)
  like = floral_tasks.build_algorithm(method, task, data).init(jax.random.key(0), data.train.num_clients)
  with checkpoint.Manager(out / 'checkpoints' / method / 'seed0') as ckpts:
    assert ckpts.latest_step() == 60
    return ckpts.restore(60, like=like)


def _assert_same_run(out, reference):
  got, want = (json.loads((d / 'results.json').read_text()) for d in (out, reference))
  assert got['status'] == 'done' and strip_wall_clock(got) == strip_wall_clock(want)
  lines = [strip_wall_clock(json.loads(x)) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [strip_wall_clock(json.loads(x)) for x in (reference / 'metrics.jsonl').read_text().splitlines()]
  assert len(lines) == 60 * len(METHODS)
  for method in METHODS:
    a, b = _final_state(out, method), _final_state(reference, method)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x, y = jax.random.key_data(x), jax.random.key_data(y)
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_mid_method_then_resume_is_bit_identical(tmp_path, reference):
  out = tmp_path / 'run'
  proc = _start(out)
  saved = kill_after_round(proc, out, 'floral', 25)
  assert saved['units']['fedavg']['0']['status'] == 'done' and saved['units']['floral']['0']['status'] == 'running'
  floral.main(['--resume', str(out), '--quiet'])
  _assert_same_run(out, reference)


def test_sigterm_checkpoints_then_resume_is_bit_identical(tmp_path, reference):
  out = tmp_path / 'run'
  proc = _start(out)
  wait_for_round(proc, out, 'fedavg', 30)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err
  saved = json.loads((out / 'results.json').read_text())
  unit = saved['units']['fedavg']['0']
  assert saved['status'] == 'interrupted' and unit['status'] == 'interrupted'
  with checkpoint.Manager(out / 'checkpoints' / 'fedavg' / 'seed0') as ckpts:
    assert ckpts.latest_step() == unit['round']  # saved where it stopped, not at the last multiple of 7
  floral.main(['--resume', str(out), '--quiet'])
  _assert_same_run(out, reference)
