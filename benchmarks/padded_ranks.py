"""What padding heterogeneous LoRA ranks costs: FLoRA / HetLoRA rounds with every client padded to the largest rank
R (one compiled, vmapped round with a per-client rank mask) against the same clients at their true ranks, in one run.

Clients get the FLoRAL runner's ranks ``family_ranks(R, M)`` (R, R/2, R/4 by id mod 3). The true-rank form trains
each rank's clients in their own round, compiled at that rank with no padding (one round per distinct rank, run one
after another: the cheapest true-rank layout a single compiled program per shape allows; the server merge across
groups is left out, so it favours the true-rank side slightly). Measured side by side, per model, method and R:

* client LoRA parameter bytes: M clients at R against sum_k (bytes at r_k);
* XLA's ``memory_analysis`` of the compiled round(s): temporaries and total (argument + output + temp - alias); the
  true-rank form as the sum over its rounds and as their maximum (the peak when they run one after another);
* wall and process-CPU seconds per round (median over alternating passes, so the shared machine's load hits both).

Models: the MNIST MLP of the FLoRAL tasks (784-200-10 through ``VisionInput``, LoRA on its first layer (the
second, 200 -> 10, allows no rank above 10), 10 images per
client, one local step), and a tiny LLaMA decoder (2 layers, hidden 128, vocabulary 512, LoRA on q_proj / v_proj,
sequences of 32 tokens, 4 per client, batch 2) through the FedDPA runner's token-loss view. M = 12 clients.

Run: python benchmarks/padded_ranks.py --json benchmarks/results/padded_ranks_cpu_2core.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from fedjax_adapters import algorithms
from fedjax_adapters.data.federated import FederatedData
from fedjax_adapters.experiments import feddpa_family, floral_tasks
from fedjax_adapters.experiments.configs.floral import TASKS
from fedjax_adapters.experiments.runlib.memory import memory_row
from fedjax_adapters.federated import client_data, make_round
from fedjax_adapters.models import llama
from fedjax_adapters.nn.adapt import AdapterSpec

M = 12


def mlp_setup():
  """``(model_fn, common kwargs, ClientData, spec(rank))`` of the MNIST MLP on random images."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (M, 10, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, (M, 10)).astype(np.int32)
  data = client_data(FederatedData(x, y, np.full((M,), 10, np.int32)))
  fn = floral_tasks.model_fn(TASKS['mnist_offline_label_shift'])
  common = dict(loss='xent', lr=0.1, batch_size=10, train_arg='train')
  # LoRA on the first layer only (784 -> 200): the second (200 -> 10) allows no rank above 10.
  return fn, common, data, lambda r: AdapterSpec(target=r'.*layers\.0', rank=r, alpha=float(r), conv=False)


def llama_setup():
  """The same for a tiny LLaMA through ``feddpa_family.TokenLossView`` on random token sequences."""
  config = llama.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  base = llama.Llama(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 512, (M, 4, 32)).astype(np.int32)
  x = {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'loss_mask': (np.arange(32) >= 16).astype(np.int32)
       * np.ones_like(ids)}
  data = client_data(FederatedData(x, np.zeros((M, 4, 2), np.float32), np.full((M,), 4, np.int32)))
  common = dict(loss=feddpa_family.token_loss, eval_loss='mse', lr=0.01, batch_size=2)
  spec = lambda r: AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=r, alpha=16.0, conv=False, bias=False)
  return feddpa_family.view_fn(base), common, data, spec


def build(method: str, setup, rank: int, ranks: list[int], clients: np.ndarray):
  """A compiled round of ``method`` over ``clients`` (their ranks ``ranks``, padded to ``rank``): entry
  ``[round_fn, state, data, memory row, client LoRA bytes]``."""
  fn, common, data, spec = setup
  sub = client_data(jax.tree.map(lambda a: a[clients], tuple(data)))
  if method == 'flora':
    alg = algorithms.flora(fn, spec=spec(rank), ranks=ranks, **common)
  else:
    alg = algorithms.hetlora(fn, spec=spec(rank), ranks=ranks, prune_gamma=0.5, prune_lambda=0.01, **common)
  state = alg.init(jax.random.key(0), len(clients))
  round_fn = make_round(alg, clients_per_round=len(clients))
  row = memory_row(round_fn.compiled.lower(state, sub, None, None).compile())
  state, _ = round_fn(state, sub)  # compile + warm
  jax.block_until_ready(state)
  lora = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.global_params['adapters']))
  return [round_fn, state, sub, row, lora * len(clients)]


def time_round(entry) -> tuple[float, float]:
  round_fn, state, data = entry[:3]
  c0, w0 = time.process_time(), time.perf_counter()
  state, _ = round_fn(state, data)
  jax.block_until_ready(state)
  entry[1] = state
  return time.process_time() - c0, time.perf_counter() - w0


def measure(method: str, setup, big: int, passes: int) -> dict:
  """Padded against true-rank rounds of ``method`` at largest rank ``big``, timed in alternating passes."""
  ranks = floral_tasks.family_ranks(big, M)
  padded = build(method, setup, big, ranks, np.arange(M))
  groups = {r: np.flatnonzero(np.asarray(ranks) == r) for r in sorted(set(ranks), reverse=True)}
  true = [build(method, setup, r, [r] * len(ids), ids) for r, ids in groups.items()]
  times = {'padded': [], 'true': []}
  for _ in range(passes):
    times['padded'].append(time_round(padded))
    times['true'].append(tuple(map(sum, zip(*(time_round(e) for e in true)))))
  med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in times.items()}
  rows = [e[3] for e in true]
  out = {'method': method, 'max_rank': big, 'ranks': ranks,
         'lora_bytes': {'padded': padded[4], 'true': sum(e[4] for e in true)},
         'memory': {'padded': padded[3], 'true_sum': {k: sum(r[k] for r in rows) for k in rows[0]},
                    'true_max': {k: max(r[k] for r in rows) for k in rows[0]}},
         'seconds': {'padded_cpu': med['padded'][0], 'padded_wall': med['padded'][1], 'true_cpu': med['true'][0],
                     'true_wall': med['true'][1]}}
  out['ratios'] = {'lora_bytes': out['lora_bytes']['padded'] / out['lora_bytes']['true'],
                   'temp_vs_sum': padded[3]['temp_bytes'] / max(out['memory']['true_sum']['temp_bytes'], 1),
                   'total_vs_sum': padded[3]['total_bytes'] / out['memory']['true_sum']['total_bytes'],
                   'total_vs_max': padded[3]['total_bytes'] / out['memory']['true_max']['total_bytes'],
                   'cpu': med['padded'][0] / med['true'][0], 'wall': med['padded'][1] / med['true'][1]}
  return out


def markdown(rows: list[dict]) -> str:
  lines = ['| model | method | R | LoRA bytes padded / true | compiled total: padded / sum of true | padded / max of '
           'true | temporaries padded / sum | round CPU s padded / true (wall) |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    q = r['ratios']
    lines.append(f'| {r["model"]} | {r["method"]} | {r["max_rank"]} | {q["lora_bytes"]:.2f} | '
                 f'{q["total_vs_sum"]:.2f} | {q["total_vs_max"]:.2f} | {q["temp_vs_sum"]:.2f} | '
                 f'{q["cpu"]:.2f} ({q["wall"]:.2f}) |')
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--ranks', type=int, nargs='+', default=[8, 32, 64])
  p.add_argument('--models', nargs='+', default=['mlp', 'llama'], choices=['mlp', 'llama'])
  p.add_argument('--passes', type=int, default=7)
  p.add_argument('--json', default=None)
  args = p.parse_args()
  uptime = lambda: open('/proc/loadavg').read().split()[:3] if os.path.exists('/proc/loadavg') else None
  out = {'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'backend': jax.default_backend(),
                     'devices': [str(d) for d in jax.devices()], 'load_before': uptime()},
         'clients': M, 'passes': args.passes, 'rows': []}
  setups = {'mlp': mlp_setup, 'llama': llama_setup}
  for model in args.models:
    setup = setups[model]()
    for method in ('flora', 'hetlora'):
      for big in args.ranks:
        row = dict(model=model, **measure(method, setup, big, args.passes))
        out['rows'].append(row)
        print(json.dumps({k: row[k] for k in ('model', 'method', 'max_rank', 'ratios')}), flush=True)
  out['machine']['load_after'] = uptime()
  print(markdown(out['rows']))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
