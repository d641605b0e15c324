"""Router diagnostics in NumPy: how well router logits (or per-adaptor losses) recover the true clusters.

Adaptors carry no names, so a router is scored against the best one-to-one matching of adaptors to clusters
(Hungarian matching over the ``[C, C]`` confusion matrix of true cluster vs. chosen adaptor).
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
  """``softmax(logits / T)`` over the last axis, ``[..., C] -> [..., C]``."""
  z = np.asarray(logits, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def confusion(choice: np.ndarray, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
  """``[C, C]`` counts: row = true cluster, column = chosen adaptor."""
  m = np.zeros((num_clusters, num_clusters), np.int64)
  np.add.at(m, (np.asarray(clusters), np.asarray(choice)), 1)
  return m


def matched_accuracy(choice: np.ndarray, clusters: np.ndarray, num_clusters: int) -> tuple[float, list[int]]:
  """Share of clients whose chosen adaptor is their cluster's under the best cluster -> adaptor matching.

  Returns:
    ``(accuracy, match)`` with ``match[c]`` the adaptor matched to cluster ``c``.
  """
  m = confusion(choice, clusters, num_clusters)
  rows, cols = linear_sum_assignment(-m)
  match = [int(c) for _, c in sorted(zip(rows, cols))]
  return float(m[rows, cols].sum() / max(m.sum(), 1)), match


def router_summary(probs: np.ndarray, clusters: np.ndarray) -> dict:
  """Assignment accuracy, confusion, entropy and margin of routers ``probs: [K, C]`` against ``clusters: [K]``.

  ``per_cluster_accuracy[c]``: share of cluster ``c``'s clients on the adaptor matched to ``c``. ``used_adaptors``:
  how many adaptors are some client's argmax (fewer than ``C`` means clusters share an adaptor).
  """
  probs = np.asarray(probs, np.float64)
  k, c = probs.shape
  choice = probs.argmax(-1)
  acc, match = matched_accuracy(choice, clusters, c)
  conf = confusion(choice, clusters, c)
  ent = -np.sum(probs * np.log(np.maximum(probs, 1e-30)), -1)
  top2 = np.sort(probs, -1)[:, -2:] if c > 1 else np.concatenate([np.zeros((k, 1)), probs], -1)
  margin = top2[:, 1] - top2[:, 0]
  per_cluster = [float(conf[i, match[i]] / max(conf[i].sum(), 1)) for i in range(c)]
  return {'assignment_accuracy': acc, 'match': match, 'confusion': conf.tolist(),
          'per_cluster_accuracy': per_cluster, 'used_adaptors': int(len(np.unique(choice))),
          'entropy_mean': float(ent.mean()), 'entropy_max': float(np.log(c)),
          'margin_mean': float(margin.mean()), 'margin_min': float(margin.min()),
          'max_prob_mean': float(probs.max(-1).mean())}


def loss_summary(losses: np.ndarray, probs: np.ndarray, clusters: np.ndarray) -> dict:
  """What the adaptors' losses say: ``losses: [K, C]`` (client k's mean training loss with adaptor c alone).

  ``assignment_accuracy``: the matched accuracy of ``argmin_c losses`` (the assignment IFCA would make).
  ``router_agrees``: share of clients whose router argmax is that argmin. ``gap_mean``: mean over clients of the
  second-smallest minus the smallest loss (how strongly the data single out one adaptor).
  """
  losses = np.asarray(losses, np.float64)
  c = losses.shape[1]
  best = losses.argmin(-1)
  acc, match = matched_accuracy(best, clusters, c)
  s = np.sort(losses, -1)
  gap = s[:, 1] - s[:, 0] if c > 1 else np.zeros(len(s))
  return {'assignment_accuracy': acc, 'match': match, 'router_agrees': float(np.mean(best == probs.argmax(-1))),
          'gap_mean': float(gap.mean()), 'loss_min_mean': float(s[:, 0].mean()),
          'loss_mean': float(losses.mean())}
