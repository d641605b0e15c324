"""The training half of ``python -m fedjax_adapters.experiments.feddpa``: every (method, seed) unit, run in a run directory.

``experiments/feddpa.py`` parses and checks the command line without importing JAX, then calls :func:`run` with the
plan. A unit trains with the shared loop (``fedjax_adapters.experiments.runlib.loop``: checkpoints, resume, progress, divergence
checks); its evaluation after the last round personalizes (FedDPA-F), lets every client's model answer the whole
test pool, and scores each answer with ROUGE-1. The checkpoints hold the adapters and client states only: the frozen
base is reloaded from the model source.

The results document keeps the keys earlier runs wrote (``config``, ``settings``, ``seed``, ``metric``, ``methods:
{name: {personalization, test_time, seconds}}``, scores as fractions in [0, 1]) and adds ``per_prompt`` ([K][T]
ROUGE-1 of every client's answer to every test prompt), ``client_categories`` / ``test_categories`` (what the
bootstrap needs to rerun from the file), ``intervals`` (paired bootstrap per seed), each unit's status, and the run's
status.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, NamedTuple

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_adapters.experiments import feddpa_family as family
from fedjax_adapters.experiments.configs import feddpa as configs
from fedjax_adapters.experiments.runlib import dp_flags, loop, memory, robust_flags, strict_json, throughput
from fedjax_adapters.experiments.runlib.cli import UserError
from fedjax_adapters.experiments.runlib.environment import environment
from fedjax_adapters.experiments.runlib.progress import Progress
from fedjax_adapters.experiments.runlib.rundir import RunDir
from fedjax_adapters import checkpoint, experiment
from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.data import feddpa as fdata
from fedjax_adapters.data.dolly import load_instruction_data
from fedjax_adapters.federated import client_data, dp_aggregator, make_round, sequential_clients
from fedjax_adapters.metrics import rouge
from fedjax_adapters.models import llama
from fedjax_adapters.models.llama_loaders import (gguf_config, load_gguf, load_hf_checkpoint, load_tokenizer, save_hf_checkpoint,
                                                  smollm2_gguf_path)

RUNNER = 'feddpa'
_PLAN_KEYS = ('methods', 'seeds', 'checkpoint_every', 'keep', 'bootstrap_samples', 'data', 'levers', 'robust',
              'dp')


# ---------------------------------------------------------------------------------------------------------------------
# Model, data, algorithm
# ---------------------------------------------------------------------------------------------------------------------


def load_base(cfg: configs.FedDPAConfig, keep_quantized: bool = False):
  """(pretrained LLaMA model, tokenizer); the model's weights become the frozen base. Loader errors -> UserError.

  ``keep_quantized`` (``--quantize gguf``): a GGUF file's Q8_0 / Q4_0 / Q4_1 linears keep their blocks
  (:func:`load_gguf`); otherwise every tensor is expanded to float32."""
  source = cfg.model
  try:
    if source in configs.MODELS:
      path = smollm2_gguf_path()
      tokenizer = load_tokenizer(path)
      if source == 'tiny':  # a random LLaMA with SmolLM2's tokenizer, for smoke runs and tests
        config = llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True)
        return llama.Llama(config, rngs=nnx.Rngs(0)), tokenizer
      return load_gguf(path, keep_quantized=keep_quantized)[0], tokenizer
    model = (load_gguf(source, keep_quantized=keep_quantized)[0] if str(source).endswith('.gguf')
             else load_hf_checkpoint(source)[0])
    return model, load_tokenizer(source)
  except (ValueError, OSError) as e:
    raise UserError(f'--model {source}: {" ".join(str(e).split())}') from None


def train_sets(method: str, data: fdata.FedDPAData, cfg) -> list[list]:
  """Each client's first ``train_per_client`` examples; Centralized pools them into one client."""
  sets = [list(ex[:cfg.train_per_client]) for ex in data.train]
  return [[e for ex in sets for e in ex]] if method == 'centralized' else sets


def levered(base, levers: memory.Levers | None):
  """A copy of ``base`` with the memory ``levers`` applied (``base`` itself when there are none)."""
  if levers is not None and levers != memory.Levers():
    base = memory.apply_levers(nnx.clone(base), levers)
  return base


def build_algorithm(method: str, cfg, base, levers: memory.Levers | None = None, reducer=None, *,
                    num_clients: int | None = None, rows: int | None = None):
  """FedDPA's ``variant`` for ``method`` (Centralized is FedIT on one pooled client), on the pretrained ``base``
  with the memory ``levers`` applied to it (the adaptors FedDPA adds stay float32); a family member
  (``feddpa_family.FAMILY``) needs the clients' count and padded rows."""
  base = levered(base, levers)
  if method in family.FAMILY:
    return family.build_family(method, cfg, base, num_clients=num_clients, rows=rows)
  graphdef, base_state = nnx.split(base)

  def model_fn(rngs):
    del rngs  # the pretrained weights are the base; adapters are initialized by adapt() from the algorithm's key
    return nnx.merge(graphdef, base_state)

  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  return F.feddpa(model_fn, variant='fedit' if method == 'centralized' else method, spec=spec, lr=cfg.lr,
                  batch_size=cfg.batch_size, num_epochs=cfg.num_epochs, mix_weight=cfg.mix_weight, lam=cfg.lam,
                  weight_target=cfg.weight_target, embed_adapter=cfg.embed_adapter, reducer=reducer,
                  micro_batch=cfg.micro_batch)


def private(alg: F.FedDPA, dp: dict | None) -> F.FedDPA:
  """``alg`` whose global LoRA is clipped and noised by the DP aggregator of ``dp`` (as the FLoRAL runner builds it).

  Only what the clients send (the global LoRA) reaches the aggregator; the local LoRA and FedDPA-F's personalization
  never leave a client and are untouched. Local (no global phase) aggregates nothing and is returned unchanged.
  """
  if not dp or alg.weights.global_phase is None:
    return alg
  return alg.replace(aggregator=dp_aggregator(alg.aggregator, dp_flags.config(dp)))


def round_epsilon(alg: F.FedDPA, dp: dict | None):
  """``rounds -> epsilon`` after that many rounds for ``alg`` (0 for Local, which releases nothing); None without DP."""
  if not dp:
    return None
  if alg.weights.global_phase is None:
    return lambda rounds: 0.0
  cache = {}
  return lambda rounds: dp_flags.epsilon_after(dp, rounds, cache)


class PromptBatches(NamedTuple):
  """Prompts tokenized once, grouped by length into fixed-size batches (few shapes, so few compiles).

  Attributes:
    indices: per batch, ``[eval_batch]`` indices into the prompt list; the last batch repeats its last prompt to
      fill up (those rows are decoded and dropped).
    real: per batch, how many leading rows are real.
    inputs: per batch, ``{'input_ids', 'attention_mask'}`` ``[eval_batch, L_b]``, left-padded; ``L_b`` is the
      batch's longest prompt rounded up to a multiple of 16 and at most ``prompt_length`` (a longer prompt keeps its
      last tokens, so the response cue stays).
  """
  indices: list
  real: list
  inputs: list


def prompt_batches(tokenizer, prompts: list[str], cfg, short_answer=None, batch: int | None = None) -> PromptBatches:
  """Sorts ``prompts`` into short-answer ones first (``short_answer: [P]`` bool, optional), each group by token
  length, and cuts them into batches of ``cfg.eval_batch``: a batch of short answers stops decoding as soon as
  every row has ended, and prompts of similar length share a padded width."""
  lengths = np.minimum([len(t) for t in tokenizer(prompts)['input_ids']], cfg.prompt_length)
  order = np.lexsort((lengths, np.zeros(len(prompts)) if short_answer is None else ~np.asarray(short_answer)))
  batch = batch or cfg.eval_batch
  out = PromptBatches([], [], [])
  for start in range(0, len(order), batch):
    idx = order[start:start + batch]
    width = min(cfg.prompt_length, -(-int(lengths[idx].max()) // 16) * 16)
    padded = np.concatenate([idx, np.full(batch - len(idx), idx[-1])])
    b = fdata.tokenize_prompts(tokenizer, [prompts[i] for i in padded], max_length=width, truncation='left',
                               length=width)
    out.indices.append(padded)
    out.real.append(len(idx))
    out.inputs.append({'input_ids': jnp.asarray(b.input_ids), 'attention_mask': jnp.asarray(b.attention_mask)})
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Answers: every client's model on the whole test pool
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What every unit of a run shares: the config, data, tokenizer, base model, test prompts and compiled pieces."""
  cfg: Any
  data: fdata.FedDPAData
  tokenizer: Any
  base: Any
  batches: PromptBatches
  run_dir: RunDir | None
  progress: Progress
  compiled: dict = dataclasses.field(default_factory=dict)
  peft_base: str | None = None   # the base model folder the exported adapters name (written once per process)
  levers: memory.Levers | None = None   # memory levers applied to the frozen base (--base-dtype, --remat, --quantize)
  robust: dict = dataclasses.field(default_factory=dict)  # --aggregator / --attack (runlib.robust_flags)
  dp: dict | None = None   # --dp-* (runlib.dp_flags.make_dp_plan)
  phase_steps: dict = dataclasses.field(default_factory=dict)  # method -> client steps of one phase of every client

  def jitted(self, alg: F.FedDPA) -> tuple:
    """``(embed, weights)`` of ``alg`` compiled once per algorithm: embeddings ``[B, D]`` and decoding weights."""
    if alg not in self.compiled:
      embed = jax.jit(lambda frozen, g, local, x: F.embed_examples(alg, frozen, g, local, x))
      weights = jax.jit(lambda frozen, g, local, x, ref: F.prediction_weights(alg, frozen, g, local, x, ref))
      self.compiled[alg] = embed, weights
    return self.compiled[alg]


def reference_embeddings(ctx: Context, alg, frozen, g, local, client: int, seed: int) -> jax.Array:
  """``[T, S, D]``: each test prompt's S references, drawn (seeded) from the client's own training prompts.

  Each distinct reference is embedded once: its embedding depends only on the prompt and the client's model.
  """
  cfg = ctx.cfg
  pool = [fdata.build_prompt(e.instruction) for e in ctx.data.train[client][:cfg.train_per_client]]
  ref_idx = fdata.sample_references(np.random.default_rng([seed, client]), len(pool), cfg.num_refs, len(ctx.data.test))
  used, inverse = np.unique(ref_idx, return_inverse=True)
  # A client's references are few (at most train_per_client): a batch of them rounded up to 8 rows, not eval_batch.
  size = min(cfg.eval_batch, -(-len(used) // 8) * 8)
  batches = prompt_batches(ctx.tokenizer, [pool[j] for j in used], cfg, batch=size)
  embed, _ = ctx.jitted(alg)
  rows = [embed(frozen, g, local, x)[:r] for x, r in zip(batches.inputs, batches.real)]
  order = np.concatenate([idx[:r] for idx, r in zip(batches.indices, batches.real)])
  emb = jnp.zeros((len(used), rows[0].shape[-1]), rows[0].dtype).at[order].set(jnp.concatenate(rows))
  return emb[inverse.reshape(ref_idx.shape)]


def decode(ctx: Context, alg, frozen, g, local, x: dict, gw, lw) -> list[str]:
  """Answers to one batch of prompts with per-row adapter weights ``gw, lw: [B]`` (greedy or beam search)."""
  reps = ctx.cfg.num_beams
  return generate(ctx, F.bind(alg.model, frozen, g, local, (jnp.repeat(gw, reps), jnp.repeat(lw, reps))), x)


def generate(ctx: Context, model, x: dict) -> list[str]:
  """Answers of the live decoder ``model`` to one batch of prompts (greedy or beam search)."""
  cfg, tok = ctx.cfg, ctx.tokenizer
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else eos
  if cfg.num_beams > 1:
    out = llama.beam_search(model, x['input_ids'], x['attention_mask'], num_beams=cfg.num_beams,
                            max_new_tokens=cfg.max_new_tokens, eos_id=eos, pad_id=pad)
  else:
    out = llama.greedy_decode(model, x['input_ids'], x['attention_mask'], max_new_tokens=cfg.max_new_tokens,
                              eos_id=eos, pad_id=pad)
  return [t.strip() for t in tok.batch_decode(np.asarray(out), skip_special_tokens=True)]


def client_answers(ctx: Context, alg, state, client: int, seed: int) -> list[str]:
  """Client ``client``'s answers to the whole test pool (aligned with ``data.test``), weighted by the method's row
  of the weight table: FedDPA's instance-wise weights, Local's local adapter, FedIT's global one."""
  frozen, g = state.frozen, state.global_params
  local = jax.tree.map(lambda a: a[client], state.clients['local'])
  ref_emb = None
  if alg.weights.predict == F.INSTANCE:
    ref_emb = reference_embeddings(ctx, alg, frozen, g, local, client, seed)
  _, weights = ctx.jitted(alg)
  answers = [''] * len(ctx.data.test)
  for idx, real, x in zip(ctx.batches.indices, ctx.batches.real, ctx.batches.inputs):
    gw, lw = weights(frozen, g, local, x, None if ref_emb is None else ref_emb[idx])
    for i, text in zip(idx[:real], decode(ctx, alg, frozen, g, local, x, gw, lw)[:real]):
      answers[i] = text
  return answers


def all_answers(ctx: Context, method: str, alg, state, seed: int) -> list[list[str]]:
  """Every client's answers; one model serves every client for FedIT and Centralized, so it answers once."""
  k = ctx.data.num_clients
  if alg.weights.predict == F.GLOBAL:
    return [client_answers(ctx, alg, state, 0, seed)] * k
  out = []
  for c in range(k):
    t0 = time.perf_counter()
    out.append(client_answers(ctx, alg, state, c, seed))
    ctx.progress.print(f'    {method} seed {seed} client {c}: {len(ctx.data.test)} answers in '
                       f'{time.perf_counter() - t0:.1f} s')
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------------


def predictions_path(run_dir: RunDir, method: str, seed: int) -> str:
  return run_dir.file(os.path.join('predictions', f'{method}-seed{seed}.json'))


def family_answers(ctx: Context, method: str, alg, state, seed: int) -> list[list[str]]:
  """Every client's answers with its personalized model (``feddpa_family.client_model``); FLoRA's clients share
  one model, so it answers once."""
  k = ctx.data.num_clients
  out = []
  for c in range(1 if method in family.SHARED_MODEL else k):
    t0 = time.perf_counter()
    model = family.client_model(method, alg, state, c)
    out.append([''] * len(ctx.data.test))
    for idx, real, x in zip(ctx.batches.indices, ctx.batches.real, ctx.batches.inputs):
      for i, text in zip(idx[:real], generate(ctx, model, x)[:real]):
        out[-1][i] = text
    ctx.progress.print(f'    {method} seed {seed} client {c}: {len(ctx.data.test)} answers in '
                       f'{time.perf_counter() - t0:.1f} s')
  return out * k if method in family.SHARED_MODEL else out


def evaluate_state(ctx: Context, method: str, alg, state, train, mapping, seed: int) -> dict:
  """The evaluation record of a trained (full) state; writes every answer and per-prompt score to predictions/."""
  if method in family.FAMILY:
    answers = family_answers(ctx, method, alg, state, seed)
  else:
    state = F.personalize(alg, state, train, mapping=mapping)
    answers = all_answers(ctx, method, alg, state, seed)
  per_prompt = rouge.per_prompt_scores(answers, ctx.data)
  report = rouge.personalization_report(answers, ctx.data)
  path = predictions_path(ctx.run_dir, method, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  strict_json.write(path, {'method': method, 'seed': seed, 'answers': answers, 'per_prompt': per_prompt.tolist()})
  blocks = {b: {c: float(v) for c, v in report[b].items()} for b in rouge.BLOCKS}
  return {'test': {'personalization_avg': blocks['personalization']['avg'],
                   'test_time_avg': blocks['test_time']['avg']}, **blocks}


def make_unit(ctx: Context, method: str, seed: int) -> tuple[loop.Unit, Any]:
  """The :class:`loop.Unit` of ``method`` and ``seed``, and ``finish(state) -> full personalized state``.

  The unit's state is the :class:`ServerState` without its frozen base (so checkpoints hold adapters, client states
  and the server optimizer only); the base is put back for every round and evaluation.
  """
  cfg = ctx.cfg
  arrays = fdata.client_training_arrays(ctx.tokenizer, train_sets(method, ctx.data, cfg), max_length=cfg.max_length)
  k, rows = np.shape(arrays.y)
  alg = private(build_algorithm(method, cfg, ctx.base, ctx.levers, reducer=robust_flags.reducer(ctx.robust), num_clients=k,
                        rows=rows), ctx.dp)
  epsilon = round_epsilon(alg, ctx.dp)
  train = client_data(family.targets(arrays) if method in family.FAMILY else arrays)
  ctx.phase_steps[method] = int(throughput.local_steps(arrays.counts, batch_size=cfg.batch_size,
                                                      num_epochs=cfg.num_epochs).sum())
  # On a CPU the clients' activations and 49k-vocabulary logits do not fit side by side, and one client already
  # fills the cores: the sequential mapping runs the same client update one client at a time.
  mapping = sequential_clients() if cfg.backend == 'sequential' else None
  round_fn = make_round(alg, clients_per_round=k, mapping=mapping, adversary=robust_flags.adversary(ctx.robust, k, seed))
  frozen = {}
  if method in family.FAMILY:  # a loss callable's metrics: its value times the rows, and the rows
    loss_key, count_key = 'loss', 'count'
  else:
    prefix = 'global' if alg.weights.global_phase is not None else 'local'
    loss_key, count_key = f'{prefix}_loss', f'{prefix}_tokens'

  def init():
    state = alg.init(jax.random.key(seed), k)
    frozen['base'] = state.frozen
    return state._replace(frozen=())

  def full(state):
    if not frozen:
      init()
    return state._replace(frozen=frozen['base'])

  def step(state, n):
    summaries = []
    for _ in range(n):
      state, metrics = round_fn(full(state), train)
      state = state._replace(frozen=())
      summaries += loop.round_summaries(metrics, 1, loss_key=loss_key, count_key=count_key)
      if epsilon is not None:
        summaries[-1]['dp_epsilon'] = epsilon(int(state.round))
    return state, summaries

  def headline(record):
    if record is None:
      return {}
    return {'P': f'{100 * record["test"]["personalization_avg"]:.1f}',
            'TTP': f'{100 * record["test"]["test_time_avg"]:.1f}'}

  unit = loop.Unit(method, seed, init=init, step=step, headline=headline,
                   evaluate=lambda state: evaluate_state(ctx, method, alg, full(state), train, mapping, seed))
  if method in family.FAMILY:
    return unit, (alg, full)
  return unit, (alg, lambda state: F.personalize(alg, full(state), train, mapping=mapping))


# ---------------------------------------------------------------------------------------------------------------------
# The results document
# ---------------------------------------------------------------------------------------------------------------------


def new_results(ctx: Context, plan: dict) -> dict:
  cfg = ctx.cfg
  out = {'runner': RUNNER, 'config': cfg.name, 'settings': dataclasses.asdict(cfg), 'seeds': plan['seeds'],
         'seed': plan['seeds'][0], 'rounds': cfg.rounds, 'metric': 'rouge1',
         'client_categories': list(ctx.data.client_categories),
         'test_categories': [e.category for e in ctx.data.test], 'status': 'running', 'methods': {}, 'units': {},
         'intervals': {}}
  if plan.get('dp'):  # epsilon after every round of the federated methods; Local's is 0 (methods[m]['dp_epsilon'])
    out['dp'] = dp_flags.summary(plan['dp'], cfg.rounds)
  return out


def client_steps(method: str, rounds: int, phase_steps: int, *, personalized: bool = True) -> int:
  """A unit's client steps (``runlib.throughput``) after ``rounds`` rounds, every client in every round:
  ``phase_steps`` per training phase; FedDPA-T adds its local phase from each client's second round on, FedDPA-F
  its personalization phase after the last round when ``personalized`` (Ditto's step trains both LoRAs at once:
  one step)."""
  phases = rounds
  if method == 'feddpa_t':
    phases += max(rounds - 1, 0)
  if method == 'feddpa_f' and personalized:
    phases += 1
  return phases * phase_steps


def method_summary(run_dir: RunDir, method: str, units: dict, seeds: list[int]) -> dict:
  """``{personalization, test_time (means over seeds), per_seed: {seed: {..., per_prompt}}, status, seconds}``."""
  per_seed = {}
  for s in seeds:
    u = units.get(str(s), {})
    if u.get('status') == 'done':
      pred = strict_json.read(predictions_path(run_dir, method, s))
      per_seed[str(s)] = {b: u['evaluation'][b] for b in rouge.BLOCKS}
      per_seed[str(s)]['per_prompt'] = pred['per_prompt']
  out = {'per_seed': per_seed, 'seconds': round(sum(u.get('seconds', 0.0) for u in units.values()), 1)}
  steps = throughput.method_steps(units.values())
  if steps is not None:
    out['client_steps'] = steps
  if per_seed:
    for b in rouge.BLOCKS:
      cols = next(iter(per_seed.values()))[b]
      out[b] = {c: float(np.mean([r[b][c] for r in per_seed.values()])) for c in cols}
  failed = {s: u['error'] for s, u in units.items() if u.get('status') == 'failed'}
  out['status'] = 'failed' if failed else ('done' if len(per_seed) == len(seeds) else 'running')
  if failed:
    out['errors'] = failed
  return out


def add_intervals(results: dict, *, num_samples: int) -> dict:
  """Paired bootstrap intervals per seed over every method finished for it (``rouge.personalization_intervals``)."""
  for s in results['seeds']:
    per_prompt = {m: np.asarray(r['per_seed'][str(s)]['per_prompt']) for m, r in results['methods'].items()
                  if str(s) in r.get('per_seed', {})}
    if per_prompt:
      results['intervals'][str(s)] = rouge.personalization_intervals(
          per_prompt, results['test_categories'], results['client_categories'], num_samples=num_samples, seed=s)
  return results


def unit_record(outcome: loop.Outcome, state_path: str) -> dict:
  record = {'status': outcome.status, 'round': outcome.round, 'seconds': round(outcome.seconds, 1)}
  if outcome.status == 'done':
    record.update(evaluation=outcome.evaluation, state=state_path)
  if outcome.error:
    record['error'] = outcome.error
  return record


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def open_run(plan: dict, cfg, argv: list[str], progress: Progress) -> experiment.Run:
  """The run directory of ``plan``, locked: a new one, or (``--resume``) the existing one."""
  options = dict(progress=progress, writers=plan.get('writers', ()), json_path=plan['json'],
                 resume_hint=f'python -m fedjax_adapters.experiments.feddpa --resume {plan["out"]}')
  if plan.get('resuming'):
    return experiment.Run.open(plan['out'], runner=RUNNER, **options)
  config = {'runner': RUNNER, 'config': cfg.name, 'settings': dataclasses.asdict(cfg),
            'plan': {k: plan[k] for k in _PLAN_KEYS + ('writers',) if k in plan}, 'argv': argv,
            'environment': environment()}
  return experiment.Run.create(plan['out'], config, {}, **options)


def loss_tokens_per_client(tokenizer, data: fdata.FedDPAData, cfg) -> list[int]:
  """Each client's loss tokens (response tokens + EOS within ``cfg.max_length``) over its training examples."""
  arrays = fdata.client_training_arrays(tokenizer, train_sets('fedit', data, cfg), max_length=cfg.max_length)
  return [int(n) for n in arrays.x['loss_mask'].sum(axis=(1, 2))]


def clients_without_loss_tokens(tokenizer, data: fdata.FedDPAData, cfg) -> list[int]:
  """The clients none of whose training sequences keeps a response token within ``cfg.max_length`` (their prompts
  fill the cutoff): such a client has no loss and does not train."""
  return [k for k, n in enumerate(loss_tokens_per_client(tokenizer, data, cfg)) if n == 0]


def load_context(plan: dict, progress: Progress) -> Context:
  """Data (test pool cut to ``test_per_task`` per task), tokenizer, base model and the tokenized test prompts."""
  cfg = plan['cfg']
  data = load_instruction_data(plan['data'])
  if cfg.test_per_task < max(len(i) for i in data.test_indices.values()):
    data = data.subset_test(cfg.test_per_task)
  t0 = time.perf_counter()
  base, tokenizer = load_base(cfg, keep_quantized=(plan.get('levers') or {}).get('quantize') == 'gguf')
  # A short-answer task: the median of its owner's training answers is under 8 tokens (labels such as "yes").
  answers = [tokenizer([e.output for e in ex[:cfg.train_per_client]])['input_ids'] for ex in data.train]
  short = {c: np.median([len(ids) for ids in answers[k]]) < 8 for k, c in enumerate(data.client_categories)}
  batches = prompt_batches(tokenizer, [fdata.build_prompt(e.instruction) for e in data.test], cfg,
                           [short[e.category] for e in data.test])
  tokens = loss_tokens_per_client(tokenizer, data, cfg)
  silent = [k for k, n in enumerate(tokens) if n == 0]
  if silent:
    progress.always(f'warning: client(s) {silent} have no response token within max_length={cfg.max_length} (their '
                    'prompts fill it), so they do not train; raise --max-length.')
  progress.print(f'config {cfg.name}: base {cfg.model} loaded in {time.perf_counter() - t0:.0f} s; '
                 f'{data.num_clients} clients, loss tokens per client {tokens}, {len(data.test)} test prompts in '
                 f'batches of widths '
                 f'{[int(x["input_ids"].shape[1]) for x in batches.inputs]}; devices {jax.devices()}')
  return Context(cfg, data, tokenizer, base, batches, None, progress,
                 levers=memory.Levers(**(plan.get('levers') or {})), robust=plan.get('robust') or {},
                 dp=plan.get('dp'))


def export_base(plan: dict, ctx: Context) -> str:
  """The base model folder every exported adapter names as ``base_model_name_or_path``.

  A model given as a Hugging Face folder is named as it is. Otherwise (the shipped GGUF, or the random smoke model)
  the base and tokenizer are written once per process to ``<export dir>/base`` (a GGUF base kept quantized is written
  expanded to the values it computed with), so the export serves offline:
  ``AutoPeftModelForCausalLM.from_pretrained('<export dir>/<method>/global')`` finds its base by that absolute path.
  """
  if ctx.peft_base is None:
    model = ctx.cfg.model
    if model not in configs.MODELS and os.path.isdir(model):
      ctx.peft_base = os.path.abspath(model)
    else:
      folder = os.path.abspath(os.path.join(plan['export_peft'], 'base'))
      # A base kept in GGUF blocks is written expanded: the same values its matmuls dequantize to.
      kept = ctx.levers is not None and ctx.levers.quantize == 'gguf'
      save_hf_checkpoint(folder, load_base(ctx.cfg)[0] if kept else ctx.base, tokenizer=ctx.tokenizer)
      ctx.peft_base = folder
  return ctx.peft_base


def export_unit(plan: dict, ctx: Context, method: str, seed: int, finish, like) -> str:
  """Writes the unit's adapters (personalized for FedDPA-F) as PEFT folders naming :func:`export_base`'s base;
  returns the folder."""
  from fedjax_adapters.interop.feddpa import export_feddpa  # pylint: disable=g-import-not-at-top
  alg, personalized = finish
  with checkpoint.Manager(ctx.run_dir.checkpoint_dir(method, seed)) as ckpts:
    state = ckpts.restore(ckpts.latest_step(), like=like)
  name = method if len(plan['seeds']) == 1 else f'{method}-seed{seed}'
  folder = os.path.join(plan['export_peft'], name)
  if method in family.FAMILY:
    family.export_family(folder, method, alg, personalized(state), alpha=ctx.cfg.alpha,
                         base_model_name_or_path=export_base(plan, ctx), tokenizer=ctx.tokenizer)
    return folder
  manifest = export_feddpa(folder, alg, personalized(state), base_model_name_or_path=export_base(plan, ctx))
  if ctx.dp:
    manifest['privacy'] = export_privacy_note(ctx.dp, ctx.cfg.rounds, alg)
    strict_json.write(os.path.join(folder, 'manifest.json'), manifest)
    ctx.progress.always(f'warning: {folder}: {manifest["privacy"]}')
  return folder


def export_privacy_note(dp: dict, rounds: int, alg: F.FedDPA) -> str:
  """What the DP guarantee covers in an exported folder: the global adapter only, never the local ones."""
  if alg.weights.global_phase is None:
    scope = 'this method federates nothing: its global adapter is the untrained initialization'
  else:
    eps = dp_flags.epsilon_after(dp, rounds, {})
    scope = (f'the global adapter is user-level ({eps:.4g}, {dp["delta"]:.3g})-DP after {rounds} rounds '
             f'(clip {dp["clip"]}, noise multiplier {dp["noise_multiplier"]:.4g})')
  local = 'the local adapters (local/client_<k>' + (', fine-tuned on each client\'s data by FedDPA-F\'s personalization'
                                                   if alg.personalize_phase is not None else '')
  return (f'{scope}; {local}) never left their clients and are OUTSIDE the guarantee: each can reveal its client\'s '
          'training data (docs/privacy.md)')


def _gb(n) -> str:
  return f'{n / 1e9:.2f} GB'


def model_config(cfg) -> llama.LlamaConfig:
  """The LLaMA config of ``cfg.model`` without loading its weights (the tiny model as :func:`load_base` builds it)."""
  source = cfg.model
  try:
    if source == 'tiny':
      return load_base(cfg)[0].config
    if source in configs.MODELS or str(source).endswith('.gguf'):
      return gguf_config(gguf.GGUFReader(str(smollm2_gguf_path() if source in configs.MODELS else source)))
    with open(os.path.join(source, 'config.json')) as f:
      return llama.LlamaConfig.from_hf_dict(json.load(f))
  except (ValueError, OSError) as e:
    raise UserError(f'--model {source}: {" ".join(str(e).split())}') from None


def gguf_equivalent(cfg) -> str | None:
  """What the memory model counts a base kept in its GGUF blocks as: ``'int8'`` (per-channel, 8 bits a weight) when
  any linear is Q8_0, ``'int4'`` (blocks of 64 with a float32 scale and offset: 5 bits a weight, as Q4_1; Q4_0 takes
  4.5) when all are Q4_0 / Q4_1, None (float32) when a linear has a type the loader expands."""
  path = smollm2_gguf_path() if cfg.model in configs.MODELS else cfg.model
  types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors
           if t.name.startswith('blk.') and len(t.shape) == 2}
  if not types <= {'Q8_0', 'Q4_0', 'Q4_1'}:
    return None
  return 'int8' if 'Q8_0' in types else 'int4'


def levers_hint(cfg) -> str:
  """The memory levers to try: the fixed ones, and micro-batching at the largest divisor of the batch below the
  current micro-batch (activation memory scales with it)."""
  current = cfg.micro_batch or cfg.batch_size
  smaller = [d for d in range(current // 2, 0, -1) if cfg.batch_size % d == 0]
  micro = f'--micro-batch {smaller[0]} (or smaller; a divisor of --batch-size {cfg.batch_size}), ' if smaller else ''
  return (f'{micro}--base-dtype bf16, --remat full, --quantize int8, int4 or (a GGUF model) gguf, --backend '
          'sequential, a smaller --batch-size or --max-length')


def memory_report(plan: dict, progress: Progress) -> dict | None:
  """Compiles one vmapped training step from abstract shapes and fits clients per step into the device's memory.

  Runs for ``--dry-run``, ``--device-memory`` or a device that reports its memory (not the CPU). Raises UserError
  when the clients trained at once (all of them with ``backend='vmap'``, else one) do not fit.
  """
  cfg, levers = plan['cfg'], memory.Levers(**(plan.get('levers') or {}))
  device = plan.get('device_memory')
  device = int(device * 1e9) if device else memory.device_memory_bytes()
  if not plan.get('dry_run') and device is None:
    return None
  clients = load_instruction_data(plan['data']).num_clients if cfg.backend == 'vmap' else 1
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  modelled = dataclasses.replace(levers, quantize=gguf_equivalent(cfg)) if levers.quantize == 'gguf' else levers
  report = memory.memory_model(model_config(cfg), spec, modelled, batch_size=cfg.batch_size, seq_len=cfg.max_length,
                               device_bytes=device, micro_batch=cfg.micro_batch)
  need = report['fixed_bytes'] + clients * report['per_client_bytes']
  report.update(clients_per_step=clients, needed_bytes=need, levers=dataclasses.asdict(levers),
                backend=jax.default_backend(), micro_batch=cfg.micro_batch)
  one = report['one']
  micro = f' in micro-batches of {cfg.micro_batch}' if cfg.micro_batch else ''
  progress.always(f'memory ({jax.default_backend()} memory_analysis, one step, batch {cfg.batch_size} x '
                  f'{cfg.max_length} tokens{micro}): 1 client: arguments {_gb(one["argument_bytes"])}, outputs '
                  f'{_gb(one["output_bytes"])}, temporaries {_gb(one["temp_bytes"])}, total {_gb(one["total_bytes"])}; '
                  f'{_gb(report["fixed_bytes"])} + {_gb(report["per_client_bytes"])} per client; {clients} client(s) '
                  f'per step need {_gb(need)}; device {"unknown" if device is None else _gb(device)}; largest clients '
                  f'per step that fit: {report["max_clients"]}')
  if device is not None and need > device:
    raise UserError(f'one training step of {clients} client(s) needs an estimated {_gb(need)} ({jax.default_backend()} '
                    f'memory_analysis) but the device has {_gb(device)} (at most {report["max_clients"]} client(s) '
                    f'fit); levers: {levers_hint(cfg)}')
  return report


MEANINGLESS = ('note: model {model!r} is a tiny random LLaMA (preset smoke): a plumbing check whose scores mean '
               'nothing; use --preset mid (about 25 min on 2 CPU cores) or --preset cpu (about an hour) for numbers')


def meaningless_note(cfg) -> str | None:
  """The warning printed at the start and beside the final table of a run on the tiny random model."""
  return MEANINGLESS.format(model=cfg.model) if cfg.model == 'tiny' else None


def run(plan: dict, argv: list[str]) -> tuple[dict, int]:
  """Trains and evaluates every unfinished (method, seed) of ``plan``; returns the results and the exit status.

  Exit status: 0 when every unit is done, 1 when one failed (the others still ran), ``128 + signal`` when a
  SIGINT / SIGTERM stopped the run (after checkpointing the unit in progress).
  """
  cfg, progress = plan['cfg'], Progress(quiet=plan['quiet'])
  report = memory_report(plan, progress)
  if plan.get('dry_run'):
    return {'memory': report}, 0
  note = meaningless_note(cfg)
  if note:
    progress.always(note)
  ctx = load_context(plan, progress)  # before the run directory: a model that fails to load leaves no run behind
  held = open_run(plan, cfg, argv, progress)
  ctx.run_dir = held.dir
  results = held.results = held.results or new_results(ctx, plan)
  schedule = loop.Schedule(cfg.rounds, max(cfg.rounds, 1), plan['checkpoint_every'], plan['keep'])
  made = {}

  def make(method, seed):
    made[method, seed] = make_unit(ctx, method, seed)
    return made[method, seed][0]

  def finish(method, seed, outcome):
    units = results['units'][method]
    state_dir = os.path.join(held.dir.checkpoint_dir(method, seed), str(outcome.round))
    units[str(seed)] = unit_record(outcome, os.path.relpath(state_dir, held.dir.path))
    units[str(seed)]['client_steps'] = client_steps(method, outcome.round, ctx.phase_steps[method],
                                                     personalized=outcome.status == 'done')
    if outcome.status == 'interrupted':
      return
    if outcome.status == 'done' and plan.get('export_peft'):
      unit, finisher = made[method, seed]
      units[str(seed)]['peft'] = export_unit(plan, ctx, method, seed, finisher, unit.init())
    results['methods'][method] = method_summary(held.dir, method, units, plan['seeds'])
    if plan.get('dp'):
      alg = made[method, seed][1][0]
      results['methods'][method]['dp_epsilon'] = round_epsilon(alg, plan['dp'])(cfg.rounds)
    add_intervals(results, num_samples=plan['bootstrap_samples'])

  with held:
    progress.print(f'run directory {held.dir.path}; methods {" ".join(plan["methods"])}; seeds {plan["seeds"]}')
    status = experiment.train_all(held, [(m, s) for m in plan['methods'] for s in plan['seeds']], make, schedule,
                                  finish)
  if status == 'interrupted':
    return results, 128 + int(held.stop.signum)
  from fedjax_adapters.experiments import report  # pylint: disable=g-import-not-at-top
  progress.always('\n' + report.summary([results]) + (f'\n{note}' if note else ''))
  return results, 1 if status == 'failed' else 0
