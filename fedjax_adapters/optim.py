"""Optimizer pieces as optax transformations: FLoRAL's LoRA gradient preconditioner and parameter-group helpers."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_GROUPS = ('global', 'local')


def _small_inverse(m):
  """``inv(m)`` of small symmetric positive definite ``[..., r, r]`` matrices (Gauss-Jordan elimination).

  Plain XLA ops, not LAPACK: on jax 0.10.2 a batched LAPACK factorization splits its batch over XLA:CPU's intra-op
  threads and blocks until the pieces finish, so independent factorizations running at once on every thread
  deadlock the process (docs/compiled_loop.md). No pivoting: the matrices here (``B^T B + eps I``) are SPD.
  Unrolled up to 16 steps per loop iteration: XLA:CPU's per-iteration loop overhead would otherwise dominate;
  unrolled, it is faster than the LAPACK call (a [30, 4] batch of 15 x 15: 0.6 ms against 1.1 ms).
  """
  r = m.shape[-1]
  aug = jnp.concatenate([m, jnp.broadcast_to(jnp.eye(r, dtype=m.dtype), m.shape)], axis=-1)  # [..., r, 2r]

  def eliminate(k, aug):
    row = jax.lax.dynamic_index_in_dim(aug, k, axis=-2, keepdims=False)
    row = row / jax.lax.dynamic_index_in_dim(row, k, axis=-1)
    col = jax.lax.dynamic_index_in_dim(aug, k, axis=-1)  # [..., r, 1]
    return jax.lax.dynamic_update_index_in_dim(aug - col * row[..., None, :], row, k, axis=-2)

  return jax.lax.fori_loop(0, r, eliminate, aug, unroll=min(r, 16))[..., r:]


def _matmul_small(x, y):
  """``x @ y`` with a small inner dimension r, as a broadcast multiply and sum (fuses into one loop).

  ``[..., n, r] @ [..., r, k]``. XLA:CPU runs these tiny-contraction products, and triangular solves with a wide
  right-hand side (``solve(m [r, r], g^T [r, d_in])``), far below its matmul speed; the latter took 0.05-0.5 s a call
  on a loaded 2-core CPU and made a wide-MLP FLoRAL round 7x slower (``benchmarks/``).
  """
  return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


def _precondition_pair(ga, gb, a, b, eps):
  if a.ndim == 3:  # dense / embedding: a [C, d_in, r], b [C, r, d_out]; delta W = a @ b
    r = a.shape[-1]
    eye = eps * jnp.eye(r, dtype=a.dtype)
    # PyTorch layout A = a^T, B = b^T: g_A <- (B^T B + eps I)^-1 g_A  and  g_B <- g_B (A A^T + eps I)^-1.
    # Invert the r x r matrices, then multiply (the same as solving, much faster than a wide-RHS solve).
    ga = _matmul_small(ga, _small_inverse(jnp.einsum('cro,cso->crs', b, b) + eye))
    gb = _matmul_small(_small_inverse(jnp.einsum('cir,cis->crs', a, a) + eye), gb)
    return ga, gb
  if a.ndim == 5:  # conv: a [C, 1, k_w, C_in, r], b [C, k_h, 1, r, C_out]; scale by the other factor's Gram norm
    pa = jnp.einsum('chwro,chwso->crs', b, b)
    pb = jnp.einsum('chwir,chwis->crs', a, a)
    na = jnp.sqrt(jnp.sum(pa * pa, axis=(1, 2)))
    nb = jnp.sqrt(jnp.sum(pb * pb, axis=(1, 2)))
    ga = ga / (na + eps).reshape((-1,) + (1,) * (ga.ndim - 1))
    gb = gb / (nb + eps).reshape((-1,) + (1,) * (gb.ndim - 1))
    return ga, gb
  raise ValueError(f'cannot precondition adaptor factors of rank {a.ndim} (expected 3 or 5 dims).')


def lora_preconditioner(eps: float = 1e-5) -> optax.GradientTransformation:
  """FLoRAL's scaled-GD preconditioning of LoRA gradients (``floral/training/precondlora_trainer.py``).

  For every pair ``{group}_a`` / ``{group}_b`` in a nested dict of adaptor params (as :func:`split_model` names
  them): dense ``g_A <- (B^T B + eps I)^{-1} g_A``, ``g_B <- g_B (A A^T + eps I)^{-1}`` per adaptor; conv factors
  divided by the Frobenius norm of the other factor's Gram matrix (+ eps). Biases pass through. Needs ``params``.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def walk(g, p, eps):
    if isinstance(g, optax.MaskedNode):
      return g
    if isinstance(g, (tuple, list)):
      return type(g)(walk(gi, pi, eps) for gi, pi in zip(g, p))
    if not isinstance(g, dict):
      return g
    out = {k: walk(v, p[k], eps) for k, v in g.items()}
    for grp in _GROUPS:
      ka, kb = f'{grp}_a', f'{grp}_b'
      if ka in g and kb in g and not isinstance(g[ka], optax.MaskedNode):
        out[ka], out[kb] = _precondition_pair(g[ka], g[kb], p[ka], p[kb], eps)
    return out

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('lora_preconditioner needs params (the current adaptor factors).')
    return walk(updates, params, eps), state

  return optax.GradientTransformation(init_fn, update_fn)


def label_tree(tree: Any, label: str) -> Any:
  """A pytree of the same structure with every leaf replaced by ``label`` (for ``optax.multi_transform``)."""
  return jax.tree.map(lambda _: label, tree)
