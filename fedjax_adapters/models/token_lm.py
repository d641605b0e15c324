"""A small causal transformer for next-token classification (the Shakespeare and Stack Overflow FLoRAL tasks).

The decoder is this library's LLaMA (``fedjax_adapters.models.llama``: RMSNorm, rotary positions, SwiGLU) at a tiny
size. It reads a context of ids left-padded with id 0 (``fedjax_adapters.data.text``) and returns the logits of the
token after the last one, ``[B, L] -> [B, V]``, so a task's examples are ordinary (input, label) pairs and the
built-in cross-entropy and accuracy apply. FLoRAL's public code uses a character LSTM for Shakespeare and a
2-layer word transformer (width 128, 2 heads, MLP 512) for Stack Overflow; the default sizes here are the latter's.
"""
from __future__ import annotations

import jax
from flax import nnx

from fedjax_adapters.models.llama import Llama, LlamaConfig

PAD = 0


class NextTokenLM(nnx.Module):
  """Logits of the next token after a left-padded context (padding, id 0, is masked out of attention).

  Example:
    >>> model = NextTokenLM(90, rngs=nnx.Rngs(0))
    >>> model(jnp.array([[0, 0, 88, 61]])).shape
    (1, 90)
  """

  def __init__(self, vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 2, mlp: int = 512,
               rngs: nnx.Rngs):
    """Builds the decoder.

    Args:
      vocab_size: number of token ids (the output width).
      hidden: residual width.
      layers: decoder layers.
      heads: attention heads (head width ``hidden // heads``).
      mlp: SwiGLU hidden width.
      rngs: initialization randomness.
    """
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    self.lm = Llama(config, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """``x: [B, L]`` int ids, left-padded with 0 -> ``[B, V]`` logits of the token after position ``L - 1``."""
    del train, rngs  # no dropout
    return self.lm(x, x != PAD)[:, -1]
