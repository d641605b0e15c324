"""The benchmark's tiling comparison (fedjax_adapters/benchmarks/run.py) and its command-line checks.

* Bad arguments and output paths are one line ``error: ...`` with exit status 2, before anything is measured or
  written (``--max-clients -1``, unknown workloads, ``--min-time -5``, ``--json`` onto a folder, link or device).
* The practitioner's plain PyTorch loop does the JAX client update's work: the same matmul FLOPs per step on the
  MNIST MLP, and from the same weights the same epoch as the library's FLoRAL without the preconditioner.
* A tiny throughput sweep records the automatic tile, the faster PyTorch loop and the best tile, and the checks turn
  rows into issue 22's figures. No timing is asserted.
"""
import os
import subprocess
import sys

import jax
import pytest

import fedjax_adapters.benchmarks  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from fedjax_adapters.benchmarks import run, setups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch = pytest.importorskip('torch', reason='the benchmarks need torch (pip install -r requirements-bench.txt)')

BAD = [
    (['--max-clients', '-1'], 'argument --max-clients: must be >= 1, got -1'),
    (['--workloads', 'mnist_mlp,cifar'], "--workloads 'mnist_mlp,cifar': unknown 'cifar'; valid: mnist_mlp, cifar_cnn"),
    (['--min-time', '-5'], 'argument --min-time: must be finite and >= 0, got -5'),
    (['--backends', 'vmap,tile0'], "unknown 'tile0'"),
    (['--tiles', '4,x'], "--tiles '4,x': expected comma-separated integers"),
    (['--skip', 'memory,speed'], "--skip 'memory,speed': unknown 'speed'"),
    (['--memory-clients', '0'], "--memory-clients '0': expected integers >= 1"),
    (['--min-rounds', '5', '--max-rounds', '2'], '--max-rounds 2 is below --min-rounds 5'),
    (['--torch-device', 'gpu'], "--torch-device 'gpu'"),
]


def test_bad_arguments_are_one_line_errors_before_anything_runs(tmp_path, capsys):
  out = tmp_path / 'bench.json'
  for argv, message in BAD:
    with pytest.raises(SystemExit) as e:
      run.parse(['--json', str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and err.count('\n') == 1 and message in err, (argv, err)
  (tmp_path / 'folder').mkdir()
  os.symlink(tmp_path / 'elsewhere.json', tmp_path / 'link.json')
  (tmp_path / 'file').write_text('')
  for path, message in ((tmp_path / 'folder', 'not a regular file'), (tmp_path / 'link.json', 'not a regular file'),
                        ('/dev/null', 'not a regular file'), (tmp_path / 'file' / 'x.json', 'cannot write there')):
    with pytest.raises(SystemExit) as e:
      run.parse(['--json', str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and message in err, (path, err)
  assert not out.exists() and not (tmp_path / 'elsewhere.json').exists()
  # The command itself: status 2, one line, nothing written.
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-m', 'fedjax_adapters.benchmarks.run', '--json', str(out), '--max-clients',
                         '-1'], cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stdout == ''
  assert proc.stderr == 'error: argument --max-clients: must be >= 1, got -1\n'
  assert not out.exists()
  args = run.parse(['--json', str(out), '--tiles', '8,2', '--backends', 'vmap,tile2'])
  assert args.backends == ['vmap', 'tile2', 'tile8'] and args.skip == []


def test_plain_torch_loop_does_the_jax_client_work():
  from fedjax_adapters.benchmarks import equivalence
  w = setups.mnist_mlp()
  alg = setups.jax_algorithm(w, precondition=False)
  state = alg.init(jax.random.key(0), 2)
  fed = setups.make_data(w, 2)
  loops = {b: setups.torch_round(w, fed, state.global_params, plain=b == 'torch_plain')
           for b in ('torch', 'torch_plain')}
  work = run.step_work(w, alg, state, run.client_data(fed), loops)
  # Same matmuls per full-batch step (the JAX count adds its mixing of the C adaptor outputs, 0.03 %).
  assert work['torch_plain'] == work['torch'] and abs(work['jax'] / work['torch_plain'] - 1) < 1e-3, work
  tiny = w.replace(input_shape=(4, 4, 1), hidden=(8,), examples=20, batch_size=8, noise_std=0.0)
  eq = equivalence.one_client(tiny, plain=True)
  assert eq['same_keys'] and eq['train_loss_rel_diff'] < 1e-5 and eq['loss_after_epoch_rel_diff'] < 1e-5, eq
  assert eq['params_max_rel_diff'] < 1e-4 and eq['router_rel_diff'] < 1e-4, eq
  assert eq['params_max_abs_change_in_epoch'] > 1e-3, eq


def test_tiny_sweep_records_tiles_and_the_faster_torch_loop():
  w = setups.mnist_mlp(examples=16, batch_size=8).replace(input_shape=(4, 4, 1), hidden=(8,), name='tiny_mlp')
  res = run.throughput(w, [3], peak=1e9, backends=['tiled', 'tile2', 'torch', 'torch_plain'], min_time=0.0,
                       min_rounds=1, max_rounds=1, torch_device='cpu', log=lambda s: None, passes=2,
                       cost_analysis=False)
  row = res['rows'][0]
  assert row['tiled']['plan']['tiles'] == 1 and row['tile2']['plan'] == dict(row['tiled']['plan'], tile=2, tiles=2,
                                                                                padding=1)
  for b in res['backends']:
    assert row[b]['rounds_timed'] == 2 and row[b]['passes'] == 2 and row[b]['steps_per_s'] > 0
  assert row['torch_best'] in ('torch', 'torch_plain') and row['best_tile'] == 'tile2'
  for key in ('torch_best', 'best_tile', 'torch_plain'):
    assert row[f'ratio_tiled_over_{key}'] > 0
  assert set(res['flops_per_full_step']) == {'jax', 'torch', 'torch_plain'}


def _row(m, tiled, best, vmap, torch_pre, torch_plain, tiles=1):
  plan = {'tile': min(m, 16), 'tiles': tiles}
  row = {'clients': m, 'tiled': {'steps_per_s': tiled, 'steps_per_s_median': tiled, 'plan': plan},
         'tile16': {'steps_per_s': best, 'steps_per_s_median': best},
         'vmap': {'steps_per_s': vmap, 'steps_per_s_median': vmap},
         'torch': {'steps_per_s': torch_pre, 'steps_per_s_median': torch_pre},
         'torch_plain': {'steps_per_s': torch_plain, 'steps_per_s_median': torch_plain}}
  run._ratios(row)
  return row


def test_checks_compare_the_automatic_tile_with_the_best_tile_and_the_faster_torch_loop():
  rows = [_row(4, 100.0, 100.0, 98.0, 10.0, 20.0), _row(32, 130.0, 140.0, 100.0, 10.0, 20.0, tiles=2),
          _row(256, 110.0, 140.0, 60.0, 10.0, 20.0, tiles=16)]
  assert rows[1]['torch_best'] == 'torch_plain' and rows[1]['best_tile'] == 'tile16'
  out = run.tiling_checks('mnist_mlp', {'rows': rows})
  assert out['mnist_mlp_32_tiled_over_fastest_torch'] == 6.5 and out['mnist_mlp_32_fastest_torch'] == 'torch_plain'
  assert out['mnist_mlp_32_tiled_at_least_6x_fastest_torch']
  assert out['mnist_mlp_32_tiled_within_15pct_of_best_tile']                      # 130 / 140 = 0.93
  assert not out['mnist_mlp_256_tiled_within_15pct_of_best_tile']                 # 110 / 140 = 0.79
  assert out['mnist_mlp_1_to_8_tiled_over_vmap'] == {4: 100.0 / 98.0} and out['mnist_mlp_1_to_8_tiled_is_one_tile']
