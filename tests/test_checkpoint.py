"""Checkpoints: exact round trips with typed PRNG keys, the step Manager, atomic overwrite under SIGKILL, clear errors."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_adapters import checkpoint

def tiny_state(value: float, impl: str = 'threefry2x32'):
  """A small pytree like a ServerState: typed PRNG key, float and int leaves, a nested dict."""
  return {'key': jax.random.key(int(value) + 7, impl=impl), 'round': jnp.int32(value),
          'params': {'w': jnp.full((3, 4), value, jnp.float32) + jnp.arange(12.).reshape(3, 4) / 7,
                     'b': jnp.full((4,), -value, jnp.bfloat16)}}


def assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8))


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_save_restore_is_bit_exact_and_keeps_the_key_impl(tmp_path, impl):
  state = tiny_state(3.0, impl)
  checkpoint.save(tmp_path / 'c', state)
  restored = checkpoint.restore(tmp_path / 'c', like=tiny_state(0.0, impl))
  assert_bitwise_equal(restored, state)
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.uniform(restored['key'], (5,)), jax.random.uniform(state['key'], (5,)))


def test_overwrite_replaces_and_leaves_no_siblings(tmp_path):
  path = tmp_path / 'c'
  checkpoint.save(path, tiny_state(1.0))
  with pytest.raises(ValueError, match='already exists'):
    checkpoint.save(path, tiny_state(2.0))
  checkpoint.save(path, tiny_state(2.0), overwrite=True)
  assert_bitwise_equal(checkpoint.restore(path, tiny_state(0.0)), tiny_state(2.0))
  assert sorted(os.listdir(tmp_path)) == ['c']


def test_empty_partial_and_missing_directories_say_so(tmp_path):
  like = tiny_state(0.0)
  with pytest.raises(ValueError, match='no checkpoint at'):
    checkpoint.restore(tmp_path / 'missing', like)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='is empty'):
    checkpoint.restore(tmp_path / 'empty', like)
  checkpoint.save(tmp_path / 'partial', tiny_state(1.0))
  os.remove(tmp_path / 'partial' / 'commit_success.txt')  # What a save cut short (or a partial copy) looks like.
  with pytest.raises(ValueError, match='is incomplete'):
    checkpoint.restore(tmp_path / 'partial', like)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ValueError, match='is a file'):
    checkpoint.restore(tmp_path / 'file', like)


@pytest.mark.parametrize('cut', ['after_old_renamed', 'after_new_written'])
def test_swap_cut_between_renames_restores_the_survivor(tmp_path, cut):
  """The two states a kill between ``save``'s steps can leave, built by hand; restore and the next save cope."""
  path, old, new = tmp_path / 'c', tiny_state(1.0), tiny_state(2.0)
  if cut == 'after_old_renamed':
    checkpoint.save(tmp_path / 'c.replaced', old)  # Old checkpoint moved aside, new one not yet renamed in.
    expected = new
  else:
    checkpoint.save(path, old)  # New one complete beside the old one, before any rename: the old one still counts.
    expected = old
  checkpoint.save(tmp_path / 'c.incoming', new)
  assert_bitwise_equal(checkpoint.restore(path, tiny_state(0.0)), expected)
  with pytest.raises(ValueError, match='already exists'):
    checkpoint.save(path, tiny_state(3.0))  # The survivor is a checkpoint at ``path``: not silently replaced.
  assert_bitwise_equal(checkpoint.restore(path, tiny_state(0.0)), expected)
  checkpoint.save(path, tiny_state(3.0), overwrite=True)
  assert_bitwise_equal(checkpoint.restore(path, tiny_state(0.0)), tiny_state(3.0))
  assert sorted(os.listdir(tmp_path)) == ['c']



# Killing a saving process: a "zygote" process imports jax and orbax once (no JAX backend started, so forking is
# safe), then forks one saver per trial. The saver builds its state and reports ready; the zygote says go, waits the
# chosen delay and SIGKILLs it. Startup costs are paid before "go", so the delays fall inside the save itself.
_ZYGOTE = textwrap.dedent("""
  import importlib.util, os, signal, sys, time
  import jax, jax.numpy as jnp
  # Load only the module under test (it imports nothing else of the package).
  spec = importlib.util.spec_from_file_location('checkpoint', sys.argv[1])
  checkpoint = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(checkpoint)

  def saver(mode, path, value, ready_w, go_r):
    state = {'key': jax.random.key(int(value)), 'w': jnp.full((256, 1024), value, jnp.float32),
             'r': jnp.int32(value)}
    jax.block_until_ready(state)
    manager = checkpoint.Manager(path, keep=2) if mode == 'manager' else None
    os.write(ready_w, b'r')
    os.read(go_r, 1)
    if manager is None:
      checkpoint.save(path, state, overwrite=True)
    else:
      manager.save(int(value), state, metadata={'round': int(value)})

  for line in sys.stdin:
    mode, path, value, delay = line.split()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
      saver(mode, path, float(value), ready_w, go_r)
      os._exit(0)
    os.read(ready_r, 1)
    start = time.perf_counter()
    os.write(go_w, b'g')
    if float(delay) < 0:  # Calibration: let the save finish and report how long it took.
      status = os.waitpid(pid, 0)[1]
      print('duration', time.perf_counter() - start, status, flush=True)
    else:
      time.sleep(max(0.0, float(delay) - (time.perf_counter() - start)))
      os.kill(pid, signal.SIGKILL)
      print('killed', os.waitpid(pid, 0)[1], flush=True)
    for fd in (ready_r, ready_w, go_r, go_w):
      os.close(fd)
""")


def child_state(value: float):
  return {'key': jax.random.key(int(value)), 'w': jnp.full((256, 1024), value, jnp.float32), 'r': jnp.int32(value)}


@pytest.fixture(scope='module')
def zygote():
  proc = subprocess.Popen([sys.executable, '-c', _ZYGOTE, checkpoint.__file__], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

  def trial(mode: str, path, value: float, delay: float) -> str:
    """Runs one save in a fresh process; kills it ``delay`` seconds after it starts (delay < 0: never)."""
    proc.stdin.write(f'{mode} {path} {value} {delay}\n')
    proc.stdin.flush()
    return proc.stdout.readline().split()

  yield trial
  proc.stdin.close()
  proc.wait(timeout=60)


def kill_delays(zygote, mode: str, path, value: float, n: int):
  """``n`` delays from 0 to 1.2x the save's measured duration: kills land before, inside and just after the save."""
  kind, duration, status = zygote(mode, path, value, -1)
  assert kind == 'duration' and status == '0'
  return [float(duration) * 1.2 * i / (n - 1) for i in range(n)]


def test_sigkill_during_overwrite_never_loses_the_checkpoint(tmp_path, zygote):
  old, new, like = child_state(1.0), child_state(2.0), child_state(0.0)
  checkpoint.save(tmp_path / 'calibrate', old)
  delays = kill_delays(zygote, 'save', tmp_path / 'calibrate', 2.0, n=12)
  assert_bitwise_equal(checkpoint.restore(tmp_path / 'calibrate', like), new)
  for i, delay in enumerate(delays):
    path = tmp_path / f'c{i}'
    checkpoint.save(path, old)
    assert zygote('save', path, 2.0, delay)[0] == 'killed'
    restored = checkpoint.restore(path, like)  # Raises if the kill left nothing restorable.
    assert_bitwise_equal(restored, old if float(restored['w'][0, 0]) == 1.0 else new)
    checkpoint.save(path, new, overwrite=True)  # The next save after a kill works and cleans up.
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(path.name + '.')] == []


def test_sigkill_during_manager_save_never_shows_a_partial_step(tmp_path, zygote):
  first, second, like = child_state(1.0), child_state(2.0), child_state(0.0)
  with checkpoint.Manager(tmp_path / 'calibrate') as m:
    m.save(1, first, metadata={'round': 1})
  delays = kill_delays(zygote, 'manager', tmp_path / 'calibrate', 2.0, n=10)
  for i, delay in enumerate(delays):
    with checkpoint.Manager(tmp_path / f'm{i}') as m:
      m.save(1, first, metadata={'round': 1})
    assert zygote('manager', tmp_path / f'm{i}', 2.0, delay)[0] == 'killed'
    with checkpoint.Manager(tmp_path / f'm{i}') as m:
      latest = m.latest_step()
      assert latest in (1, 2)
      assert_bitwise_equal(m.restore(latest, like), (first, second)[latest - 1])
      assert m.metadata(latest) == {'round': latest}
      assert m.save(3, second)  # Saving continues after the kill.


def test_manager_round_trip_keep_and_every(tmp_path):
  with checkpoint.Manager(tmp_path / 'run', keep=2, every=3) as m:
    assert m.latest_step() is None
    saved = [s for s in range(1, 11) if m.save(s, tiny_state(float(s)), metadata={'round': s, 'method': 'floral'},
                                                 force=s == 10)]
    assert saved == [3, 6, 9, 10]
    m.wait()
    assert m.all_steps() == [9, 10] and m.latest_step() == 10
  with checkpoint.Manager(tmp_path / 'run', keep=2) as m:  # A new process sees the same steps.
    assert m.all_steps() == [9, 10]
    assert_bitwise_equal(m.restore(9, like=tiny_state(0.0)), tiny_state(9.0))
    assert m.metadata(10) == {'round': 10, 'method': 'floral'}
    assert not m.save(10, tiny_state(0.0))  # Already saved: not rewritten.
    assert_bitwise_equal(m.restore(10, like=tiny_state(0.0)), tiny_state(10.0))


def test_manager_host_rng_state_round_trips_through_metadata(tmp_path):
  rng = np.random.default_rng(5)
  rng.random(3)
  with checkpoint.Manager(tmp_path / 'run') as m:
    m.save(1, tiny_state(1.0), metadata={'host_rng': rng.bit_generator.state})
    resumed = np.random.default_rng()
    resumed.bit_generator.state = m.metadata(1)['host_rng']
  np.testing.assert_array_equal(resumed.random(4), rng.random(4))


def test_manager_ignores_leftover_temporary_steps(tmp_path):
  with checkpoint.Manager(tmp_path / 'run') as m:
    m.save(1, tiny_state(1.0))
  # What orbax leaves when a process dies while writing step 2: a temporary directory with some files.
  tmp_step = tmp_path / 'run' / '2.orbax-checkpoint-tmp-1700000000'
  (tmp_step / 'default').mkdir(parents=True)
  (tmp_step / 'default' / '_METADATA').write_text('{')
  with checkpoint.Manager(tmp_path / 'run') as m:
    assert m.latest_step() == 1 and m.all_steps() == [1]
    assert m.save(2, tiny_state(2.0))
    assert_bitwise_equal(m.restore(2, tiny_state(0.0)), tiny_state(2.0))


def test_manager_bad_input_is_a_clear_error(tmp_path):
  for kwargs, match in (({'keep': 0}, 'keep must be'), ({'every': -1}, 'every must be'), ({'keep': 1.5}, 'keep')):
    with pytest.raises(ValueError, match=match):
      checkpoint.Manager(tmp_path / 'x', **kwargs)
  with checkpoint.Manager(tmp_path / 'run') as m:
    with pytest.raises(ValueError, match='strict JSON'):
      m.save(1, tiny_state(1.0), metadata={'loss': float('nan')})
    with pytest.raises(ValueError, match='must be a dict'):
      m.save(1, tiny_state(1.0), metadata=[1])
    with pytest.raises(ValueError, match='step must be an integer >= 0'):
      m.save(-1, tiny_state(1.0))
    m.save(5, tiny_state(5.0))
    with pytest.raises(ValueError, match='older than the latest saved step 5'):
      m.save(4, tiny_state(4.0))
    with pytest.raises(ValueError, match=r'no checkpoint step 3 .*saved steps: \[5\]'):
      m.restore(3, tiny_state(0.0))
    with pytest.raises(ValueError, match='could not be restored'):
      m.restore(5, {'w': jnp.zeros((2,))})
