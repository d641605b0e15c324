"""FedDPA on the paper's Dataset 1: FedIT, Local, FedDPA-T, FedDPA-F (and Centralized), with test-time
personalization evaluation.

Usage::

  python -m experiments.feddpa --data ../shared/data/feddpa/dataset1 --config cpu --json out/feddpa_cpu.json
  python -m experiments.feddpa --data DIR --config paper --model /path/to/llama-7b-hf --json out/feddpa.json

Every client's final model answers the whole test pool: its own task is *personalization*, the average over all
tasks *test-time personalization* (reference/feddpa.md §1). Writes
``{"config": ..., "methods": {name: {"personalization": {task: rouge1, "avg": ...}, "test_time": {...}}}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_adapters.algorithms.feddpa import (feddpa, instance_weights, lm_spec, mixing_weights,
                                               prompt_embeddings)
from fedjax_adapters.data import feddpa as fdata
from fedjax_adapters.federated.client_update import ClientData
from fedjax_adapters.federated.round import make_round
from fedjax_adapters.metrics.rouge import personalization_report
from fedjax_adapters.models import llama
from fedjax_adapters.models.llama_loaders import load_gguf, load_hf_checkpoint, load_tokenizer, smollm2_gguf_path
from experiments.configs.feddpa import CONFIGS

METHODS = ('centralized', 'fedit', 'local', 'feddpa_t', 'feddpa_f')
DEFAULT_METHODS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')


def load_base(cfg, model_arg: str | None):
  """(pretrained Llama model, tokenizer) for the config; the model's weights become the frozen base."""
  source = model_arg or cfg.model
  if source in ('smollm2', 'tiny'):
    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    if source == 'tiny':
      config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)
      return llama.Llama(config, rngs=nnx.Rngs(0)), tokenizer
    model, _ = load_gguf(path)
    return model, tokenizer
  if not source:
    raise ValueError(f'config {cfg.name!r} needs --model (a Hugging Face LLaMA folder or a .gguf file).')
  if str(source).endswith('.gguf'):
    model, _ = load_gguf(source)
  else:
    model, _ = load_hf_checkpoint(source)
  return model, load_tokenizer(source)


def client_arrays(tokenizer, examples_by_client, cfg) -> ClientData:
  """Tokenized, right-padded training data of every client, stacked ``[K, N, L]``."""
  batches = [fdata.tokenize_for_training(tokenizer, ex, max_length=cfg.max_length, length=cfg.max_length)
             for ex in examples_by_client]
  x = {name: jnp.asarray(np.stack([getattr(b, name) for b in batches])) for name in
       ('input_ids', 'attention_mask', 'loss_mask')}
  n = x['input_ids'].shape[1]
  return ClientData(x, jnp.zeros((len(batches), n), jnp.int32), jnp.full((len(batches),), n, jnp.int32))


def train(method: str, cfg, base_model, tokenizer, data: fdata.FedDPAData, *, seed: int):
  """Runs ``method`` and returns ``(FedDPA object, final state)``."""
  train_sets = [list(ex[:cfg.train_per_client]) for ex in data.train]
  if method == 'centralized':
    train_sets = [[e for ex in train_sets for e in ex]]
  variant = 'fedit' if method == 'centralized' else method
  spec = lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  graphdef, base_state = nnx.split(base_model)

  def model_fn(rngs):
    del rngs  # the pretrained weights are the base; adapters are initialized by adapt() from the algorithm's key
    return nnx.merge(graphdef, base_state)

  fd = feddpa(model_fn, variant=variant, spec=spec, lr=cfg.lr, batch_size=cfg.batch_size,
              num_epochs=cfg.num_epochs, mix_weight=cfg.mix_weight)
  cdata = client_arrays(tokenizer, train_sets, cfg)
  k = len(train_sets)
  state = fd.algorithm.init(jax.random.key(seed), k)
  round_fn = make_round(fd.algorithm, clients_per_round=k, backend=cfg.backend)
  for r in range(cfg.rounds):
    t0 = time.time()
    state, metrics = round_fn(state, cdata)
    loss = float(jnp.sum(metrics.get('global_loss', metrics.get('local_loss', 0.0))))
    tokens = float(jnp.sum(metrics.get('global_tokens', metrics.get('local_tokens', 1.0))))
    print(f'    {method} round {r}: train loss {loss / max(tokens, 1):.3f} ({time.time() - t0:.0f} s)', flush=True)
  if method == 'feddpa_f':
    state = fd.personalize_from_global(state, cdata, backend=cfg.backend)
  return fd, state


def _embed_prompts(fd, parts, tokenizer, prompts: list[str], cfg) -> jax.Array:
  """``[len(prompts), D]`` embeddings, in chunks of ``cfg.eval_batch`` (the last padded, so one compile)."""
  out = []
  for start in range(0, len(prompts), cfg.eval_batch):
    chunk = prompts[start:start + cfg.eval_batch]
    padded = chunk + [chunk[-1]] * (cfg.eval_batch - len(chunk))
    b = fdata.tokenize_prompts(tokenizer, padded, max_length=cfg.prompt_length, truncation='left',
                               length=cfg.prompt_length)
    out.append(_embed(fd, parts, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), cfg.embed_adapter)
               [:len(chunk)])
  return jnp.concatenate(out)


def generate(fd, state, tokenizer, data, cfg, *, client: int, seed: int) -> list[str]:
  """Client ``client``'s answers to the whole test pool, with the method's adapter weighting."""
  parts = fd.client_parts(state, client)
  prompts = [fdata.build_prompt(e.instruction) for e in data.test]
  eos = tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  ref_emb = None
  if fd.variant in ('feddpa_t', 'feddpa_f'):
    # References are drawn from the client's own training data (the examples it trained on), S per test prompt.
    # Each distinct reference is embedded once: the embedding depends only on the prompt and the client's model.
    local = data.train[min(client, len(data.train) - 1)][:cfg.train_per_client]
    refs_pool = [fdata.build_prompt(e.instruction) for e in local]
    ref_idx = fdata.sample_references(np.random.default_rng([seed, client]), len(refs_pool), cfg.num_refs,
                                      len(prompts))
    used, inverse = np.unique(ref_idx, return_inverse=True)
    ref_emb = _embed_prompts(fd, parts, tokenizer, [refs_pool[j] for j in used], cfg)[inverse.reshape(ref_idx.shape)]
  outputs = []
  for start in range(0, len(prompts), cfg.eval_batch):
    chunk = prompts[start:start + cfg.eval_batch]
    pb = fdata.tokenize_prompts(tokenizer, chunk, max_length=cfg.prompt_length, truncation='left',
                                length=cfg.prompt_length)
    ids, mask = jnp.asarray(pb.input_ids), jnp.asarray(pb.attention_mask)
    if ref_emb is not None:
      e_test = _embed(fd, parts, ids, mask, cfg.embed_adapter)
      w = instance_weights(e_test, ref_emb[start:start + len(chunk)], lam=cfg.lam)
      gw, lw = mixing_weights(w, target=cfg.weight_target)
    elif fd.variant == 'local':
      gw, lw = jnp.zeros(len(chunk)), jnp.ones(len(chunk))
    else:
      gw, lw = jnp.ones(len(chunk)), jnp.zeros(len(chunk))
    reps = cfg.num_beams
    model = fd.mdef.bind(parts, global_weight=jnp.repeat(gw, reps), local_weight=jnp.repeat(lw, reps))
    if cfg.num_beams > 1:
      out = llama.beam_search(model, ids, mask, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                              eos_id=eos, pad_id=pad)
    else:
      out = llama.greedy_decode(model, ids, mask, max_new_tokens=cfg.max_new_tokens, eos_id=eos, pad_id=pad)
    texts = tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
    outputs.extend(t.strip() for t in texts)
  return outputs




_EMBED_CACHE = {}


def _embed(fd, parts, ids, mask, adapter):
  key = (id(fd.mdef), adapter)
  if key not in _EMBED_CACHE:
    _EMBED_CACHE[key] = jax.jit(lambda p, i, m: prompt_embeddings(fd.mdef, p, i, m, adapter=adapter))
  return _EMBED_CACHE[key](parts, ids, mask)


def evaluate_method(method, fd, state, tokenizer, data, cfg, *, seed: int) -> dict:
  k = data.num_clients
  if method in ('centralized', 'fedit'):
    # One model serves every client (FedIT decodes with the averaged global adapter alone), so its answers are
    # computed once and given to each client.
    answers = generate(fd, state, tokenizer, data, cfg, client=0, seed=seed)
    predictions = [answers] * k
  else:
    predictions = [generate(fd, state, tokenizer, data, cfg, client=c, seed=seed) for c in range(k)]
  report = personalization_report(predictions, data)
  return {'personalization': report['personalization'], 'test_time': report['test_time'],
          'examples': {c: predictions[c][:3] for c in range(min(k, 2))}}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', required=True, help='a folder laid out like FedDPA Dataset 1')
  p.add_argument('--config', default='cpu', help=f'one of: {", ".join(CONFIGS)}')
  p.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS), help=f'subset of: {", ".join(METHODS)}')
  p.add_argument('--model', default=None, help='HF LLaMA folder or .gguf file (default: the config\'s model)')
  p.add_argument('--rounds', type=int, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  if args.config not in CONFIGS:
    p.error(f'unknown config {args.config!r}; valid configs: {", ".join(CONFIGS)}')
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f'unknown method(s) {", ".join(bad)}; valid methods: {", ".join(METHODS)}')
  cfg = CONFIGS[args.config]
  if args.rounds is not None:
    cfg = cfg.__class__(**{**cfg.__dict__, 'rounds': args.rounds})
  t_start = time.time()
  data = fdata.load_feddpa(args.data)
  if cfg.test_per_task < 200:
    data = data.subset_test(cfg.test_per_task)
  t0 = time.time()
  base, tokenizer = load_base(cfg, args.model)
  print(f'config {cfg.name}: base loaded in {time.time() - t0:.0f} s; {data.num_clients} clients, '
        f'{len(data.test)} test prompts; devices {jax.devices()}', flush=True)
  results = {}
  for method in args.methods:
    t0 = time.time()
    fd, state = train(method, cfg, base, tokenizer, data, seed=args.seed)
    t1 = time.time()
    results[method] = evaluate_method(method, fd, state, tokenizer, data, cfg, seed=args.seed)
    results[method]['seconds'] = {'train': round(t1 - t0, 1), 'evaluate': round(time.time() - t1, 1)}
    r = results[method]
    print(f'  {method:<12} P avg {r["personalization"]["avg"]:.4f}  TTP avg {r["test_time"]["avg"]:.4f}  '
          f'(train {t1 - t0:.0f} s, eval {time.time() - t1:.0f} s)', flush=True)
    _write(args.json, _output(cfg, args, results))  # after every method, so a long run can be watched
  cats = list(data.categories)
  print()
  for block in ('personalization', 'test_time'):
    print(f'{block} (ROUGE-1 x 100)')
    print('| method | ' + ' | '.join(cats) + ' | avg |')
    print('|---' * (len(cats) + 2) + '|')
    for m, r in results.items():
      print(f'| {m} | ' + ' | '.join(f'{100 * r[block][c]:.1f}' for c in cats) + f' | {100 * r[block]["avg"]:.1f} |')
  out = _output(cfg, args, results)
  out['seconds'] = round(time.time() - t_start, 1)
  _write(args.json, out)
  return out


def _output(cfg, args, results) -> dict:
  return {'config': cfg.name, 'settings': dict(cfg.__dict__), 'seed': args.seed, 'rounds': cfg.rounds,
          'metric': 'rouge1', 'methods': results}


def _write(path, out) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(out, f, indent=2, default=str)


if __name__ == '__main__':
  main(sys.argv[1:])
