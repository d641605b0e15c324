"""Helpers shared by algorithms built on an NNX model factory."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedjax_adapters.nn.adapt import AdapterSpec, ModelDef, adapt, build_and_split, split_model

ModelFn = Callable[[nnx.Rngs], nnx.Module]


_MAKERS: dict = {}


def build(model_fn: ModelFn, key: jax.Array, spec: AdapterSpec | None = None) -> tuple[ModelDef, dict]:
  """Builds (and adapts) a model from ``key`` and splits it into a :class:`ModelDef` and pure-dict parts.

  The build runs inside one cached ``jax.jit`` per ``(model_fn, spec)`` (see :func:`build_and_split`).
  """
  if (model_fn, spec) not in _MAKERS:
    def make(k):
      model = model_fn(nnx.Rngs(params=k, dropout=jax.random.fold_in(k, 7)))
      if spec is not None:
        adapt(model, spec, key=jax.random.fold_in(k, 1))
      return model
    _MAKERS[(model_fn, spec)] = make
  return build_and_split(_MAKERS[(model_fn, spec)], key)


# Stream name of input-level randomness (data augmentation) that every member of an ensemble shares.
AUGMENT_STREAM = 'augment'
_MODEL_KEY_SALT = 0x6D0D  # model-call randomness is drawn from fold_in(step key, salt), apart from router noise


def takes_call_rngs(mdef: ModelDef) -> bool:
  """Whether the model's ``__call__`` takes an ``rngs`` keyword.

  Every model in ``fedjax_adapters.models`` does (``model(x, *, train, rngs)``); the algorithms then pass fresh
  call-time randomness (dropout, augmentation) at every training step.
  """
  model = mdef.merge({})
  try:
    params = inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    return False
  p = params.get('rngs')
  return p is not None and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def call_rngs(key: jax.Array | None, *, shared_key: jax.Array | None = None) -> nnx.Rngs | None:
  """Call-time randomness of one training forward pass from the step's PRNG ``key`` (``None`` passes through).

  The model's streams (``dropout``, ...) draw from ``fold_in(key, salt)``, so they never reuse the key of FLoRAL's
  router noise. ``shared_key`` (an ensemble's one key for all members) feeds the ``augment`` stream, so members see
  the same augmented batch while their dropout masks differ.

  Without call-time ``rngs``, an NNX model split into pure dicts would restart its construction-time RNG state on
  every call and draw the same dropout mask at every step.
  """
  if key is None:
    return None
  streams = {'default': jax.random.fold_in(key, _MODEL_KEY_SALT)}
  if shared_key is not None:
    streams[AUGMENT_STREAM] = jax.random.fold_in(shared_key, _MODEL_KEY_SALT + 1)
  return nnx.Rngs(**streams)


def call_kwargs(train_arg: str | None, train: bool, rngs: nnx.Rngs | None = None) -> dict:
  """Keyword arguments of one model call: ``{train_arg: train}`` and, in training, ``rngs`` when given."""
  kwargs = {train_arg: train} if train_arg else {}
  if train and rngs is not None:
    kwargs['rngs'] = rngs
  return kwargs


def broadcast_clients(tree: Any, num_clients: int) -> Any:
  """The same per-client initial state for ``num_clients`` clients: ``[...] -> [K, ...]``."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def stats_override(stats: dict, where: tuple[str, ...] = ('stats',)) -> dict:
  """Batch-norm statistics as a nested override of the global params (``{}`` if the model has none)."""
  if not stats:
    return {}
  out: Any = stats
  for k in reversed(where):
    out = {k: out}
  return out


def sgd_or_zero(lr: float) -> optax.GradientTransformation:
  """SGD (no momentum, as in FLoRAL's clients), or a frozen group when ``lr == 0``."""
  return optax.set_to_zero() if lr == 0 else optax.sgd(lr)


def client_optimizer_or(client_optimizer: optax.GradientTransformation | None, lr: float | None,
                        default: Callable[[], optax.GradientTransformation]) -> optax.GradientTransformation:
  """The user's client optimizer, or the algorithm's default built from ``lr`` (exactly one of them)."""
  if client_optimizer is not None:
    if lr is not None:
      raise ValueError('pass lr (for the built-in client optimizer) or client_optimizer, not both.')
    return client_optimizer
  if lr is None or not float(lr) > 0:
    raise ValueError(f'the client learning rate lr must be > 0 (or pass client_optimizer=); got {lr}.')
  return default()


def check_clusters(clusters, num_clients: int, num_adaptors: int):
  """The oracle's true cluster per client, checked on the host (numpy, so it also works while ``init`` is traced)."""
  c = np.asarray(clusters)
  if c.shape != (num_clients,):
    raise ValueError(f'oracle clusters have shape {tuple(c.shape)} but there are {num_clients} clients.')
  if int(c.min()) < 0 or int(c.max()) >= num_adaptors:
    raise ValueError(f'oracle clusters must lie in [0, {num_adaptors}); got range [{int(c.min())}, {int(c.max())}].')
  return c


def check_one_lora(spec: AdapterSpec, name: str, *, bias: bool = True) -> None:
  """Raises ValueError unless ``spec`` is one global LoRA per layer (no local or routed adaptors; no bias adaptor
  when ``bias`` is False): what the single-LoRA algorithms (LoRA-FedAvg, FedSA-LoRA, Ditto, FLoRA, HetLoRA) train."""
  if spec.num_global != 1 or spec.num_local or spec.router or (spec.bias and not bias):
    raise ValueError(f'{name} trains one global LoRA per layer; got num_global={spec.num_global}, '
                     f'num_local={spec.num_local}, router={spec.router}' + ('' if bias else f', bias={spec.bias}') + '.')
