"""Peak memory of a vmapped LoRA client step on a LLaMA model, as clients are added.

The model is ``fedjax_adapters.models.llama.Llama`` with a small random config, adapted FedDPA-style (a global and a
local LoRA on ``q_proj`` / ``v_proj``, r = 8, alpha = 16). One client step is: next-token loss, gradient with respect
to the client's adaptors only, an AdamW update. It is ``jax.vmap``-ed over clients with the frozen base broadcast
(``in_axes=None``), jitted, and compiled for each client count M from abstract shapes (nothing runs). Memory comes
from the compiled executable's ``memory_analysis()``: argument, output, temporary and aliased bytes.

If every client added a copy of the base, the per-client slope would be at least the base's size. The expected
slope is the client's adaptors + optimizer state (arguments and outputs), its data, and its activations and
gradients (temporaries); the JSON reports each next to the fitted slope.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_adapters.nn import AdapterSpec, adapt, split_model
from fedjax_adapters.experiments.runlib import memory

try:  # being written in parallel; fall back to a stand-in built from nnx.Linear with the same projection names
  from fedjax_adapters.models.llama import Llama, LlamaConfig
except ImportError:  # pragma: no cover - only without llama.py
  Llama = LlamaConfig = None

SPEC = AdapterSpec(target=r'.*\.(q_proj|v_proj)', rank=8, alpha=16, num_global=1, num_local=1)


def default_config(quick: bool = False) -> dict[str, int]:
  if quick:
    return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, seq_len=8, batch_size=1)
  # Base ~34M parameters (136 MB); LoRA r=8 on q/v of 2 layers; one client's batch: 2 sequences of 64 tokens.
  return dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=8, seq_len=64, batch_size=2)


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _abstract(tree, lead: int | None = None):
  def one(x):
    shape = x.shape if lead is None else (lead,) + tuple(x.shape)
    return jax.ShapeDtypeStruct(shape, x.dtype)
  return jax.tree.map(one, tree)


def build(cfg: dict[str, int]):
  """The adapted model split into a ModelDef, the frozen part and one client's trainable adaptors."""
  model_cfg = {k: v for k, v in cfg.items() if k not in ('seq_len', 'batch_size')}
  model = Llama(LlamaConfig(**model_cfg), rngs=nnx.Rngs(0))
  adapt(model, SPEC, key=jax.random.key(1))
  mdef, parts = split_model(model)
  frozen = {k: v for k, v in parts.items() if k not in ('adapters', 'local')}
  trainable = {'adapters': parts['adapters'], 'local': parts['local']}
  return mdef, frozen, trainable


def make_step(mdef, optimizer):
  """``step(frozen, trainable, opt_state, ids, mask) -> (trainable, opt_state, loss)`` for one client."""

  def loss_fn(trainable, frozen, ids, mask):
    logits, _ = mdef.apply({**frozen, **trainable}, ids, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    m = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

  def step(frozen, trainable, opt_state, ids, mask):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids, mask)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  return step


def per_client_slope(rows: list[dict], key: str) -> float | None:
  """The least-squares slope of ``row[key]`` against ``row['clients']`` (None with fewer than two rows)."""
  if len(rows) < 2:
    return None
  ms = np.array([r['clients'] for r in rows], float)
  vs = np.array([r[key] for r in rows], float)
  return float(np.polyfit(ms, vs, 1)[0])


def measure(cfg: dict[str, int], clients: list[int], single: bool = True) -> dict[str, Any]:
  t_start = time.perf_counter()
  mdef, frozen, trainable = build(cfg)
  optimizer = optax.adamw(1e-4)
  step = make_step(mdef, optimizer)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  b, t = cfg['batch_size'], cfg['seq_len']
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.int32)
  vstep = jax.jit(jax.vmap(step, in_axes=(None, 0, 0, 0, 0)))
  per_client = {'adapters_bytes': _nbytes(trainable), 'optimizer_state_bytes': _nbytes(opt_state),
                'data_bytes': _nbytes((ids, mask))}
  rows = []
  for m in clients:
    t0 = time.perf_counter()
    compiled = vstep.lower(_abstract(frozen), _abstract(trainable, m), _abstract(opt_state, m),
                           _abstract(ids, m), _abstract(mask, m)).compile()
    rows.append(dict(memory.memory_row(compiled, code=True), clients=m, compile_s=time.perf_counter() - t0))

  # One client without vmap: its temporaries are one client's activations + gradients (+ any base-sized scratch).
  single_temp = None
  if single:
    one = jax.jit(step).lower(_abstract(frozen), _abstract(trainable), _abstract(opt_state), ids, mask).compile()
    single_temp = int(one.memory_analysis().temp_size_in_bytes)

  base_bytes = _nbytes(frozen)
  slopes = {k: per_client_slope(rows, k) for k in ('argument_bytes', 'output_bytes', 'temp_bytes', 'total_bytes')}
  state = per_client['adapters_bytes'] + per_client['optimizer_state_bytes']
  expected_io = {'argument_bytes': state + per_client['data_bytes'], 'output_bytes': state + 4}
  out = {
      'model': 'fedjax_adapters.models.llama.Llama (random weights)',
      'config': cfg,
      'adapter_spec': {'target': SPEC.target, 'rank': SPEC.rank, 'alpha': SPEC.alpha, 'num_global': SPEC.num_global,
                       'num_local': SPEC.num_local},
      'optimizer': 'adamw (mu, nu per adaptor leaf)',
      'vmap_in_axes': '(None, 0, 0, 0, 0): frozen base broadcast; adaptors, optimizer state, data per client',
      'base_bytes': base_bytes,
      'per_client_expected': dict(per_client, single_client_temp_bytes=single_temp,
                                  expected_argument_bytes=expected_io['argument_bytes'],
                                  expected_output_bytes=expected_io['output_bytes']),
      'rows': rows,
      'per_client_slope_bytes': slopes,
      'seconds': time.perf_counter() - t_start,
  }
  if slopes['total_bytes'] is not None:
    out['slope_over_base'] = slopes['total_bytes'] / base_bytes
    out['temp_slope_over_single_client_temp'] = (slopes['temp_bytes'] / single_temp) if single_temp else None
    out['no_base_copy_per_client'] = bool(slopes['total_bytes'] < 0.5 * base_bytes)
  return out
