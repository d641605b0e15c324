"""Markdown tables from a benchmark JSON: ``python -m fedjax_adapters.benchmarks.table out/bench/cpu.json``."""
from __future__ import annotations

import json
import sys


def _f(x, fmt='{:.2f}'):
  return '—' if x is None else fmt.format(x)


LABELS = {'vmap': 'vmap', 'vmap_chunk1': 'vmap, 1 client per step', 'tiled': 'tiled (auto)',
          'sequential': 'sequential', 'torch': 'torch (preconditioned)', 'torch_plain': 'torch (plain)'}
RATIOS = (('vmap', 'torch'), ('vmap', 'sequential'), ('vmap_chunk1', 'sequential'), ('tiled', 'torch_best'),
          ('tiled', 'vmap'), ('tiled', 'best_tile'))


def throughput_table(name: str, res: dict) -> list[str]:
  """One workload's rows: client steps per second of every backend run (warm-up in brackets), the ratios present,
  the automatic tile, and the vmapped round's GFLOP/s and share of the peak."""
  w, rows = res['workload'], res['rows']
  backends = [b for b in res['backends'] if any(b in row for row in rows)]
  ratios = [(a, b) for a, b in RATIOS if any(f'ratio_{a}_over_{b}' in row for row in rows)]
  tiled = any('plan' in row.get('tiled', {}) for row in rows)
  head = (['M'] + [LABELS.get(b, b.replace('tile', 'tile ')) for b in backends] +
          [f'{LABELS.get(a, a)} / {b.replace("_", " ")}' for a, b in ratios] + (['auto tile'] if tiled else []) +
          ['vmap GFLOP/s', '% of peak'])
  out = [f"**{name}** ({w['examples']} rows per client, batch {w['batch_size']}, {w['steps_per_client']} steps per "
         f"client, C = {w['num_adaptors']}): client steps per second (best round), warm-up seconds in brackets", '',
         '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [str(row['clients'])]
    cells += ['—' if b not in row else f"{row[b]['steps_per_s']:.1f} ({row[b]['warmup_s']:.1f}s)" for b in backends]
    cells += [_f(row.get(f'ratio_{a}_over_{b}')) + (f" ({row[b]})" if b in ('torch_best', 'best_tile') and b in row
                                                    else '') for a, b in ratios]
    if tiled:
      plan = row.get('tiled', {}).get('plan')
      cells.append('—' if not plan else f"{plan['tile']} × {plan['tiles']}")
    v = row.get('vmap', {})
    cells += [_f(v.get('flops_per_s', 0) / 1e9, '{:.1f}'), _f(100 * v.get('fraction_of_peak', 0), '{:.0f}')]
    out.append('| ' + ' | '.join(cells) + ' |')
  return out


def tables(r: dict) -> str:
  hw, pk = r['hardware'], r['peak_matmul']
  lines = [f"Hardware: {hw['cpu_model']}, {hw['usable_cores']} usable cores (JAX CPU threads {hw['jax_cpu_threads']}, "
           f"torch threads {hw.get('torch_threads')}), devices {hw['jax_devices']} ({hw['device_kind']}); "
           f"jax {hw['versions']['jax']}, torch {hw.get('torch_version')}; load average before/after "
           f"{r['meta']['load_average_before']} / {r['meta'].get('load_average_after')}; matmul peak "
           f"{pk['flops_per_s'] / 1e9:.1f} GFLOP/s ({pk['size']}² f32). Wall time {r['meta']['wall_s'] / 60:.1f} min.", '']
  for name, res in r.get('throughput', {}).items():
    lines += throughput_table(name, res) + ['']
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
