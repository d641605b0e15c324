"""Trains FLoRAL / the Ensemble on a task and records how the routers find (or miss) the clusters.

Usage::

  python -m experiments.router_study.study --task mnist_offline_label_shift --method floral_1 --seeds 0 1 2 \
      --variant default --log-every 50 --json experiments/router_study/runs/ls_floral_1_default.json

Every ``--log-every`` rounds it records, per seed: the routers' probabilities ``[K, C]``, their matched assignment
accuracy (Hungarian matching of argmax-router to the true clusters), confusion, entropy and margin; the test accuracy
(overall and per cluster); each client's training loss with each adaptor alone (the assignment a loss-based, IFCA-like
rule would make); the test accuracy if every client used its cluster's matched adaptor (how good the adaptors are,
whatever the router); adaptor norms and distances; how often clients have been sampled. Seeds, data and training are
the runner's (``experiments/floral.py``), so the default variant reproduces its per-seed numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.router_study import diagnostics as dg
from experiments.router_study import variants
from fedjax_adapters.federated import client_data, evaluate, make_round
from fedjax_adapters.federated.sampling import clients_per_round


def with_logits(state, logits):
  """``state`` with every client's router logits replaced by ``logits: [K, C]``."""
  return state._replace(clients=dict(state.clients, logits=jnp.asarray(logits, jnp.float32)))


def one_hot_logits(num_clients: int, num_adaptors: int, c: int) -> np.ndarray:
  """Every client routed to adaptor ``c`` alone (the oracle router's -100 elsewhere)."""
  z = np.full((num_clients, num_adaptors), -100.0, np.float32)
  z[:, c] = 0.0
  return z


def per_adaptor(alg, state, data, num_adaptors: int) -> tuple[np.ndarray, np.ndarray]:
  """Each client's mean loss and accuracy on ``data`` with each adaptor alone: ``[K, C]`` each."""
  k = int(data.count.shape[0])
  losses, accs = [], []
  for c in range(num_adaptors):
    m = evaluate(alg, with_logits(state, one_hot_logits(k, num_adaptors, c)), data)
    n = np.maximum(np.asarray(m['count']), 1)
    losses.append(np.asarray(m['loss']) / n)
    accs.append(np.asarray(m.get('correct', np.zeros(k))) / n)
  return np.stack(losses, 1), np.stack(accs, 1)


def adaptor_geometry(global_params) -> dict:
  """FLoRAL's adaptors per layer: norms of ``A_c B_c`` and ``b_c``, the base kernel's norm, pairwise distances."""
  if 'adapters' not in global_params:
    return {}
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(global_params['adapters'])[0]
  layers = {}
  for path, leaf in flat:
    keys = [str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path]
    layers.setdefault('/'.join(keys[:-1]), {})[keys[-1]] = np.asarray(leaf, np.float64)
  for name, leaves in layers.items():
    if 'global_a' not in leaves:
      continue
    delta = np.einsum('cir,cro->cio', leaves['global_a'], leaves['global_b']).reshape(leaves['global_a'].shape[0], -1)
    rec = {'ab_norm': np.linalg.norm(delta, axis=1).round(5).tolist()}
    d = np.linalg.norm(delta[:, None] - delta[None], axis=-1)
    rec['ab_pairwise'] = d.round(5).tolist()
    if 'global_bias' in leaves:
      b = leaves['global_bias']
      rec['bias_norm'] = np.linalg.norm(b, axis=1).round(5).tolist()
      rec['bias_pairwise'] = np.linalg.norm(b[:, None] - b[None], axis=-1).round(5).tolist()
    out[name] = rec
  return out


def snapshot(alg, state, train, test, clusters, counts, temperature: float) -> dict:
  """Everything recorded at one log point."""
  k, c = np.asarray(state.clients['logits']).shape
  # A variant may add a server-held offset to every router (variants.with_balance); report the routers as used.
  offsets = [state.global_params.get(k, 0.0) for k in ('router_offset', 'router_bias')]  # library / prototype
  logits = np.asarray(state.clients['logits']) + sum(np.asarray(o) for o in offsets)
  probs = dg.softmax(logits, temperature)
  m = evaluate(alg, state, test)
  correct, count = np.asarray(m['correct']), np.asarray(m['count'])
  per_cluster = [float(correct[clusters == i].sum() / max(count[clusters == i].sum(), 1)) for i in range(c)]
  rec = {'test_accuracy': float(correct.sum() / count.sum()), 'test_accuracy_per_cluster': per_cluster,
         'router': dg.router_summary(probs, clusters), 'probs': probs.round(3).tolist()}
  train_loss, _ = per_adaptor(alg, state, train, c)
  rec['loss_based'] = dg.loss_summary(train_loss, probs, clusters)
  _, test_acc = per_adaptor(alg, state, test, c)
  # Test accuracy if each client used the adaptor matched to its cluster (the adaptors' quality, router aside),
  # and if each used the adaptor with its smallest training loss.
  w = count / count.sum()
  match = rec['router']['match']
  rec['test_accuracy_matched_adaptor'] = float(np.sum(w * test_acc[np.arange(k), np.asarray(match)[clusters]]))
  rec['test_accuracy_loss_argmin'] = float(np.sum(w * test_acc[np.arange(k), train_loss.argmin(-1)]))
  rec['adaptors'] = adaptor_geometry(state.global_params)
  rec['participation'] = {'mean': float(counts.mean()), 'min': int(counts.min()), 'max': int(counts.max())}
  return rec


def run_seed(task: str, method: str, variant: str, seed: int, rounds: int, log_every: int, log=print) -> dict:
  """One seed of one (method, variant): the curve of snapshots and the final test accuracy."""
  cfg = variants.task_config(task)
  data = variants.load_data(cfg, seed)
  train, test = client_data(data.train), client_data(data.test)
  rows = jax.tree.leaves(train.x)[0].shape[1]
  cfg = dataclasses.replace(cfg, batch_size=min(cfg.batch_size, rows), rounds=rounds)
  k = data.train.num_clients
  v = variants.build(variant, method, cfg, data, clients_per_round(k, cfg.fraction))
  state = v.algorithm.init(jax.random.key(seed), k)
  clusters = np.asarray(data.clusters)
  counts = np.zeros(k, np.int64)
  curve, t0 = [], time.time()
  for r in range(rounds + 1):
    if r % log_every == 0 or r == rounds:
      rec = dict(round=r, **snapshot(v.algorithm, state, train, test, clusters, counts, v.temperature))
      curve.append(rec)
      log(f'  {method}/{variant} seed {seed} round {r}: test {rec["test_accuracy"]:.4f} '
          f'assign {rec["router"]["assignment_accuracy"]:.3f} (loss-based {rec["loss_based"]["assignment_accuracy"]:.3f}) '
          f'H {rec["router"]["entropy_mean"]:.3f} matched-adaptor test {rec["test_accuracy_matched_adaptor"]:.4f} '
          f'({time.time() - t0:.0f} s)')
    if r == rounds:
      break
    state, metrics = v.step(state, train, r)
    np.add.at(counts, np.asarray(metrics['client_ids'])[np.asarray(metrics['client_mask'])], 1)
  return {'seed': seed, 'test_accuracy': curve[-1]['test_accuracy'], 'seconds': round(time.time() - t0, 1),
          'curve': curve}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--task', default='mnist_offline_label_shift')
  p.add_argument('--method', default='floral_1', help='floral_1, floral_10, ensemble (+ _oracle)')
  p.add_argument('--variant', default='default', help=f'one of: {", ".join(variants.VARIANTS)}')
  p.add_argument('--seeds', type=int, nargs='+', default=[0])
  p.add_argument('--rounds', type=int, default=None, help='default: the task\'s')
  p.add_argument('--log-every', type=int, default=50)
  p.add_argument('--json', required=True)
  p.add_argument('--code-version', default=None, help='recorded in the JSON (e.g. the git commit of the library)')
  args = p.parse_args(argv)
  if args.variant not in variants.VARIANTS:
    p.error(f'unknown variant {args.variant!r}; valid: {", ".join(variants.VARIANTS)}')
  rounds = args.rounds if args.rounds is not None else variants.task_config(args.task).rounds
  out = {'task': args.task, 'method': args.method, 'variant': args.variant, 'rounds': rounds,
         'code_version': args.code_version, 'hardware': f'{os.cpu_count()}-core CPU, jax {jax.__version__}',
         'variant_settings': variants.describe(args.variant), 'command': 'python -m experiments.router_study.study '
         + ' '.join(argv if argv is not None else os.sys.argv[1:]), 'runs': []}
  for seed in args.seeds:
    out['runs'].append(run_seed(args.task, args.method, args.variant, seed, rounds, args.log_every,
                                log=lambda s: print(s, flush=True)))
    finals = [r['test_accuracy'] for r in out['runs']]
    out['test_accuracy_mean'], out['test_accuracy_std'] = float(np.mean(finals)), float(np.std(finals))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f)
  print(f'{args.method}/{args.variant}: {100 * out["test_accuracy_mean"]:.1f} +- {100 * out["test_accuracy_std"]:.1f} '
        f'per seed {[round(100 * r["test_accuracy"], 1) for r in out["runs"]]}')
  return out


if __name__ == '__main__':
  main()
