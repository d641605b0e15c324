"""Fields every FLoRAL task config shares; ``experiments.floral``'s command-line switches override them.

Defaults are the public code's (``zeligism/FLoRAL``, ``conf/method/floral.yaml`` and ``conf/task/*.yaml``;
reference/floral.md §1-§3): router logits start at zero, uniform noise ``U[0, 1)`` on them in training, temperature 1,
LoRA gradient preconditioning on, nonzero bias-adaptor init, server SGD with lr 1 (plain averaging).
"""
from __future__ import annotations

import dataclasses

SERVER_OPTIMIZERS = ('sgd', 'adam')
BIAS_INITS = ('uniform', 'zeros')


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloralTask:
  """Training settings of one FLoRAL task.

  Attributes:
    name: task name (the runner's ``--task``).
    loss: ``'mse'`` or ``'xent'``.
    metric: ``'test_mse'`` or ``'test_accuracy'``.
    rounds: federated rounds.
    batch_size: local batch size.
    lr: client SGD learning rate (base, adaptors and ensemble members).
    router_lr: client SGD learning rate of the router logits (oracle routers are not trained).
    fraction: share of clients sampled per round.
    rank: LoRA rank or FLoRAL budget rho of the Local Adaptor and of the ``floral`` alias (``floral_1``: 0.01).
    num_epochs: local epochs per round.
    train_arg: the model's train-mode keyword, if any.
    noise_std: scale of the uniform router noise in training (0 disables it).
    temperature: router softmax temperature.
    precondition: FLoRAL's LoRA gradient preconditioning (also used by the Local Adaptor).
    bias_init: bias-adaptor init, ``'uniform'`` (public code, nonzero) or ``'zeros'``.
    server_optimizer: ``'sgd'`` or ``'adam'`` on the pseudo-gradient ``prev - average``.
    server_lr: its learning rate (SGD 1 = FedAvg).
    server_adaptor_lr: a separate server rate for FLoRAL's adaptors (``None``: ``server_lr``). The public code's
      server optimizer reuses the client param groups, so its adaptors step with the client ``lr`` (reference
      §2, "Quirk"); pass the task's ``lr`` here to reproduce that.
    augment: the public code's CIFAR training augmentation (random crop with 4-pixel padding, horizontal flip).
  """
  name: str
  loss: str
  metric: str
  rounds: int
  batch_size: int
  lr: float
  router_lr: float
  fraction: float = 1.0
  rank: int | float = 0.01
  num_epochs: int = 1
  train_arg: str | None = None
  noise_std: float = 1.0
  temperature: float = 1.0
  precondition: bool = True
  bias_init: str = 'uniform'
  server_optimizer: str = 'sgd'
  server_lr: float = 1.0
  server_adaptor_lr: float | None = None
  augment: bool = False

  def __post_init__(self):
    if self.server_optimizer not in SERVER_OPTIMIZERS:
      raise ValueError(f'unknown server optimizer {self.server_optimizer!r}; choose one of {SERVER_OPTIMIZERS}.')
    if self.bias_init not in BIAS_INITS:
      raise ValueError(f'unknown bias init {self.bias_init!r}; choose one of {BIAS_INITS}.')
    if self.rounds < 0 or self.batch_size < 1:
      raise ValueError(f'rounds must be >= 0 and batch_size >= 1; got {self.rounds}, {self.batch_size}.')
    if not 0.0 < self.fraction <= 1.0:
      raise ValueError(f'fraction must lie in (0, 1]; got {self.fraction}.')
