"""The benchmark suite (benchmarks/): the quick path's JSON, and the PyTorch loop computing what the JAX round does.

The throughput comparison is only fair if the PyTorch per-client loop (benchmarks/torch_floral.py) trains the same
model the same way. The runner's ``equivalence`` section starts both from the same weights with router noise off and
records how far apart they end: one client's epoch (MLP with rank-15 adaptors; the CIFAR CNN with conv LoRA) and a
two-client round with aggregation. Here those differences must be at float32 rounding level. No timing is asserted.

The quick run goes in a subprocess with XLA's cheaper compile settings: the test is dominated by compiling FLoRAL
rounds (several seconds each on 2 cores), and the flags cut that by about a third without changing any result the
test looks at.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import fedjax_adapters.benchmarks  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from fedjax_adapters.benchmarks import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flop_counter_counts_scan_trips():
  flops.self_check()


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  pytest.importorskip('torch', reason='the benchmarks need torch (pip install -r requirements-bench.txt)')
  out = tmp_path_factory.mktemp('bench') / 'quick.json'
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                        ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true').strip())
  proc = subprocess.run([sys.executable, '-m', 'fedjax_adapters.benchmarks.run', '--json', str(out), '--quick'], cwd=ROOT, env=env,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return json.loads(out.read_text())


def test_quick_run_writes_every_section(quick):
  r = quick
  assert {'meta', 'hardware', 'peak_matmul', 'equivalence', 'throughput', 'compute_bound', 'memory', 'compile',
          'checks'} <= set(r)
  hw = r['hardware']
  for k in ('cpu_model', 'usable_cores', 'jax_devices', 'device_kind', 'jax_cpu_threads', 'torch_threads',
            'torch_version', 'omp_wait_policy'):
    assert k in hw, k
  assert hw['torch_threads'] == hw['jax_cpu_threads']
  assert r['peak_matmul']['flops_per_s'] > 0
  rows = r['throughput']['mnist_mlp']['rows']
  assert rows
  for row in rows:
    for b in ('vmap', 'sequential', 'torch'):
      assert row[b]['steps_per_s'] > 0 and row[b]['warmup_s'] > 0 and row[b]['rounds_timed'] >= 1
    assert row['flops_per_round'] > 0
    assert row['ratio_vmap_over_torch'] > 0 and row['ratio_vmap_over_sequential'] > 0
  assert r['compute_bound']['fraction_of_peak'] > 0
  mem = r['memory']
  assert [x['clients'] for x in mem['rows']] == [1, 2]
  # The base is an argument once: per added client the arguments grow by exactly adaptors + AdamW state + data.
  assert r['checks']['memory_arguments_per_client_equal_adaptors_opt_data']
  comp = r['compile']['vmap']
  assert comp['client_update_traces'] == 1 and comp['jit_cache_size'] == 1
  assert r['checks']['compile_vmap_compiled_once']


def test_torch_loop_computes_what_the_jax_round_computes(quick):
  eq = quick['equivalence']
  for case in ('mlp_one_client', 'cnn_one_client'):
    e = eq[case]
    assert e['same_keys'], case
    # Training loss summed over the epoch's batches, and the loss after the epoch, on the client's own rows.
    assert e['train_loss_rel_diff'] < 1e-5, (case, e)
    assert e['loss_after_epoch_rel_diff'] < 1e-5, (case, e)
    # Every updated weight (base, A, B, bias adaptors) and the router logits.
    assert e['params_max_rel_diff'] < 1e-4, (case, e)
    assert e['router_rel_diff'] < 1e-4, (case, e)
    assert e['params_max_abs_change_in_epoch'] > 1e-3, (case, e)  # the epoch did move the weights
  assert eq['mlp_round']['global_params_max_rel_diff'] < 1e-4, eq['mlp_round']
  assert eq['mlp_round']['routers_rel_diff'] < 1e-4, eq['mlp_round']
  assert quick['checks']['torch_loop_computes_the_same_as_jax']


def test_before_after_times_each_checkout_with_its_own_code(tmp_path):
  """Both checkouts' rounds in one process: each side must run the package of its own checkout."""
  from fedjax_adapters.benchmarks import before_after
  for package in ('fedjax_adapters', 'benchmarks'):
    shutil.copytree(os.path.join(ROOT, package), tmp_path / package,
                    ignore=shutil.ignore_patterns('results', '__pycache__', '*.log'))
  before, after = before_after.measure(tmp_path, ROOT, clients=2, rounds=2)
  assert before['package'].startswith(str(tmp_path)) and after['package'].startswith(ROOT)
  assert before['median_s'] > 0 and after['median_s'] > 0
