"""Markdown tables from a benchmark JSON: ``python -m fedjax_adapters.benchmarks.table out/bench/cpu.json``."""
from __future__ import annotations

import json
import sys


def _f(x, fmt='{:.2f}'):
  return '—' if x is None else fmt.format(x)


def tables(r: dict) -> str:
  hw, pk = r['hardware'], r['peak_matmul']
  lines = [f"Hardware: {hw['cpu_model']}, {hw['usable_cores']} usable cores (JAX CPU threads {hw['jax_cpu_threads']}, "
           f"torch threads {hw.get('torch_threads')}), devices {hw['jax_devices']} ({hw['device_kind']}); "
           f"jax {hw['versions']['jax']}, torch {hw.get('torch_version')}; load average before/after "
           f"{r['meta']['load_average_before']} / {r['meta'].get('load_average_after')}; matmul peak "
           f"{pk['flops_per_s'] / 1e9:.1f} GFLOP/s ({pk['size']}² f32). Wall time {r['meta']['wall_s'] / 60:.1f} min.", '']
  for name, res in r.get('throughput', {}).items():
    w = res['workload']
    lines += [f"**{name}** ({w['examples']} rows per client, batch {w['batch_size']}, {w['steps_per_client']} steps per "
              f"client, C = {w['num_adaptors']}): client steps per second (best round), warm-up seconds in brackets", '',
              '| M | vmap | vmap, 1 client per step | sequential | torch | vmap / torch | vmap / sequential | '
              'vmap (1 per step) / sequential | vmap GFLOP/s | % of peak |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for row in res['rows']:
      def cell(b):
        e = row.get(b)
        return '—' if e is None else f"{e['steps_per_s']:.1f} ({e['warmup_s']:.1f}s)"
      v = row.get('vmap', {})
      lines.append(f"| {row['clients']} | {cell('vmap')} | {cell('vmap_chunk1')} | {cell('sequential')} | "
                   f"{cell('torch')} | {_f(row.get('ratio_vmap_over_torch'))} | "
                   f"{_f(row.get('ratio_vmap_over_sequential'))} | {_f(row.get('ratio_vmap_chunk1_over_sequential'))} | "
                   f"{_f(v.get('flops_per_s', 0) / 1e9, '{:.1f}')} | {_f(100 * v.get('fraction_of_peak', 0), '{:.0f}')} |")
    lines.append('')
  cb = r.get('compute_bound')
  if cb:
    w = cb['workload']
    lines += [f"**Compute-bound** ({w['name']}: {w['input_shape']} → {w['hidden']} → {w['num_classes']}, batch "
              f"{w['batch_size']}, {w['examples']} rows, M = {cb['clients']}): {cb['flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"**{100 * cb['fraction_of_peak']:.0f} %** of the matmul peak measured around it "
              f"({cb['peak_flops_per_s'] / 1e9:.1f} GFLOP/s).", '']
  mem = r.get('memory')
  if mem:
    lines += ['**Memory** (vmapped LoRA step on LLaMA, base broadcast; MiB):', '',
              '| clients | arguments | outputs | temporaries | total |', '|---|---|---|---|---|']
    for row in mem['rows']:
      lines.append(f"| {row['clients']} | {row['argument_bytes'] / 2**20:.1f} | {row['output_bytes'] / 2**20:.1f} | "
                   f"{row['temp_bytes'] / 2**20:.1f} | {row['total_bytes'] / 2**20:.1f} |")
    s, e = mem['per_client_slope_bytes'], mem['per_client_expected']
    if s.get('total_bytes') is not None:
      lines += ['', f"Per added client: {s['total_bytes'] / 2**20:.2f} MiB = arguments {s['argument_bytes'] / 2**20:.2f} "
                f"(adaptors {e['adapters_bytes'] / 2**20:.2f} + AdamW state {e['optimizer_state_bytes'] / 2**20:.2f} + "
                f"data {e['data_bytes'] / 2**20:.3f}) + outputs {s['output_bytes'] / 2**20:.2f} + temporaries "
                f"{s['temp_bytes'] / 2**20:.2f} (one un-vmapped client step's temporaries: "
                f"{_f((e.get('single_client_temp_bytes') or 0) / 2**20)}); the base is "
                f"{mem['base_bytes'] / 2**20:.1f} MiB, so a client costs {100 * mem['slope_over_base']:.1f} % of a base "
                f"copy.", '']
  comp = r.get('compile', {})
  if comp:
    lines += ['**Compilation** over a run:', '', '| backend | rounds | M | client_update traces | backend compiles | '
              'compile s | first round s | steady round s |', '|---|---|---|---|---|---|---|---|']
    for b, c in comp.items():
      lines.append(f"| {b} | {c['rounds']} | {c['clients_per_round']} | {c['client_update_traces']} | "
                   f"{c['backend_compiles']} | {c['compile_s']:.1f} | {c['first_round_s']:.1f} | "
                   f"{_f(c['steady_round_s_median'], '{:.3f}')} |")
    lines.append('')
  lines += ['**Checks**: `' + json.dumps(r['checks']) + '`']
  return '\n'.join(lines)


if __name__ == '__main__':
  print(tables(json.load(open(sys.argv[1]))))
