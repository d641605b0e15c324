"""Client-axis tiling (fedjax_adapters/federated/tiling.py): the tiled round equals the full vmap, traces the client
update once, and the tile follows the working set, the cache (read from a sysfs tree) and the device.

Equality is to float32 rounding, not bit for bit: XLA:CPU's batched kernels do not round a client's computation the
same way at every batch size (the plain vmap over 8 clients and over 32 differ in the last bits for the same client
on the MNIST MLP), so a tile of t clients can round like a vmap of t, not of M.
"""
import re

import jax
import numpy as np
import pytest

from fedjax_adapters.federated import client_data, evaluate, make_round, tiling
from fedjax_adapters.federated.tiling import balanced_tiles, choose_tile, cpu_cache_bytes, tiled_clients
from run_helpers import count_traces
from test_federated import assert_trees_close, floral_setup

FLOAT32_ROUNDING = dict(rtol=1e-6, atol=1e-7)


@pytest.fixture(scope='module')
def setup():
  ds, alg, data, state = floral_setup(0)
  reference = make_round(alg, clients_per_round=7)  # 7 clients: tiles of 3 pad the cohort by 2
  want, metrics = [state], []
  for _ in range(2):
    new, m = reference(want[-1], data)
    want.append(new)
    metrics.append(m)
  return ds, alg, data, state, want, metrics[0]


@pytest.mark.parametrize('tile', [1, 3, None])
def test_tiled_round_equals_full_vmap_and_traces_once(setup, tile):
  ds, alg, data, state, want, m_want = setup
  counted, traces = count_traces(alg)
  # None with a cache far larger than 7 working sets: one tile of the whole cohort (the plain vmap's program).
  mapping = tiled_clients(tile, cache_bytes=None if tile else 2**40)
  round_fn = make_round(counted, clients_per_round=7, mapping=mapping)
  got = state
  for i in range(2):
    got, metrics = round_fn(got, data)
    if i == 0:
      for key in ('client_ids', 'loss', 'count', 'update_norm'):
        np.testing.assert_allclose(metrics[key], m_want[key], **FLOAT32_ROUNDING)
  assert_trees_close(got, want[2], **FLOAT32_ROUNDING)
  assert len(traces) == 1 and round_fn.compiled._cache_size() == 1
  tiles = -(-7 // tile) if tile else 1
  assert mapping.plan['tiles'] == tiles and mapping.plan['tile'] * tiles - 7 == mapping.plan['padding']
  if tiles == 1:  # one tile is the vmapped round's program exactly (so it cannot be slower)
    ids = np.arange(7, dtype=np.int32)
    program = lambda rf: re.sub(r'loc\([^)]*\)|#loc\d*', '', rf.compiled.lower(state, data, ids, None).as_text())
    assert program(round_fn) == program(make_round(counted, clients_per_round=7))
    assert_trees_close(got, want[2], rtol=0, atol=0)


def test_tiled_evaluation_equals_vmapped(setup):
  ds, alg, data, _, want, _ = setup
  test = client_data(ds.test)
  got = evaluate(alg, want[1], test, mapping=tiled_clients(4))
  assert_trees_close(got, evaluate(alg, want[1], test), **FLOAT32_ROUNDING)


def test_automatic_tile_fills_half_the_cache_on_cpu_and_takes_the_cohort_elsewhere(setup):
  _, alg, data, state, _, _ = setup
  mapping = tiled_clients(cache_bytes=1)  # a 1-byte cache: one client per tile
  jax.eval_shape(lambda: mapping.map(alg.client_update, (state.frozen, state.global_params),
                                     (state.clients, data, jax.random.split(jax.random.key(0), 10))))
  cpu = jax.default_backend() == 'cpu'  # an accelerator takes the whole cohort whatever the cache
  assert mapping.plan['platform'] == jax.default_backend()
  assert (mapping.plan['tile'], mapping.plan['tiles']) == ((1, 10) if cpu else (10, 1))
  ws = mapping.plan['working_set_bytes']
  # The working set: one client's inputs plus twice its outputs (at least its copy of the global params, twice).
  assert ws >= 2 * tiling.tree_bytes(state.global_params)
  assert choose_tile(64, ws, platform='cpu', cache_bytes=int(2 * 5 * ws)) == 5
  assert choose_tile(64, ws, platform='cpu', cache_bytes=2 * 1000 * ws) == 64
  assert choose_tile(64, 10**12, platform='cpu', cache_bytes=2**20) == 1
  assert choose_tile(64, 10**12, platform='gpu') == 64 and choose_tile(64, 10**12, platform='tpu') == 64


def test_balanced_tiles_pad_less_than_one_client_per_tile():
  for m in range(1, 80):
    for max_tile in (1, 3, 8, 16):
      tiles, tile = balanced_tiles(m, max_tile)
      assert tile <= max_tile and tiles * tile >= m and tiles * tile - m < tiles
      assert tiles == -(-m // max_tile)  # no more tiles than the largest tile needs


def _cache_dir(root, cpu, index, level, kind, size, shared):
  d = root / f'cpu{cpu}' / 'cache' / f'index{index}'
  d.mkdir(parents=True)
  for name, text in (('level', level), ('type', kind), ('size', size), ('shared_cpu_list', shared)):
    (d / name).write_text(f'{text}\n')


def test_cache_size_read_from_sysfs_counts_each_last_level_instance_once(tmp_path, monkeypatch):
  monkeypatch.setattr(tiling.os, 'sched_getaffinity', lambda pid: {0, 1, 2}, raising=False)
  for cpu in range(3):
    _cache_dir(tmp_path, cpu, 0, 1, 'Data', '32K', str(cpu))
    _cache_dir(tmp_path, cpu, 1, 1, 'Instruction', '32K', str(cpu))
    _cache_dir(tmp_path, cpu, 2, 2, 'Unified', '1024K', str(cpu))
    _cache_dir(tmp_path, cpu, 3, 3, 'Unified', '32768K' if cpu < 2 else '16M', '0-1' if cpu < 2 else '2')
  assert cpu_cache_bytes(str(tmp_path)) == 32 * 2**20 + 16 * 2**20
  monkeypatch.setattr(tiling.os, 'sysconf', lambda name: 6 * 2**20 if name == 'SC_LEVEL3_CACHE_SIZE' else 0)
  assert cpu_cache_bytes(str(tmp_path / 'none')) == 6 * 2**20
  monkeypatch.setattr(tiling.os, 'sysconf', lambda name: (_ for _ in ()).throw(ValueError(name)))
  assert cpu_cache_bytes(str(tmp_path / 'nothing')) == tiling.DEFAULT_CACHE_BYTES


def test_bad_tile_is_a_clear_error():
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match=f'tile >= 1 \\(or None\\); got {bad!r}'):
      tiled_clients(bad)
  with pytest.raises(ValueError, match='cache_bytes >= 1'):
    tiled_clients(cache_bytes=0)
