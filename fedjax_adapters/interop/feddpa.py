"""FedDPA's trained adapters out as PEFT folders: the global LoRA, every client's local LoRA, and the base model.

This is the one module that reads a FedDPA object and its ``ServerState`` (:func:`feddpa_parts`); everything else
in ``fedjax_adapters.interop`` works on pure parts.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import jax
from flax import nnx

from fedjax_adapters.interop import peft
from fedjax_adapters.models.llama import LlamaConfig
from fedjax_adapters.models.llama_loaders import llama_from_base_parts, save_hf_checkpoint

PathLike = str | os.PathLike


def feddpa_parts(fd, state) -> tuple[Any, dict, dict, str | None]:
  """``(model definition, global parts {'base', 'adapters'}, stacked local adaptors [K, ...], variant)``.

  Reads ``fd.mdef`` (or ``fd.model``), ``fd.variant`` and the state's ``frozen`` / ``global_params`` /
  ``clients['local']`` (``fd.spec.alpha`` in :func:`export_feddpa`): the coupling to the FedDPA builder lives in
  this module only.
  """
  mdef = getattr(fd, 'mdef', None) or getattr(fd, 'model', None)
  if mdef is None:
    raise ValueError(f'{type(fd).__name__} carries no model definition (mdef / model).')
  parts = {**dict(state.frozen), **dict(state.global_params)}
  return mdef, parts, state.clients['local'], getattr(fd, 'variant', None)


def adapter_alpha(mdef) -> float | None:
  """The LoRA alpha the adapted model was built with, read off its layers (scale times rank).

  An unscaled model (``AdapterSpec(alpha=None)``) reads as ``alpha = r``, which gives the same scale of 1.
  """
  alphas = set()
  for _, node in nnx.iter_graph(mdef.merge({})):
    scale = getattr(node, 'scale', None)
    b = getattr(node, 'global_b', None)
    b = getattr(node, 'local_b', None) if b is None else b
    if isinstance(scale, float) and b is not None:
      alphas.add(round(scale * b.get_value().shape[-2], 6))
  if len(alphas) != 1:
    raise ValueError(f'expected one LoRA alpha across adapted layers, found {sorted(alphas)}.')
  return alphas.pop()


def export_feddpa(directory: PathLike, fd, state, *, clients: Sequence[int] | None = None,
                  write_base: bool = False, tokenizer=None,
                  base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """Writes a FedDPA run's adapters as PEFT folders (and optionally the base model) under ``directory``.

  Layout::

    directory/base/               config.json + model.safetensors (+ tokenizer), with write_base
    directory/global/             adapter_config.json + adapter_model.safetensors (not for variant 'local')
    directory/local/client_<k>/   one per client (not for variant 'fedit')
    directory/manifest.json       what was written, the LoRA r / alpha, and how FedDPA mixes the two

  Args:
    directory: output folder (created).
    fd: what :func:`fedjax_adapters.algorithms.feddpa.feddpa` returned.
    state: its trained ``ServerState``.
    clients: which clients' local adapters to write (default: all).
    write_base: also write the frozen base as a Hugging Face folder (for a base loaded from GGUF or built here).
    tokenizer: saved into the base folder when given.
    base_model_name_or_path: recorded in the adapter configs (default: the written base folder, if any).

  Returns:
    The manifest (also written to ``manifest.json``).
  """
  mdef, parts, local, variant = feddpa_parts(fd, state)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  spec = getattr(fd, 'spec', None)
  alpha = spec.alpha if spec is not None and spec.alpha is not None else adapter_alpha(mdef)
  manifest = {'variant': variant, 'lora_alpha': alpha, 'global': None, 'local': {}, 'base': base_model_name_or_path}
  if write_base:
    config = mdef.merge({}).config
    if not isinstance(config, LlamaConfig):
      raise ValueError(f'write_base needs a Llama model; the model carries config {config!r}.')
    save_hf_checkpoint(directory / 'base', llama_from_base_parts(config, parts['base']), tokenizer=tokenizer)
    manifest['base'] = base_model_name_or_path or str((directory / 'base').resolve())
  common = dict(alpha=alpha, task_type='CAUSAL_LM', base_model_name_or_path=manifest['base'])
  if variant != 'local':
    peft.export_global_adapter(directory / 'global', parts, **common)
    manifest['global'] = 'global'
  if variant != 'fedit':
    num_clients = int(jax.tree.leaves(local)[0].shape[0])
    for k in range(num_clients) if clients is None else clients:
      peft.export_local_adapter(directory / 'local' / f'client_{k}', {**parts, 'local': local}, client=int(k),
                                **common)
      manifest['local'][int(k)] = f'local/client_{k}'
  manifest['mixing'] = ('FedDPA weighs the adapters per prompt: y = W0 x + w dG(x) + (1 - w) dL(x), '
                        'w = lambda * mean cosine similarity to the client\'s references. A fixed w: '
                        'PeftModel.add_weighted_adapter(["global", "local"], [w, 1 - w], "mixed", '
                        'combination_type="cat") (see docs/interop.md).')
  (directory / 'manifest.json').write_text(json.dumps(manifest, indent=2))
  return manifest
