"""Compiled memory of one FedDPA training step, from abstract shapes (no weights), with the memory levers.

The step is the one a FedDPA client takes: the LLaMA base with a global and a local LoRA on the target projections,
next-token cross-entropy, gradients with respect to both adaptors (an upper bound: a FedDPA phase trains one of
them), and an AdamW update. It is ``jax.vmap``-ed over M clients with the frozen base broadcast, lowered from
``jax.ShapeDtypeStruct`` inputs and compiled for the default backend; the bytes come from XLA's
``compiled.memory_analysis()`` (argument + output + temporaries - aliased). Memory is affine in M (clients share the
base), so two compiles (M = 1, 2) give ``fixed + M * per_client`` and the largest M that fits a device.

Levers: ``base_dtype`` (storage of the frozen base; LoRA and AdamW state stay float32), ``remat`` (a policy of
``llama.REMAT_POLICIES``: recompute each decoder layer in the backward pass), ``quantize='int8'`` (per-channel int8
base linears, dequantized inside the matmul) or ``'int4'`` (4-bit blocks of 64 input rows with a scale and an offset,
packed two per byte; QLoRA-style). Micro-batching (``micro_batch``: gradient accumulation over
micro-batches in a ``lax.scan``) is not a lever of the base but of the step: its activations scale with the
micro-batch, not the batch.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_adapters.models import llama, quantized
from fedjax_adapters.nn import AdapterSpec, adapt
from fedjax_adapters.nn import layers as L

BASE_DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16}
QUANTIZE = (None, 'int8', 'int4', 'gguf')  # gguf: the base was loaded with the file's blocks kept
INT4_BLOCK = 64  # input rows per 4-bit block (QLoRA's block size)
_TRAINABLE = (L.GlobalAdapter, L.LocalAdapter)


@dataclasses.dataclass(frozen=True)
class Levers:
  """Memory levers. base_dtype: ``'f32'`` or ``'bf16'``; remat: None or a policy name; quantize: None, 'int8', 'int4'
  or 'gguf' (the base's linears hold a GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks: ``load_gguf(keep_quantized=True)``
  does that at load time, so :func:`apply_levers` leaves them as they are)."""
  base_dtype: str = 'f32'
  remat: str | None = None
  quantize: str | None = None

  def __post_init__(self):
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f'base dtype must be one of {sorted(BASE_DTYPES)}; got {self.base_dtype!r}.')
    if self.remat is not None and self.remat not in llama.REMAT_POLICIES:
      raise ValueError(f'remat policy must be one of {sorted(llama.REMAT_POLICIES)}; got {self.remat!r}.')
    if self.quantize not in QUANTIZE:
      raise ValueError(f'quantize must be one of {QUANTIZE}; got {self.quantize!r}.')


def apply_levers(model: nnx.Module, levers: Levers) -> nnx.Module:
  """Casts / quantizes the frozen base of an adapted LLaMA and sets its remat policy, in place."""
  if levers.quantize in ('int8', 'int4'):
    quantized.quantize_linears(model, bits=int(levers.quantize[3:]), block=INT4_BLOCK)
  if levers.base_dtype != 'f32':
    quantized.cast_frozen(model, BASE_DTYPES[levers.base_dtype], compute=True)
  llama.set_remat(model, levers.remat)
  return model


def abstract_adapted(config: llama.LlamaConfig, spec: AdapterSpec, levers: Levers):
  """(graphdef, trainable state, frozen state) of the adapted model as ``jax.ShapeDtypeStruct`` leaves."""
  graphdef, state = nnx.split(llama.abstract_llama(config))

  def make():
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))
    return apply_levers(adapt(model, spec, key=jax.random.key(0)), levers)

  model = nnx.eval_shape(make)
  return nnx.split(model, _TRAINABLE, ...)


def _step(graphdef, optimizer, micro_batch: int | None = None):
  """The client step; with ``micro_batch`` the batch's gradients are accumulated over micro-batches of that many
  rows in a ``lax.scan`` (each weighted by its tokens), as ``federated.make_client_update`` does."""
  def loss_fn(trainable, frozen, ids, mask):
    logits = nnx.merge(graphdef, trainable, frozen)(ids, mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    m = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0), jnp.sum(m)

  def grads(trainable, frozen, ids, mask):
    if micro_batch is None or micro_batch == ids.shape[0]:
      (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, ids, mask)
      return loss, g

    def body(acc, part):
      (loss, w), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, *part)
      return jax.tree.map(lambda a, b: a + b, acc, (w * loss, jax.tree.map(lambda x: w * x, g), w)), None

    parts = tuple(a.reshape((-1, micro_batch) + a.shape[1:]) for a in (ids, mask))
    init = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, trainable), jnp.zeros(()))
    (loss, g, w), _ = jax.lax.scan(body, init, parts)
    w = jnp.maximum(w, 1.0)
    return loss / w, jax.tree.map(lambda x: x / w, g)

  def step(frozen, trainable, opt_state, ids, mask):
    loss, g = grads(trainable, frozen, ids, mask)
    updates, opt_state = optimizer.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss
  return step


def _lead(tree, m):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((m,) + tuple(x.shape), x.dtype), tree)


def compiled_memory(config: llama.LlamaConfig, spec: AdapterSpec, levers: Levers, *, clients: int,
                    batch_size: int, seq_len: int, micro_batch: int | None = None) -> dict[str, int]:
  """XLA's memory analysis of one vmapped step of ``clients`` clients, each on ``[batch_size, seq_len]`` tokens
  (with ``micro_batch``: gradients accumulated over micro-batches of ``[micro_batch, seq_len]``).

  Returns:
    ``{'argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes', 'total_bytes'}`` read from
    ``compiled.memory_analysis()``; total = argument + output + temp - alias.
  """
  graphdef, trainable, frozen = abstract_adapted(config, spec, levers)
  optimizer = optax.adamw(1e-4)
  opt_state = jax.eval_shape(optimizer.init, trainable)
  data = jax.ShapeDtypeStruct((clients, batch_size, seq_len), jnp.int32)
  vstep = jax.jit(jax.vmap(_step(graphdef, optimizer, micro_batch), in_axes=(None, 0, 0, 0, 0)))
  return memory_row(vstep.lower(frozen, _lead(trainable, clients), _lead(opt_state, clients), data, data).compile())


def memory_row(compiled, *, code: bool = False) -> dict[str, int]:
  """XLA's ``memory_analysis`` of a compiled program as ``{argument,output,temp,alias}_bytes`` (and
  ``generated_code_bytes`` with ``code``) plus ``total_bytes`` = argument + output + temp - alias."""
  mem = compiled.memory_analysis()
  keys = ('argument', 'output', 'temp', 'alias') + (('generated_code',) if code else ())
  row = {f'{k}_bytes': int(getattr(mem, f'{k}_size_in_bytes', 0) or 0) for k in keys}
  row['total_bytes'] = row['argument_bytes'] + row['output_bytes'] + row['temp_bytes'] - row['alias_bytes']
  return row


def memory_model(config, spec, levers, *, batch_size: int, seq_len: int, device_bytes: int | None = None,
                 micro_batch: int | None = None) -> dict:
  """``fixed + M * per_client`` from compiles at M = 1 and 2, and the largest M within ``device_bytes``
  (``micro_batch``: rows per micro-batch of gradient accumulation, None for the whole batch).

  Returns:
    ``{'one': row(M=1), 'two': row(M=2), 'fixed_bytes', 'per_client_bytes', 'device_bytes', 'max_clients'}``;
    ``max_clients`` is 0 when even one client does not fit, None without ``device_bytes``.
  """
  shape = dict(batch_size=batch_size, seq_len=seq_len, micro_batch=micro_batch)
  one = compiled_memory(config, spec, levers, clients=1, **shape)
  two = compiled_memory(config, spec, levers, clients=2, **shape)
  per_client = max(two['total_bytes'] - one['total_bytes'], 1)
  fixed = one['total_bytes'] - per_client
  fit = None if device_bytes is None else max(0, (device_bytes - fixed) // per_client)
  return {'one': one, 'two': two, 'fixed_bytes': fixed, 'per_client_bytes': per_client,
          'device_bytes': device_bytes, 'max_clients': fit}


def device_memory_bytes(device: Any = None) -> int | None:
  """The device's memory (``memory_stats()['bytes_limit']``), or None where the backend does not say (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # backends without memory stats raise
    return None
  return stats.get('bytes_limit')
