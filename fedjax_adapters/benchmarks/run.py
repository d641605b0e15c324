"""Benchmark suite (issue "Scale and speed", part 4): ``python -m fedjax_adapters.benchmarks.run --json OUT [--quick]``.

Sections (each a top-level key of the JSON):

* ``hardware``: CPU model and cores, load average before/after, ``jax.devices()``, GPU name, versions, threads.
* ``peak_matmul``: the dense f32 matmul FLOP/s of this machine, measured with JAX in this run.
* ``throughput``: FLoRAL rounds (MNIST MLP, CIFAR CNN) vs clients per round: the vmapped round, the round tiled
  for the cache (``tiled_clients()``, and fixed tiles with ``--tiles``), the sequential backend and two PyTorch
  per-client loops (the public code's preconditioned one, and the plain loop a practitioner writes), side by side;
  client local steps per second, warm-up (compile) apart, ratios, FLOP/s and fraction of the matmul peak.
* ``compute_bound``: a wide-MLP FLoRAL round with big batches, its FLOP/s as a fraction of the matmul peak.
* ``memory``: compiled memory of a vmapped LoRA client step on LLaMA vs clients (base broadcast).
* ``compile``: compile time and number of compilations of a 100-round run (vmap and sequential backends).
* ``checks``: the numbers the issue asks to show, with pass/fail.

See ``benchmarks/README.md`` for the protocol.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_adapters.benchmarks import flops as flops_mod
from fedjax_adapters.benchmarks import setups
from fedjax_adapters.experiments.runlib import cli
from fedjax_adapters.federated import chunked_clients, client_data, make_round, sequential_clients, tiled_clients
from fedjax_adapters.federated.client_update import ClientData
from fedjax_adapters.federated.tiling import TiledClients

# ----------------------------------------------------------------------------------------------------------------
# Compile events
# ----------------------------------------------------------------------------------------------------------------

_EVENTS: dict[str, list[float]] = {}


def _listener(name: str, duration: float, **_: Any) -> None:
  if name.startswith('/jax/core/compile/'):
    _EVENTS.setdefault(name, []).append(float(duration))


_LISTENING = False


def _listen() -> None:
  global _LISTENING
  if not _LISTENING:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _LISTENING = True


class CompileMeter:
  """Counts backend compilations and sums trace / lowering / compile seconds inside a ``with`` block."""

  def __enter__(self):
    _listen()
    self._start = {k: len(v) for k, v in _EVENTS.items()}
    return self

  def __exit__(self, *exc):
    self.result = {}
    for name, vals in _EVENTS.items():
      new = vals[self._start.get(name, 0):]
      short = name.rsplit('/', 1)[-1].replace('_duration', '')
      self.result[f'{short}_count'] = len(new)
      self.result[f'{short}_s'] = float(sum(new))
    return False

  @property
  def compiles(self) -> int:
    return self.result.get('backend_compile_count', 0)

  @property
  def compile_s(self) -> float:
    return sum(v for k, v in self.result.items() if k.endswith('_s'))


# ----------------------------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def hardware(torch_info: dict | None) -> dict[str, Any]:
  devs = jax.devices()
  info = {
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'usable_cores': usable_cores(),
      'jax_cpu_threads': usable_cores(),  # XLA's CPU thread pool is sized to the usable cores
      'platform': platform.platform(),
      'python': sys.version.split()[0],
      'jax_backend': jax.default_backend(),
      'jax_devices': [str(d) for d in devs],
      'device_kind': devs[0].device_kind,
      'gpu_name': devs[0].device_kind if devs[0].platform == 'gpu' else None,
      'versions': {'jax': jax.__version__, 'jaxlib': getattr(jax.lib, '__version__', None) or _version('jaxlib'),
                   'flax': _version('flax'), 'optax': _version('optax'), 'numpy': np.__version__},
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'omp_wait_policy': os.environ.get('OMP_WAIT_POLICY'),
      'default_matmul_precision': str(jax.config.jax_default_matmul_precision),
  }
  try:
    with open('/proc/meminfo') as f:
      info['mem_total_kb'] = int(f.readline().split()[1])
  except (OSError, ValueError, IndexError):
    pass
  if torch_info:
    info.update(torch_info)
  return info


def _version(name: str):
  try:
    from importlib.metadata import version
    return version(name)
  except Exception:
    return None


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def time_rounds(run_once: Callable[[], None], *, min_time: float, min_rounds: int, max_rounds: int) -> dict:
  """Runs ``run_once`` (which blocks until done) until ``min_time`` and ``min_rounds`` are met."""
  times: list[float] = []
  cpu: list[float] = []  # the process's CPU seconds per round (all threads): less sensitive to time-sharing
  while not times or (len(times) < max_rounds and (sum(times) < min_time or
                                                   (len(times) < min_rounds and times[0] < min_time))):
    t0, c0 = time.perf_counter(), time.process_time()
    run_once()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {'round_s_best': min(times), 'round_s_median': statistics.median(times), 'rounds_timed': len(times),
          'round_s_all': times, 'round_cpu_s_all': cpu}


def _block(tree):
  jax.block_until_ready(tree)


_BUILT: dict[str, 'JaxBackend'] = {}  # the last vmapped round built per workload (reused by the quick path)


JAX_BACKENDS = ('vmap', 'vmap_chunk1', 'tiled', 'sequential')
TORCH_BACKENDS = ('torch', 'torch_plain')
SECTIONS = ('equivalence', 'throughput', 'compute_bound', 'memory', 'compile')
WORKLOADS = ('mnist_mlp', 'cifar_cnn')


def backend_mapping(backend: str):
  """The client mapping a JAX backend name stands for: ``vmap`` (default), ``vmap_chunk1`` (``chunked_clients(1)``),
  ``tiled`` (``tiled_clients()``, the tile sized for the cache), ``tile<k>`` (``tiled_clients(k)``), ``sequential``."""
  if backend.startswith('tile') and backend[4:].isdigit():
    return tiled_clients(int(backend[4:]))
  return {'sequential': sequential_clients(), 'vmap_chunk1': chunked_clients(1), 'tiled': tiled_clients()}.get(backend)


class JaxBackend:
  """The library's round with one backend's mapping (:func:`backend_mapping`) on fixed client ids, state carried
  between rounds."""

  def __init__(self, alg, backend: str, m: int, state, data):
    self.mapping = backend_mapping(backend)
    self.rf = make_round(alg, clients_per_round=m, mapping=self.mapping)
    self.ids = jnp.arange(m, dtype=jnp.int32)
    self.state, self.data = state, data

  def __call__(self):
    self.state, metrics = self.rf(self.state, self.data, client_ids=self.ids)
    _block((self.state, metrics))


def _throughput_entry(timing: dict, warm_s: float, steps: int, examples: int, flops: float | None,
                      peak: float) -> dict:
  best = timing['round_s_best']
  out = dict(timing, warmup_s=warm_s, steps_per_s=steps / best, steps_per_s_median=steps / timing['round_s_median'],
             examples_per_s=examples / best)
  if timing.get('round_cpu_s_best'):
    out['steps_per_cpu_s'] = steps / timing['round_cpu_s_best']
  if flops:
    out['flops_per_s'] = flops / best
    out['fraction_of_peak'] = flops / best / peak
  return out


def _torch_runner(loop, backend: str, m: int) -> tuple[Callable[[], None], float]:
  """``(run one round, warm-up seconds)`` of a PyTorch loop on clients ``0 .. m-1``; the plain loop at torch's
  default thread count (set around each round), the public code's loop at the runner's."""
  from fedjax_adapters.benchmarks import torch_floral
  import torch
  ids = list(range(m))
  threads = torch_floral.DEFAULT_THREADS if backend == 'torch_plain' else torch.get_num_threads()

  def run(clients=ids):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
      loop.run_round(clients)
    finally:
      torch.set_num_threads(before)

  t0 = time.perf_counter()
  run(ids[:1])  # nothing to compile: warm up on one client
  return run, time.perf_counter() - t0


def _ratios(row: dict) -> None:
  """Throughput ratios of each compiled backend over the others, over the faster PyTorch loop (``torch_best``
  names it) and over the best explicit tile size (``best_tile``), best-round and median."""
  torches = [b for b in TORCH_BACKENDS if b in row]
  if torches:
    row['torch_best'] = max(torches, key=lambda b: row[b]['steps_per_s'])
  tiles = [b for b in row if isinstance(row[b], dict) and b.startswith('tile') and b[4:].isdigit()]
  if tiles:
    row['best_tile'] = max(tiles + (['vmap'] if 'vmap' in row else []), key=lambda b: row[b]['steps_per_s'])
  for mine in ('vmap', 'vmap_chunk1', 'tiled'):
    others = ('torch', 'torch_plain', 'sequential', 'vmap', row.get('torch_best'), row.get('best_tile'))
    for other, name in zip(others, ('torch', 'torch_plain', 'sequential', 'vmap', 'torch_best', 'best_tile')):
      if mine in row and other in row and other != mine:
        row[f'ratio_{mine}_over_{name}'] = row[mine]['steps_per_s'] / row[other]['steps_per_s']
        row[f'ratio_{mine}_over_{name}_median'] = row[mine]['steps_per_s_median'] / row[other]['steps_per_s_median']


def _round_flops(row: dict, alg, m: int, state0, data) -> None:
  """FLOPs of the vmapped round as traced (no compile), in all and per client step."""
  rf = make_round(alg, clients_per_round=m)
  ids = jnp.arange(m, dtype=jnp.int32)
  row['flops_per_round'], _ = flops_mod.jaxpr_flops(rf.compiled, state0, data, ids, None)
  row['flops_note'] = 'dot_general + conv multiply-adds of the vmapped round as traced (padding rows included)'


def step_work(workload: setups.Workload, alg, state0, data, loops: dict) -> dict[str, float]:
  """Matmul/conv FLOPs of one full-batch client step in each implementation: the JAX client update (traced, divided
  by its steps) and each PyTorch loop (``torch.utils.flop_counter`` on one step), so the loops compared do the same
  work."""
  one = ClientData(data.x[0], data.y[0], data.count[0])
  f, _ = flops_mod.jaxpr_flops(alg.client_update, state0.frozen, state0.global_params,
                               jax.tree.map(lambda a: a[0], state0.clients), one, jax.random.key(0))
  out = {'jax': f / workload.steps_per_client}
  if loops:
    from fedjax_adapters.benchmarks import torch_floral
    out.update({b: float(torch_floral.step_flops(loop)) for b, loop in loops.items()})
  return out


def _xla_costs(row: dict, run: 'JaxBackend', state0, data) -> None:
  """XLA's cost analysis of the compiled vmapped round (while-loop bodies counted once) and its temp bytes."""
  try:
    ca = run.rf.compiled.lower(state0, data, run.ids, None).compile()
    row['xla_cost_analysis_flops'] = flops_mod.xla_cost_flops(ca)
    row['vmap_compiled_temp_bytes'] = int(getattr(ca.memory_analysis(), 'temp_size_in_bytes', 0) or 0)
  except Exception as e:  # informational only
    row['xla_cost_analysis_error'] = repr(e)


def _warm_up(backend: str, loops: dict, alg, m: int, state0, data) -> tuple[Callable[[], None], float, dict]:
  """``(run one round, warm-up seconds, compile facts)`` of one backend at ``m`` clients (the first round
  compiles a JAX backend; a PyTorch loop warms up on one client)."""
  if backend in loops:
    run, warm = _torch_runner(loops[backend], backend, m)
    return run, warm, {}
  run = JaxBackend(alg, backend, m, state0, data)
  with CompileMeter() as meter:
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
  facts = {'compiles_in_warmup': meter.compiles, 'compile_s': meter.compile_s}
  if isinstance(run.mapping, TiledClients):
    facts['plan'] = dict(run.mapping.plan)
  return run, warm, facts


def _merge(timings: list[dict]) -> dict:
  rounds = [t for timing in timings for t in timing['round_s_all']]
  cpu = [t for timing in timings for t in timing['round_cpu_s_all']]
  return {'round_s_best': min(rounds), 'round_s_median': statistics.median(rounds), 'rounds_timed': len(rounds),
          'round_s_all': rounds, 'round_cpu_s_all': cpu, 'round_cpu_s_best': min(cpu), 'passes': len(timings)}


def throughput(workload: setups.Workload, clients: list[int], *, peak: float, backends: list[str], min_time: float,
               min_rounds: int, max_rounds: int, torch_device: str, log, passes: int = 1,
               cost_analysis: bool = True) -> dict:
  """Every backend at every cohort size; with ``passes`` > 1 the backends are timed in that many alternating
  passes (A B C A B C ...), each pass ``min_time / passes`` long, so a burst of load hits all of them alike.
  ``cost_analysis``: also record XLA's cost analysis of the vmapped round (one more compile per size)."""
  k = max(clients)
  alg = setups.jax_algorithm(workload)
  fed = setups.make_data(workload, k)
  data = client_data(fed)
  state0 = alg.init(jax.random.key(0), k)
  loops = {b: setups.torch_round(workload, fed, state0.global_params, device=torch_device, plain=b == 'torch_plain')
           for b in backends if b in TORCH_BACKENDS}
  rows = []
  for m in clients:
    steps = m * workload.steps_per_client
    row: dict[str, Any] = {'clients': m, 'steps_per_round': steps, 'examples_per_round': m * workload.examples}
    _round_flops(row, alg, m, state0, data)
    # A fixed tile that holds the whole cohort is the vmapped round's program: timed once, as 'vmap'.
    here = [b for b in backends if not (b[4:].isdigit() and b.startswith('tile') and 'vmap' in backends and
                                        int(b[4:]) >= m)]
    ready = {b: _warm_up(b, loops, alg, m, state0, data) for b in here}
    if 'vmap' in ready:
      _BUILT[workload.name] = ready['vmap'][0]
      if cost_analysis:
        _xla_costs(row, ready['vmap'][0], state0, data)
    timings: dict[str, list] = {b: [] for b in here}
    for _ in range(passes):
      for b in here:
        timings[b].append(time_rounds(ready[b][0], min_time=min_time / passes, min_rounds=min_rounds,
                                      max_rounds=max_rounds))
    for b in here:
      timing, (_, warm, facts) = _merge(timings[b]), ready[b]
      row[b] = dict(_throughput_entry(timing, warm, steps, m * workload.examples, row['flops_per_round'], peak),
                    **facts)
      log(f"  {workload.name} M={m:5d} {b:11s} warm {warm:7.2f}s  round {timing['round_s_best']:8.4f}s  "
          f"{row[b]['steps_per_s']:10.1f} steps/s" + (f"  (tile {facts['plan']['tile']})" if 'plan' in facts else ''))
    _ratios(row)
    rows.append(row)
  return {'workload': workload.describe(), 'client_population': k, 'backends': backends, 'passes': passes,
          'flops_per_full_step': step_work(workload, alg, state0, data, loops), 'rows': rows}


def compute_bound(workload: setups.Workload, m: int, *, min_time: float, min_rounds: int, max_rounds: int,
                  peak_fn: Callable[[], dict], log, reuse: 'JaxBackend | None' = None) -> dict:
  """A vmapped round's FLOP/s against the matmul peak timed just before and just after it (the better one counts).

  ``reuse``: time this already-built round instead of building one for ``workload`` (the quick path, to save a
  compile).
  """
  if reuse is None:
    alg = setups.jax_algorithm(workload)
    data = client_data(setups.make_data(workload, m))
    state = alg.init(jax.random.key(0), m)
    run = JaxBackend(alg, 'vmap', m, state, data)
  else:
    run, state, data, m = reuse, reuse.state, reuse.data, int(reuse.ids.shape[0])
  f, notes = flops_mod.jaxpr_flops(run.rf.compiled, state, data, run.ids, None)
  with CompileMeter() as meter:
    t0 = time.perf_counter()
    run()
    warm = time.perf_counter() - t0
  peak_before = peak_fn()
  timing = time_rounds(run, min_time=min_time, min_rounds=min_rounds, max_rounds=max_rounds)
  peak_after = peak_fn()
  peak = max(peak_before['flops_per_s'], peak_after['flops_per_s'])  # rebase_peak() may raise it further
  achieved = f / timing['round_s_best']
  log(f"  compute-bound {workload.name} M={m}: {achieved / 1e9:.1f} GFLOP/s of peak {peak / 1e9:.1f} "
      f"= {achieved / peak:.1%}")
  return {'workload': workload.describe(), 'clients': m, 'flops_per_round': f, 'flops_notes': notes,
          'warmup_s': warm, 'compile_s': meter.compile_s, **timing, 'flops_per_s': achieved,
          'peak_before': peak_before, 'peak_after': peak_after, 'peak_flops_per_s': peak,
          'fraction_of_peak': achieved / peak}


def compile_run(workload: setups.Workload, m: int, num_clients: int, rounds: int, backend: str, log) -> dict:
  """``rounds`` rounds with the library's own client sampling; counts traces and compilations."""
  base = setups.jax_algorithm(workload)
  traces = []

  def counted(*args):
    traces.append(1)
    return base.client_update(*args)

  alg = base.replace(client_update=counted)
  data = client_data(setups.make_data(workload, num_clients))
  state = alg.init(jax.random.key(0), num_clients)
  rf = make_round(alg, clients_per_round=m, mapping=sequential_clients() if backend == 'sequential' else None)
  times = []
  with CompileMeter() as meter:
    t_all = time.perf_counter()
    for _ in range(rounds):
      t0 = time.perf_counter()
      state, metrics = rf(state, data)
      _block((state, metrics))
      times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
  out = {'backend': backend, 'rounds': rounds, 'clients_per_round': m, 'client_population': num_clients,
         'client_update_traces': len(traces), 'backend_compiles': meter.compiles,
         'compile_events': meter.result, 'compile_s': meter.compile_s, 'first_round_s': times[0],
         'steady_round_s_median': statistics.median(times[1:]) if len(times) > 1 else None,
         'total_s': total}
  if backend == 'vmap':
    out['jit_cache_size'] = rf.compiled._cache_size()
  log(f"  compile {backend}: {rounds} rounds, {len(traces)} trace(s) of client_update, {meter.compiles} backend "
      f"compile(s), {meter.compile_s:.2f}s compiling, first round {times[0]:.2f}s")
  return out


def rebase_peak(result: dict) -> None:
  """Uses the best of every matmul-peak timing of the run as the peak, and recomputes each fraction of it.

  On a shared machine a single timing can catch a busy moment (26 vs 46 GFLOP/s on the reference run); load only ever
  slows a timing down, so the best one is the closest to the machine's peak and keeps the fractions conservative.
  """
  samples = [result['peak_matmul']]
  cb = result.get('compute_bound')
  if cb:
    samples += [cb['peak_before'], cb['peak_after']]
  best = max(samples, key=lambda p: p['flops_per_s'])
  peak = best['flops_per_s']
  result['peak_matmul'] = dict(best, samples_flops_per_s=[p['flops_per_s'] for p in samples],
                               note='best of the run\'s matmul timings (start, and around the compute-bound round)')
  for res in result.get('throughput', {}).values():
    for row in res['rows']:
      for b in res['backends']:
        if b in row and 'flops_per_s' in row[b]:
          row[b]['fraction_of_peak'] = row[b]['flops_per_s'] / peak
  if cb:
    cb['peak_flops_per_s'] = peak
    cb['fraction_of_peak'] = cb['flops_per_s'] / peak


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------

def _row(res: dict | None, m: int) -> dict | None:
  return next((r for r in res['rows'] if r['clients'] == m), None) if res else None


def tiling_checks(name: str, res: dict) -> dict[str, Any]:
  """Issue 22's figures for one workload: the cache-sized tiling at 32 clients against the faster PyTorch loop
  (>= 6x), at 32 and 256 clients against the best explicit tile size (within 15 %), and at 1-8 clients against
  the full vmap (the same program there: one tile)."""
  out: dict[str, Any] = {}
  r32 = _row(res, 32)
  if r32 and 'ratio_tiled_over_torch_best' in r32:
    out[f'{name}_32_tiled_over_fastest_torch'] = r32['ratio_tiled_over_torch_best']
    out[f'{name}_32_fastest_torch'] = r32['torch_best']
    out[f'{name}_32_tiled_at_least_6x_fastest_torch'] = r32['ratio_tiled_over_torch_best'] >= 6.0
  for m in (32, 256):
    r = _row(res, m)
    if r and 'ratio_tiled_over_best_tile' in r:
      out[f'{name}_{m}_tiled_over_best_tile'] = r['ratio_tiled_over_best_tile']
      out[f'{name}_{m}_best_tile'] = r['best_tile']
      out[f'{name}_{m}_tiled_within_15pct_of_best_tile'] = r['ratio_tiled_over_best_tile'] >= 0.85
  small = [r for r in res['rows'] if r['clients'] <= 8 and 'ratio_tiled_over_vmap' in r]
  if small:
    out[f'{name}_1_to_8_tiled_over_vmap'] = {r['clients']: r['ratio_tiled_over_vmap'] for r in small}
    out[f'{name}_1_to_8_tiled_is_one_tile'] = all(r['tiled']['plan']['tiles'] == 1 for r in small)
  return out


def checks(result: dict, args) -> dict:
  out: dict[str, Any] = {}
  tp = result.get('throughput', {})
  mn = tp.get('mnist_mlp')
  if mn:
    target = _row(mn, 32)
    if target and 'ratio_vmap_over_torch' in target:
      out['mnist_32_vmap_over_torch'] = target['ratio_vmap_over_torch']
      out['mnist_32_vmap_over_torch_median'] = target['ratio_vmap_over_torch_median']
      out['mnist_32_vmap_at_least_5x_torch'] = target['ratio_vmap_over_torch'] >= 5.0
    elif 'torch' in mn['backends']:
      out['mnist_32_vmap_over_torch'] = None
      out['mnist_32_note'] = '32 clients per round were not in the sweep'
  for name, res in tp.items():
    for mine in ('vmap', 'vmap_chunk1', 'tiled'):
      key = f'ratio_{mine}_over_sequential'
      if not any(key in r for r in res['rows']):
        continue
      out[f'{name}_{mine}_not_slower_than_sequential'] = not [r['clients'] for r in res['rows']
                                                             if key in r and r[key] < 1.0]
      out[f'{name}_sizes_where_{mine}_slower'] = [r['clients'] for r in res['rows'] if key in r and r[key] < 1.0]
      out[f'{name}_min_ratio_{mine}_over_sequential'] = min(r[key] for r in res['rows'] if key in r)
    out.update(tiling_checks(name, res))
  cb = result.get('compute_bound')
  if cb:
    out['compute_bound_fraction_of_peak'] = cb['fraction_of_peak']
    out['compute_bound_at_least_50pct'] = cb['fraction_of_peak'] >= 0.5
  mem = result.get('memory')
  if mem and mem.get('per_client_slope_bytes', {}).get('total_bytes') is not None:
    s = mem['per_client_slope_bytes']
    e = mem['per_client_expected']
    out['memory_per_client_bytes'] = s['total_bytes']
    out['memory_base_bytes'] = mem['base_bytes']
    out['memory_per_client_over_base'] = mem['slope_over_base']
    out['memory_arguments_per_client_equal_adaptors_opt_data'] = abs(s['argument_bytes'] -
                                                                     e['expected_argument_bytes']) < 1024
    out['memory_no_base_copy_per_client'] = mem['no_base_copy_per_client']
  eq = result.get('equivalence')
  if eq:
    cases = [k for k in ('mlp_one_client', 'cnn_one_client', 'mlp_one_client_plain') if k in eq]
    losses = [eq[k][f] for k in cases for f in ('train_loss_rel_diff', 'loss_after_epoch_rel_diff')]
    params = [eq[k]['params_max_rel_diff'] for k in cases] + [eq['mlp_round']['global_params_max_rel_diff']]
    out['torch_vs_jax_max_loss_rel_diff'] = max(losses)
    out['torch_vs_jax_max_param_rel_diff'] = max(params)
    out['torch_loop_computes_the_same_as_jax'] = max(losses) < 1e-4 and max(params) < 1e-3
  comp = result.get('compile', {})
  if 'vmap' in comp:
    out['compile_vmap_traces_100_rounds'] = comp['vmap']['client_update_traces']
    out['compile_vmap_compiled_once'] = comp['vmap']['client_update_traces'] == 1 and comp['vmap']['jit_cache_size'] == 1
  return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------

WIDE_CPU = {'width': 2048, 'clients': 4, 'batch': 256, 'examples': 512}
WIDE_ACCELERATOR = {'width': 8192, 'clients': 8, 'batch': 4096, 'examples': 16384}


def _powers(cap: int) -> list[int]:
  out, m = [], 1
  while m <= cap:
    out.append(m)
    m *= 2
  return out


def _names(text: str, is_valid: Callable[[str], bool], listed: str, what: str) -> list[str]:
  """Comma-separated names, each passing ``is_valid``; the error names the first bad one and lists the valid."""
  names = [n.strip() for n in text.split(',') if n.strip()]
  bad = [n for n in names if not is_valid(n)]
  if bad:
    raise cli.UserError(f'{what} {text!r}: unknown {bad[0]!r}; valid: {listed}')
  if not names:
    raise cli.UserError(f'{what} {text!r} names nothing; valid: {listed}')
  return names


def _is_backend(name: str) -> bool:
  return name in JAX_BACKENDS + TORCH_BACKENDS or (name.startswith('tile') and name[4:].isdigit() and
                                                   int(name[4:]) >= 1)


def _counts(text: str, what: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v.strip()]
  except ValueError:
    raise cli.UserError(f'{what} {text!r}: expected comma-separated integers') from None
  if not values or min(values) < 1:
    raise cli.UserError(f'{what} {text!r}: expected integers >= 1')
  return values


def _output_path(path: str) -> str:
  """``--json``: a regular file (or nothing yet) in a writable folder; never a folder, symlink or device."""
  if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
    raise cli.UserError(f'--json {path}: not a regular file (a symlink, folder or device); give a file path')
  return cli.probe_writable_file(path, '--json')


def validate(args: argparse.Namespace) -> argparse.Namespace:
  """Cross-checks and list arguments, before anything runs; raises :class:`cli.UserError` naming the value."""
  default = 'vmap,sequential,torch' if args.quick else 'vmap,tiled,sequential,torch,torch_plain'
  listed = ', '.join(JAX_BACKENDS + TORCH_BACKENDS) + ', tile<k> (k >= 1)'
  args.backends = _names(args.backends or default, _is_backend, listed, '--backends')
  if args.tiles:
    args.backends += [f'tile{t}' for t in _counts(args.tiles, '--tiles') if f'tile{t}' not in args.backends]
  args.workloads = _names(args.workloads, WORKLOADS.__contains__, ', '.join(WORKLOADS), '--workloads')
  args.skip = _names(args.skip, SECTIONS.__contains__, ', '.join(SECTIONS), '--skip') if args.skip.strip() else []
  args.memory_clients = _counts(args.memory_clients, '--memory-clients')
  args.clients = sorted(set(_counts(args.clients, '--clients'))) if args.clients is not None else None
  if args.max_rounds < args.min_rounds:
    raise cli.UserError(f'--max-rounds {args.max_rounds} is below --min-rounds {args.min_rounds}')
  device = args.torch_device
  if device is not None and not (device in ('cpu', 'cuda') or (device.startswith('cuda:') and device[5:].isdigit())):
    raise cli.UserError(f"--torch-device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
  args.json = _output_path(args.json)
  return args


def parse(argv=None) -> argparse.Namespace:
  """The command line, checked: a bad value is one line ``error: ...`` and exit status 2, before any measurement."""
  p = cli.Parser(prog='python -m fedjax_adapters.benchmarks.run', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  count, seconds = cli.int_at_least(1), cli.nonnegative_float
  p.add_argument('--json', required=True, help='where to write the results')
  p.add_argument('--quick', action='store_true', help='tiny sizes (the test suite runs this)')
  p.add_argument('--max-clients', type=count, default=1024, help='largest clients per round for the MNIST MLP')
  p.add_argument('--clients', default=None,
                 help='comma-separated clients per round to measure (default: the powers of 2 up to --max-clients / '
                      '--cifar-max-clients)')
  p.add_argument('--cifar-max-clients', type=count, default=None,
                 help='largest clients per round for the CIFAR CNN (default: --max-clients)')
  p.add_argument('--mnist-examples', type=count, default=200, help='rows per MNIST client (public code: ~200)')
  p.add_argument('--cifar-examples', type=count, default=2500, help='rows per CIFAR client (public code: 2500)')
  p.add_argument('--backends', default=None,
                 help='comma-separated subset of vmap,vmap_chunk1,tiled,tile<k>,sequential,torch,torch_plain '
                      '(default vmap,tiled,sequential,torch,torch_plain; quick: vmap,sequential,torch). vmap_chunk1: '
                      'chunked_clients(1); tiled: tiled_clients(), the tile sized for the cache; tile<k>: '
                      'tiled_clients(k); torch: the public code\'s preconditioned loop; torch_plain: the plain loop')
  p.add_argument('--tiles', default='', help='comma-separated tile sizes to time beside the others (adds tile<k> '
                 'backends; the checks compare the automatic tile with the best of them)')
  p.add_argument('--min-time', type=seconds, default=1.0, help='time each configuration at least this long (s)')
  p.add_argument('--passes', type=count, default=1,
                 help='time the backends of each cohort size in this many alternating passes (A B C A B C ...), '
                      'each --min-time / passes long; the best round over all passes counts')
  p.add_argument('--min-rounds', type=count, default=2)
  p.add_argument('--max-rounds', type=count, default=20)
  p.add_argument('--peak-size', type=count, default=None, help='matmul size for the peak (default 2048 CPU, 8192 GPU)')
  # The compute-bound wide MLP: the defaults fill a 2-core CPU; an accelerator gets WIDE_ACCELERATOR (4 clients of
  # a 2048-wide MLP reached only 4 % of an H200's peak: launch- and memory-bound, not compute-bound).
  p.add_argument('--wide-width', type=count, default=None, help='hidden width (default 2048 CPU, 8192 accelerator)')
  p.add_argument('--wide-clients', type=count, default=None, help='vmapped clients (default 4 CPU, 8 accelerator)')
  p.add_argument('--wide-batch', type=count, default=None, help='local batch (default 256 CPU, 4096 accelerator)')
  p.add_argument('--wide-examples', type=count, default=None, help='rows per client (default 512 CPU, 16384 accel.)')
  p.add_argument('--memory-clients', default='1,4,16,64', help='vmapped clients for the LLaMA memory curve')
  p.add_argument('--compile-rounds', type=count, default=100)
  p.add_argument('--compile-clients', type=count, default=8)
  p.add_argument('--torch-device', default=None, help="'cpu' or 'cuda' (default: cuda when torch sees a GPU)")
  p.add_argument('--workloads', default='mnist_mlp,cifar_cnn',
                 help='comma-separated throughput workloads: mnist_mlp,cifar_cnn (quick: mnist_mlp only)')
  p.add_argument('--skip', default='', help='comma-separated sections to skip: ' + ','.join(SECTIONS))
  args = p.parse_args(argv)
  try:
    return validate(args)
  except cli.UserError as e:
    p.error(str(e))


def _torch_setup(args, backends: list[str], log) -> tuple[list[str], dict | None, str]:
  """``(backends, torch facts, torch device)``: the runner's thread count set; the PyTorch loops dropped (and said
  so) when torch is not installed."""
  if not any(b in TORCH_BACKENDS for b in backends):
    return backends, None, 'cpu'
  try:
    from fedjax_adapters.benchmarks import torch_floral
    import torch
  except ImportError:
    log('torch is not installed (pip install -r requirements-bench.txt); skipping the PyTorch loops')
    return ([b for b in backends if b not in TORCH_BACKENDS],
            {'torch_version': None, 'torch_note': 'not installed; PyTorch loops skipped'}, 'cpu')
  device = args.torch_device or ('cuda' if torch.cuda.is_available() else 'cpu')
  return backends, dict(torch_floral.set_threads(usable_cores()), torch_device=device), device


def _equivalence(args, ctx) -> dict | None:
  if 'torch' not in ctx.backends:
    return None
  from fedjax_adapters.benchmarks import equivalence
  e = equivalence.run(ctx.torch_device, plain=not args.quick)
  ctx.log(f"equivalence (torch loop vs JAX, same initial weights, noise off): loss rel diff "
          f"{e['mlp_one_client']['loss_after_epoch_rel_diff']:.1e} (MLP), "
          f"{e['cnn_one_client']['loss_after_epoch_rel_diff']:.1e} (CNN); round params "
          f"{e['mlp_round']['global_params_max_rel_diff']:.1e}")
  return e


def _throughput(args, ctx) -> dict:
  if args.quick:  # the CNN's round takes ~10 s to compile on 2 cores; the quick path leaves it out
    loads = [(setups.mnist_mlp(examples=40, batch_size=16), [2])]
  else:
    cifar_cap = args.cifar_max_clients or args.max_clients
    loads = [(setups.mnist_mlp(examples=args.mnist_examples), args.clients or _powers(args.max_clients)),
             (setups.cifar_cnn(examples=args.cifar_examples), args.clients or _powers(cifar_cap))]
    loads = [(w, c) for w, c in loads if w.name in args.workloads]
  out = {}
  for w, clients in loads:
    ctx.log(f'throughput {w.name}: clients {clients}, backends {ctx.backends}')
    out[w.name] = throughput(w, clients, peak=ctx.peak, backends=ctx.backends, torch_device=ctx.torch_device,
                             log=ctx.log, passes=1 if args.quick else args.passes, cost_analysis=not args.quick,
                             **ctx.timing)
  return out


def _compute_bound(args, ctx) -> dict:
  reuse = _BUILT.get('mnist_mlp') if args.quick else None  # quick: time the throughput's round again, no compile
  size = dict(WIDE_CPU if jax.devices()[0].platform == 'cpu' else WIDE_ACCELERATOR)
  size.update({k: getattr(args, f'wide_{k}') for k in size if getattr(args, f'wide_{k}') is not None})
  w, m = setups.wide_mlp(size['width'], size['examples'], size['batch']), size['clients']
  if reuse is not None:
    w = setups.mnist_mlp(examples=40, batch_size=16)
  return compute_bound(w, m, peak_fn=lambda: flops_mod.matmul_peak(**ctx.peak_kw), log=ctx.log, reuse=reuse,
                       **ctx.timing)


def _memory(args, ctx) -> dict:
  from fedjax_adapters.benchmarks import llama_memory
  clients = [1, 2] if args.quick else args.memory_clients
  ctx.log(f'memory: LLaMA + LoRA, vmapped clients {clients}')
  mem = llama_memory.measure(llama_memory.default_config(args.quick), clients, single=not args.quick)
  ctx.log(f"  per added client {mem.get('per_client_slope_bytes', {}).get('total_bytes', 0) / 2**20:.1f} MiB; base "
          f"{mem['base_bytes'] / 2**20:.1f} MiB")
  return mem


def _compile(args, ctx) -> dict:
  w = setups.mnist_mlp(examples=args.mnist_examples)
  if args.quick:
    w = w.replace(input_shape=(4, 4, 1), hidden=(8,), examples=16, batch_size=8, name='tiny_mlp')
  rounds = 3 if args.quick else args.compile_rounds
  m = 2 if args.quick else args.compile_clients
  return {b: compile_run(w, m, 4 * m, rounds, b, ctx.log) for b in (('vmap',) if args.quick else
                                                                    ('vmap', 'sequential'))}


SECTION_RUNNERS = {'equivalence': _equivalence, 'throughput': _throughput, 'compute_bound': _compute_bound,
                   'memory': _memory, 'compile': _compile}


def _write(result: dict, path: str, t_start: float) -> None:
  """The JSON, rewritten atomically after every section, so a long or interrupted run keeps what it measured."""
  result['meta']['wall_s'] = time.perf_counter() - t_start
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, path)


def main(argv=None) -> dict:
  args = parse(argv)
  t_start = time.perf_counter()
  _listen()
  log = lambda s: print(s, flush=True)
  backends, torch_info, torch_device = _torch_setup(args, args.backends, log)
  result: dict[str, Any] = {'meta': {
      'started': datetime.datetime.now().isoformat(timespec='seconds'), 'argv': sys.argv[1:] if argv is None else argv,
      'quick': args.quick, 'load_average_before': _loadavg(), 'section_s': {}}}
  result['hardware'] = hardware(torch_info)
  log(f"hardware: {result['hardware']['cpu_model']}, {result['hardware']['usable_cores']} cores, "
      f"devices {result['hardware']['jax_devices']}, load {result['meta']['load_average_before']}")
  q = args.quick
  peak_kw = dict(size=args.peak_size or (256 if q else None), min_time=0.05 if q else 1.0, repeats=2 if q else 5)
  result['peak_matmul'] = flops_mod.matmul_peak(**peak_kw)
  peak = result['peak_matmul']['flops_per_s']
  log(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({result['peak_matmul']['size']}^2 f32)")
  timing = dict(min_time=0.0 if q else args.min_time, min_rounds=1 if q else args.min_rounds,
                max_rounds=1 if q else args.max_rounds)
  ctx = types.SimpleNamespace(backends=backends, torch_device=torch_device, peak=peak, peak_kw=peak_kw,
                              timing=timing, log=log)
  for name, section in SECTION_RUNNERS.items():
    _write(result, args.json, t_start)
    if name not in args.skip:
      t0 = time.perf_counter()
      value = section(args, ctx)
      if value is not None:
        result[name] = value
      result['meta']['section_s'][name] = time.perf_counter() - t0
  rebase_peak(result)
  result['checks'] = checks(result, args)
  result['meta']['load_average_after'] = _loadavg()
  _write(result, args.json, t_start)
  log(f"checks: {json.dumps(result['checks'], indent=1)}")
  log(f"wrote {args.json} in {result['meta']['wall_s']:.0f}s")
  return result


if __name__ == '__main__':
  cli.run_cli(main)
