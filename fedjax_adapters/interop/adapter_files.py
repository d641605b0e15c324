"""PEFT adapter folders read with every file checked, so a bad file fails with its name and the layer in question.

A PEFT LoRA folder (Hu et al., "LoRA", arXiv 2106.09685, in the on-disk form of Hugging Face PEFT) holds
``adapter_config.json`` and ``adapter_model.safetensors``. Its tensors are named
``base_model.model.<module path>.<part>`` with ``<part>`` one of

* ``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``, ``lora_B.bias [d_out]`` (a linear layer's LoRA);
* ``lora_embedding_A [r, V]``, ``lora_embedding_B [D, r]`` (an embedding's LoRA);
* ``base_layer.weight``: the layer's own weight, which PEFT saves beside an embedding / output-layer LoRA
  (``save_embedding_layers='auto'``) in case the vocabulary was resized;
* ``lora_magnitude_vector [d_out]``: DoRA, which is not a plain LoRA and is refused naming the layer.

:func:`read_adapter_config` and :func:`read_adapter_tensors` check what a folder holds before anything uses it:
JSON that parses to an object with numeric ``r`` / ``lora_alpha``; a complete safetensors file (a truncated one is
named); floating-point, finite tensors of the right rank; ``lora_A`` and ``lora_B`` present together with one rank.
Each failure is one ``ValueError`` naming the file and the tensor or layer.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, NamedTuple

import numpy as np

PathLike = str | os.PathLike
ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PARTS = ('lora_A.weight', 'lora_B.weight', 'lora_B.bias', 'lora_embedding_A', 'lora_embedding_B', 'base_layer.weight',
         'lora_magnitude_vector')
_KEY = re.compile(r'(?:base_model\.model\.)?(.+)\.(' + '|'.join(re.escape(p) for p in PARTS) + ')')
# The ndim every part must have.
_NDIM = {'lora_A.weight': 2, 'lora_B.weight': 2, 'lora_B.bias': 1, 'lora_embedding_A': 2, 'lora_embedding_B': 2,
         'base_layer.weight': 2, 'lora_magnitude_vector': 1}


class AdapterTensors(NamedTuple):
  """A folder's tensors grouped by layer (module path without ``base_model.model.``), as float32 numpy.

  Attributes:
    factors: ``{path: {part: array}}`` for the LoRA parts (``lora_A.weight`` ... ``lora_embedding_B``).
    base: ``{path: weight}``: base-layer weights PEFT saved beside an embedding or output-layer LoRA.
  """
  factors: dict[str, dict[str, np.ndarray]]
  base: dict[str, np.ndarray]


def _files(folder: PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  folder = pathlib.Path(folder)
  for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not (folder / name).is_file():
      raise FileNotFoundError(f'{folder} has no {name} (a PEFT LoRA folder holds {ADAPTER_CONFIG} and '
                              f'{ADAPTER_WEIGHTS}).')
  return folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS


def _number(value, name: str, path, *, positive_int: bool = False) -> None:
  """Raises, naming the setting and the file, unless ``value`` is None or a finite positive (integer) number."""
  if value is None:
    return
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
  if positive_int:
    ok = ok and float(value).is_integer()
  if not ok:
    kind = 'a positive integer' if positive_int else 'a finite positive number'
    raise ValueError(f'{path}: {name} must be {kind}, got {value!r}.')


def read_adapter_config(folder: PathLike) -> dict[str, Any]:
  """``adapter_config.json`` as a dict, checked: a JSON object of a plain LoRA with sensible ``r`` / ``lora_alpha``.

  Raises:
    FileNotFoundError: the folder lacks ``adapter_config.json`` or ``adapter_model.safetensors``.
    ValueError: naming the file, for text that is not JSON, JSON that is not an object, a ``peft_type`` other than
      ``LORA``, ``fan_in_fan_out``, a non-positive or non-integer ``r``, a non-finite ``lora_alpha``, or
      ``rank_pattern`` / ``alpha_pattern`` that are not objects of numbers.
  """
  path, _ = _files(folder)
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{path} is not valid JSON ({e}).') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path} must hold a JSON object, found a {type(config).__name__}.')
  if config.get('peft_type') != 'LORA':
    raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be imported.")
  if config.get('fan_in_fan_out'):
    raise ValueError(f'{path}: fan_in_fan_out=True (Conv1D-style [d_in, d_out] weights) is not a plain LoRA and '
                     'cannot be imported.')
  _number(config.get('r'), "'r'", path, positive_int=True)
  _number(config.get('lora_alpha'), "'lora_alpha'", path)
  for key in ('rank_pattern', 'alpha_pattern'):
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
      raise ValueError(f'{path}: {key!r} must be an object of pattern -> number, got {patterns!r}.')
    for pattern, value in patterns.items():
      _number(value, f'{key}[{pattern!r}]', path, positive_int=key == 'rank_pattern')
  return config


def _load_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy (bfloat16 through JAX), with a truncated file named."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  try:
    with safe_open(str(path), framework='flax') as f:  # flax: numpy has no bfloat16, PEFT often saves it
      for key in f.keys():
        out[key] = f.get_tensor(key)
  except SafetensorError as e:
    raise ValueError(f'{path} is not a complete safetensors file (truncated or corrupt: {e}).') from None
  return out


def _checked(path: pathlib.Path, key: str, value) -> np.ndarray:
  dtype = np.dtype(value.dtype) if str(value.dtype) != 'bfloat16' else None
  if dtype is not None and not np.issubdtype(dtype, np.floating):
    raise ValueError(f'{path}: tensor {key!r} has dtype {value.dtype}; LoRA factors and weights must be floating '
                     'point.')
  array = np.asarray(value, np.float32) if dtype is None else np.asarray(value).astype(np.float32)
  if not np.all(np.isfinite(array)):
    bad = int(np.size(array) - np.isfinite(array).sum())
    raise ValueError(f'{path}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf).')
  return array


def read_adapter_tensors(folder: PathLike) -> AdapterTensors:
  """``adapter_model.safetensors`` grouped by layer, every tensor checked (see the module docstring).

  Raises:
    FileNotFoundError: the folder lacks one of its two files.
    ValueError: naming the file and the tensor or layer: a truncated file, a tensor that is no LoRA part, a
      non-float or non-finite tensor, a part of the wrong rank (a 1-D ``lora_A``), ``lora_A`` without ``lora_B``
      (or the reverse), factors whose ranks differ, a bias that does not match ``lora_B``, or DoRA.
  """
  _, path = _files(folder)
  factors: dict[str, dict[str, np.ndarray]] = {}
  base: dict[str, np.ndarray] = {}
  for key, value in _load_tensors(path).items():
    match = _KEY.fullmatch(key)
    if match is None:
      raise ValueError(f'{path}: tensor {key!r} is not a LoRA factor (expected <module>.lora_A.weight, '
                       '.lora_B.weight, .lora_B.bias, .lora_embedding_A/B or a saved .base_layer.weight).')
    layer, part = match.groups()
    if part == 'lora_magnitude_vector':
      raise ValueError(f'{path}: layer {layer!r} is a DoRA layer (lora_magnitude_vector); DoRA is not a plain LoRA '
                       'and cannot be imported.')
    array = _checked(path, key, value)
    if array.ndim != _NDIM[part]:
      raise ValueError(f'{path}: tensor {key!r} has shape {list(array.shape)}; {part} must have {_NDIM[part]} '
                       'dimension(s).')
    if part == 'base_layer.weight':
      base[layer] = array
    else:
      factors.setdefault(layer, {})[part] = array
  for layer, parts in factors.items():
    _check_layer(path, layer, parts)
  return AdapterTensors(factors, base)


def _check_layer(path: pathlib.Path, layer: str, parts: dict[str, np.ndarray]) -> None:
  embed = 'lora_embedding_A' in parts or 'lora_embedding_B' in parts
  a_name, b_name = ('lora_embedding_A', 'lora_embedding_B') if embed else ('lora_A.weight', 'lora_B.weight')
  for have, need in ((a_name, b_name), (b_name, a_name)):
    if need not in parts:
      present = have if have in parts else sorted(parts)
      raise ValueError(f'{path}: layer {layer!r} has {present} but no {need}; a LoRA needs both factors.')
  a, b = parts[a_name], parts[b_name]
  if a.shape[0] != b.shape[1]:
    raise ValueError(f'{path}: layer {layer!r} has {a_name} of shape {list(a.shape)} (rank {a.shape[0]}) but '
                     f'{b_name} of shape {list(b.shape)} (rank {b.shape[1]}); the ranks must agree.')
  bias = parts.get('lora_B.bias')
  if bias is not None and bias.shape != (b.shape[0],):
    raise ValueError(f'{path}: layer {layer!r} has lora_B.bias of shape {list(bias.shape)}; lora_B has '
                     f'{b.shape[0]} output features.')
