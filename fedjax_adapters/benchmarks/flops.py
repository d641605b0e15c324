"""FLOP counting from the jaxpr, and the machine's dense-matmul peak measured with JAX.

XLA's ``compiled.cost_analysis()`` counts the body of a ``while`` loop once, not once per trip, so for a round whose
local training is a ``lax.scan`` over batches it undercounts by about the number of steps (the runner still records
it, labelled). :func:`jaxpr_flops` walks the traced program instead and multiplies scan bodies by their length. It
counts the multiply-adds of ``dot_general`` and ``conv_general_dilated`` (2 FLOPs each), which is where the
arithmetic of these models is; elementwise work, solves and reductions are left out, so the result is a lower
bound on the executed FLOPs (the usual "model FLOPs" convention).
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  contract = math.prod(lhs.shape[d] for d in lc)
  batch = math.prod(lhs.shape[d] for d in lb)
  lhs_free = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
  rhs_free = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
  return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  dn = eqn.params['dimension_numbers']
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
  kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  in_features = rhs.shape[rhs_spec[1]]
  return 2 * math.prod(out.shape) * kernel_spatial * in_features


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    vals = v if isinstance(v, (tuple, list)) else (v,)
    for j in vals:
      if isinstance(j, jax.extend.core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jax.extend.core.Jaxpr):
        yield j


def count_jaxpr(jaxpr, notes: dict | None = None) -> int:
  """Matmul + conv FLOPs of a jaxpr; scan bodies times their length, ``cond`` by its costliest branch."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'scan':
      total += eqn.params['length'] * count_jaxpr(eqn.params['jaxpr'].jaxpr, notes)
    elif name == 'cond':
      total += max(count_jaxpr(b.jaxpr, notes) for b in eqn.params['branches'])
    elif name == 'while':
      if notes is not None:  # trip count unknown from the jaxpr: counted once
        notes['while_loops_counted_once'] = notes.get('while_loops_counted_once', 0) + 1
      total += sum(count_jaxpr(j, notes) for j in _sub_jaxprs(eqn))
    else:
      total += sum(count_jaxpr(j, notes) for j in _sub_jaxprs(eqn))
  return total


def jaxpr_flops(fn, *args, **kwargs) -> tuple[int, dict]:
  """``(flops, notes)`` of ``fn(*args, **kwargs)`` as traced (no compilation, no execution)."""
  notes: dict[str, Any] = {}
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return count_jaxpr(closed.jaxpr, notes), notes


def xla_cost_flops(compiled) -> float | None:
  """``cost_analysis()['flops']`` of a compiled executable (while-loop bodies counted once), or None."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  return float(ca.get('flops', float('nan')))


def matmul_peak(size: int | None = None, *, dtype=jnp.float32, min_time: float = 1.0, repeats: int = 5) -> dict:
  """The achieved FLOP/s of a large square matmul, best of ``repeats`` timings (each at least ``min_time``/repeats).

  The default size is 2048 on CPU and 8192 on accelerators. The matmul runs at JAX's default precision, like the
  rounds it is compared with (on NVIDIA GPUs that may be TF32 for float32; recorded as ``precision``).
  """
  dev = jax.devices()[0]
  if size is None:
    size = 2048 if dev.platform == 'cpu' else 8192
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), dtype)
  b = jax.random.normal(kb, (size, size), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  flops = 2.0 * size ** 3
  t0 = time.perf_counter()
  f(a, b).block_until_ready()
  one = time.perf_counter() - t0
  per = max(1, int(math.ceil(min_time / repeats / max(one, 1e-6))))
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(per):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t0) / per)
  return {'size': size, 'dtype': jnp.dtype(dtype).name, 'seconds': best, 'flops': flops,
          'flops_per_s': flops / best, 'precision': str(jax.config.jax_default_matmul_precision),
          'calls_per_timing': per, 'repeats': repeats}


def self_check() -> None:
  """Sanity check of the counter on a matmul inside a scan (used by the tests)."""
  def f(x, w):
    def body(c, _):
      return c @ w, None
    return jax.lax.scan(body, x, None, length=3)[0]
  flops, _ = jaxpr_flops(f, np.zeros((4, 8), np.float32), np.zeros((8, 8), np.float32))
  assert flops == 3 * 2 * 4 * 8 * 8, flops
