"""FedDPA decoding benchmark: a batch of test prompts with per-example adapter weights vs one prompt at a time.

``python -m fedjax_adapters.benchmarks.decode --json OUT [--size tiny|small|smollm2] [--batch 16] [--new-tokens 16]``

A LLaMA model (random weights of the chosen size; ``smollm2`` has SmolLM2-135M's shapes) carries FedDPA's global and
local LoRA on q_proj/v_proj. Every prompt gets its own instance weight ``w``; the batched path decodes all prompts in
one call with ``global_weight = w[B]``, the sequential path calls the decoder once per prompt (batch 1). Both paths
are compiled before timing. Reports the outputs' agreement, prompts/s of each path and their ratio, measured side
by side in one run, with the hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_adapters.algorithms.feddpa import lm_spec, mixing_weights
from fedjax_adapters.models import llama
from fedjax_adapters.nn.adapt import adapt, split_model

SIZES = {
    'tiny': dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    'small': dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4),
    # SmolLM2-135M's shapes (weights random: the timing does not depend on them).
    'smollm2': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
}


def _timed(fn, repeats):
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def run(size: str = 'tiny', batch: int = 16, prompt_len: int = 32, new_tokens: int = 16, num_beams: int = 1,
        repeats: int = 3) -> dict:
  config = llama.LlamaConfig(**SIZES[size])
  model = llama.Llama(config, rngs=nnx.Rngs(0))
  adapt(model, lm_spec(), key=jax.random.key(1))
  mdef, parts = split_model(model)
  # Nonzero B factors, so global and local adapters really differ.
  rng = np.random.default_rng(0)
  for group in ('adapters', 'local'):
    parts[group] = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), parts[group])
  ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, prompt_len)), jnp.int32)
  lengths = rng.integers(prompt_len // 2, prompt_len + 1, batch)
  mask = jnp.asarray(np.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None], jnp.int32)  # left padding
  w = jnp.asarray(rng.uniform(-0.2, 0.5, batch), jnp.float32)
  gw, lw = mixing_weights(w)
  kw = dict(max_new_tokens=new_tokens, eos_id=0, pad_id=0)

  def decode(g, l, i, m):
    bound = mdef.bind(parts, global_weight=jnp.repeat(g, num_beams), local_weight=jnp.repeat(l, num_beams))
    if num_beams > 1:
      return llama.beam_search(bound, i, m, num_beams=num_beams, **kw)
    return llama.greedy_decode(bound, i, m, **kw)

  batched = lambda: decode(gw, lw, ids, mask)
  one_by_one = lambda: [decode(gw[j:j + 1], lw[j:j + 1], ids[j:j + 1], mask[j:j + 1]) for j in range(batch)]
  t0 = time.perf_counter()
  out_b = jax.block_until_ready(batched())
  compile_b = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_s = jax.block_until_ready(one_by_one())
  compile_s = time.perf_counter() - t0
  agree = float(np.mean([np.array_equal(np.asarray(out_b[j]), np.asarray(out_s[j][0])) for j in range(batch)]))
  t_b = _timed(batched, repeats)
  t_s = _timed(one_by_one, repeats)
  return {
      'size': size, 'config': {k: v for k, v in SIZES[size].items()}, 'batch': batch, 'prompt_len': prompt_len,
      'new_tokens': new_tokens, 'num_beams': num_beams,
      'outputs_identical_fraction': agree,
      'batched_s': t_b, 'one_at_a_time_s': t_s,
      'batched_prompts_per_s': batch / t_b, 'one_at_a_time_prompts_per_s': batch / t_s,
      'speedup_batched_over_one_at_a_time': t_s / t_b,
      'first_call_s': {'batched': compile_b, 'one_at_a_time': compile_s},
  }


def hardware() -> dict:
  dev = jax.devices()[0]
  return {'platform': platform.platform(), 'processor': platform.processor(), 'cpu_count': os.cpu_count(),
          'load_average': os.getloadavg(), 'devices': [str(d) for d in jax.devices()],
          'device_kind': getattr(dev, 'device_kind', dev.platform), 'jax': jax.__version__}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--size', default='tiny', choices=sorted(SIZES))
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--prompt-len', type=int, default=32)
  p.add_argument('--new-tokens', type=int, default=16)
  p.add_argument('--beams', type=int, nargs='+', default=[1, 4])
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  results = {'hardware': hardware(), 'runs': []}
  for beams in args.beams:
    r = run(args.size, args.batch, args.prompt_len, args.new_tokens, beams)
    results['runs'].append(r)
    print(f'{args.size} beams={beams} batch={args.batch}: identical {r["outputs_identical_fraction"]:.2f}, '
          f'batched {r["batched_prompts_per_s"]:.2f} prompts/s vs one-at-a-time '
          f'{r["one_at_a_time_prompts_per_s"]:.2f} prompts/s -> {r["speedup_batched_over_one_at_a_time"]:.1f}x',
          flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == '__main__':
  main()
