"""Compiled memory of one FedDPA training step for a LLaMA-7B-shaped base, each memory lever on and off.

No weights: the model is built from abstract shapes (``runlib.memory``), the vmapped step (global + local LoRA r 8
on q_proj / v_proj, AdamW, next-token loss) is lowered and compiled for the default backend at M = 1 and 2 clients,
and XLA's ``memory_analysis()`` gives ``fixed + M * per_client`` bytes. The table says how many clients per step fit
in a 141 GB (H200) device under each lever setting, and whether the ``paper`` config's 8 clients do. ``--micro-batch``
adds rows with gradient accumulation over micro-batches of that many sequences (``0``: the whole batch).

  python -m fedjax_adapters.benchmarks.feddpa_memory --out benchmarks/results/feddpa_memory_7b_cpu.json
  python -m fedjax_adapters.benchmarks.feddpa_memory --extrapolate A_2layers.json B_4layers.json   # 32-layer table
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import jax

from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.experiments.configs import feddpa as configs
from fedjax_adapters.experiments.runlib import memory
from fedjax_adapters.models.llama import LlamaConfig

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6)
H200_BYTES = 141 * 10 ** 9
H100_BYTES = 80 * 10 ** 9
LEVERS = (memory.Levers(), memory.Levers(base_dtype='bf16'), memory.Levers(remat='full'),
          memory.Levers(base_dtype='bf16', remat='full'), memory.Levers(base_dtype='bf16', remat='full', quantize='int8'))


def measure(layers: int, batch_size: int, seq_len: int, levers=LEVERS, micro_batches=(None,)) -> dict:
  """One row per (micro-batch, lever setting): ``memory.memory_model``'s figures at ``layers`` decoder layers."""
  cfg = configs.CONFIGS['paper']
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  config = LlamaConfig(**{**LLAMA_7B, 'num_hidden_layers': layers})
  rows = []
  for micro in micro_batches:
    for lv in levers:
      t0 = time.perf_counter()
      r = memory.memory_model(config, spec, lv, batch_size=batch_size, seq_len=seq_len, device_bytes=H200_BYTES,
                              micro_batch=micro)
      r.update(levers=vars(lv), micro_batch=micro, seconds=time.perf_counter() - t0,
               clients_8_bytes=r['fixed_bytes'] + 8 * r['per_client_bytes'])
      r['paper_8_clients_fit'] = r['clients_8_bytes'] <= H200_BYTES
      rows.append(r)
      print(json.dumps({k: r[k] for k in ('levers', 'micro_batch', 'fixed_bytes', 'per_client_bytes', 'max_clients',
                                           'clients_8_bytes', 'seconds')}), flush=True)
  return {'model': 'LLaMA-7B shape (abstract, no weights)', 'config': {**LLAMA_7B, 'num_hidden_layers': layers},
          'step': 'vmapped FedDPA client step: global + local LoRA r 8 alpha 16 on q_proj/v_proj, AdamW, next-token '
                  'CE, gradients of both adaptors', 'batch_size': batch_size, 'seq_len': seq_len,
          'device_bytes': H200_BYTES, 'backend': jax.default_backend(),
          'note': "compiled memory is the default backend's XLA memory_analysis (argument + output + temp - alias)",
          'uptime': subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip(), 'rows': rows}


def _key(row: dict) -> tuple:
  return row.get('micro_batch'), tuple(sorted(row['levers'].items(), key=lambda kv: kv[0]))


def extrapolate(small: dict, large: dict, layers: int = 32) -> list[dict]:
  """Per lever setting, ``fixed`` and ``per_client`` bytes at ``layers`` decoder layers, linear in the layer count
  through the two measured documents (every layer adds the same weights and activations), and what fits.

  Returns:
    rows ``{micro_batch, levers, fixed_gb, per_client_gb, one_client_gb, clients_141gb, clients_80gb}``.
  """
  la, lb = small['config']['num_hidden_layers'], large['config']['num_hidden_layers']
  other = {_key(r): r for r in large['rows']}
  out = []
  for a in small['rows']:
    b = other.get(_key(a))
    if b is None:
      continue
    at = {k: a[k] + (b[k] - a[k]) * (layers - la) / (lb - la) for k in ('fixed_bytes', 'per_client_bytes')}
    fit = {d: max(0, int((dev - at['fixed_bytes']) // at['per_client_bytes'])) for d, dev in
           (('clients_141gb', H200_BYTES), ('clients_80gb', H100_BYTES))}
    out.append({'micro_batch': a.get('micro_batch'), 'levers': a['levers'], 'fixed_gb': at['fixed_bytes'] / 1e9,
                'per_client_gb': at['per_client_bytes'] / 1e9,
                'one_client_gb': (at['fixed_bytes'] + at['per_client_bytes']) / 1e9, **fit})
  return out


def markdown(rows: list[dict], layers: int = 32) -> str:
  """The extrapolated rows as a markdown table."""
  lines = [f'| micro-batch | levers | fixed at {layers} layers (GB) | per client (GB) | 1 client (GB) | clients that fit '
           '141 GB | clients that fit 80 GB |', '|---|---|---|---|---|---|---|']
  for r in rows:
    lv = r['levers']
    name = ', '.join([lv['base_dtype']] + ([f'remat {lv["remat"]}'] if lv['remat'] else []) +
                     ([lv['quantize']] if lv['quantize'] else []))
    lines.append(f'| {r["micro_batch"] or "64 (none)"} | {name} | {r["fixed_gb"]:.1f} | {r["per_client_gb"]:.1f} | '
                 f'{r["one_client_gb"]:.1f} | {r["clients_141gb"]} | {r["clients_80gb"]} |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--layers', type=int, default=32)
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--seq-len', type=int, default=512)
  p.add_argument('--micro-batch', type=int, nargs='+', default=[0],
                 help='rows per micro-batch, one set of rows each (0: the whole batch; default: 0)')
  p.add_argument('--levers', choices=('all', 'best'), default='all',
                 help='all: every lever setting; best: none and bf16 + remat full + int8 (default: all)')
  p.add_argument('--extrapolate', nargs=2, metavar=('SMALL', 'LARGE'), default=None,
                 help='print the 32-layer table extrapolated from two documents of this benchmark and exit')
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)
  if args.extrapolate:
    docs = []
    for path in args.extrapolate:
      with open(path) as f:
        docs.append(json.load(f))
    table = markdown(extrapolate(*docs))
    print(table)
    return table
  levers = LEVERS if args.levers == 'all' else (LEVERS[0], LEVERS[-1])
  doc = measure(args.layers, args.batch_size, args.seq_len, levers, [m or None for m in args.micro_batch])
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(doc, f, indent=1)
  return doc


if __name__ == '__main__':
  main()
