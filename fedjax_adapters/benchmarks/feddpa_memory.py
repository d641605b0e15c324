"""Compiled memory of one FedDPA training step for a LLaMA-7B-shaped base, each memory lever on and off.

No weights: the model is built from abstract shapes (``runlib.memory``), the vmapped step (global + local LoRA r 8
on q_proj / v_proj, AdamW, next-token loss) is lowered and compiled for the default backend at M = 1 and 2 clients,
and XLA's ``memory_analysis()`` gives ``fixed + M * per_client`` bytes. The table says how many clients per step fit
in a 141 GB (H200) device under each lever setting, and whether the ``paper`` config's 8 clients do.

  python -m fedjax_adapters.benchmarks.feddpa_memory --out benchmarks/results/feddpa_memory_7b_cpu.json
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
LEVERS = (memory.Levers(), memory.Levers(base_dtype='bf16'), memory.Levers(remat='full'),
          memory.Levers(base_dtype='bf16', remat='full'), memory.Levers(base_dtype='bf16', remat='full', quantize='int8'))


def measure(layers: int, batch_size: int, seq_len: int, levers=LEVERS) -> dict:
  cfg = configs.CONFIGS['paper']
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  config = LlamaConfig(**{**LLAMA_7B, 'num_hidden_layers': layers})
  rows = []
  for lv in levers:
    t0 = time.perf_counter()
    r = memory.memory_model(config, spec, lv, batch_size=batch_size, seq_len=seq_len, device_bytes=H200_BYTES)
    r.update(levers=vars(lv), seconds=time.perf_counter() - t0,
             clients_8_bytes=r['fixed_bytes'] + 8 * r['per_client_bytes'])
    r['paper_8_clients_fit'] = r['clients_8_bytes'] <= H200_BYTES
    rows.append(r)
    print(json.dumps({k: r[k] for k in ('levers', 'fixed_bytes', 'per_client_bytes', 'max_clients',
                                         'clients_8_bytes', 'seconds')}), flush=True)
  return {'model': 'LLaMA-7B shape (abstract, no weights)', 'config': {**LLAMA_7B, 'num_hidden_layers': layers},
          'step': 'vmapped FedDPA client step: global + local LoRA r 8 alpha 16 on q_proj/v_proj, AdamW, next-token '
                  'CE, gradients of both adaptors', 'batch_size': batch_size, 'seq_len': seq_len,
          'device_bytes': H200_BYTES, 'backend': jax.default_backend(),
          'note': "compiled memory is the default backend's XLA memory_analysis (argument + output + temp - alias)",
          'uptime': subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip(), 'rows': rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--layers', type=int, default=32)
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--seq-len', type=int, default=512)
  p.add_argument('--out', default=None)
  args = p.parse_args(argv)
  doc = measure(args.layers, args.batch_size, args.seq_len)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(doc, f, indent=1)
  return doc


if __name__ == '__main__':
  main()
