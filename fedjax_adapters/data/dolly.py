"""databricks-dolly-15k by category as a FedDPA dataset: a natural partition of a public instruction dataset.

Dolly (Conover et al., 2023; CC BY-SA 3.0; ``databricks/databricks-dolly-15k`` on the Hugging Face hub, one
``databricks-dolly-15k.jsonl`` file) holds 15,011 human-written records with the string fields ``instruction``,
``context`` (often empty), ``response`` and ``category``, one of eight task types (open_qa, general_qa,
classification, closed_qa, brainstorming, information_extraction, summarization, creative_writing). Split by
category (``flwr-datasets``' ``NaturalIdPartitioner``), each client holds one task type, which is FedDPA's setting
(Yang et al., arXiv 2403.19211: one Flan task per client), so the FedDPA experiment runs on it unchanged. FedML and
pfl-research federate Dolly the same way.

A record becomes a FedDPA :class:`~fedjax_adapters.data.feddpa.Example` with ``instruction`` the instruction, followed
by ``"\\n\\n"`` and the context when there is one (FedDPA's prompt template has no separate input field), ``output``
the response, and ``task = category``. Each category keeps ``test_per_category`` records (a seeded draw, in file
order) for the shared test pool; the rest are its client's training set.
"""
from __future__ import annotations

import os

import numpy as np

from fedjax_adapters.data import natural
from fedjax_adapters.data.feddpa import Example, FedDPAData, assemble, load_feddpa

HUB_NAME = 'databricks/databricks-dolly-15k'
FIELDS = ('instruction', 'context', 'response', 'category')


def _example(record_instruction, context, response, category) -> Example:
  record_instruction, context, response, category = map(str, (record_instruction, context, response, category))
  instruction = f'{record_instruction}\n\n{context}' if context.strip() else record_instruction
  return Example(instruction, response, category, category)


def load_dolly(path: str | os.PathLike, *, test_per_category: int = 200, seed: int = 0) -> FedDPAData:
  """Dolly as FedDPA data: one client per category (in sorted order), a test pool of ``test_per_category`` each.

  Args:
    path: a local copy: ``databricks-dolly-15k.jsonl`` as published, or parquet / csv with the same fields (see
      :func:`fedjax_adapters.data.natural.load_local_dataset`).
    test_per_category: records of each category held out for the shared test pool.
    seed: seeds which records are held out.

  Returns:
    :class:`FedDPAData`; for the published file, 8 clients.

  Raises:
    DatasetNotFoundError: no file at ``path`` (the message says how to get it).
    ValueError: a missing or non-text field (named), or a category with no more than ``test_per_category`` records.
  """
  if test_per_category < 1:
    raise ValueError(f'test_per_category must be at least 1, got {test_per_category}.')
  dataset = natural.load_local_dataset(path, hub_name=HUB_NAME)
  missing = [f for f in FIELDS if f not in dataset.column_names]
  if missing:
    raise ValueError(f'{path}: the Dolly records have no field(s) {missing}; they have {dataset.column_names}.')
  categories, rows = natural.natural_partition(dataset, 'category')
  table = dataset.with_format('numpy')
  rng = np.random.default_rng(seed)
  train, test = [], []
  for category, r in zip(categories, rows):
    if len(r) <= test_per_category:
      raise ValueError(f'category {category!r} has {len(r)} records, not more than test_per_category='
                       f'{test_per_category}; lower test_per_category.')
    part = table[r]
    fields = [natural.column(part, f, kind='str') for f in FIELDS]
    examples = [_example(*values) for values in zip(*fields)]
    held = np.zeros(len(r), bool)
    held[rng.choice(len(r), test_per_category, replace=False)] = True
    train.append(tuple(ex for ex, h in zip(examples, held) if not h))
    test.extend(ex for ex, h in zip(examples, held) if h)
  return assemble(train, test, [str(c) for c in categories], [str(c) for c in categories])


def load_instruction_data(path: str | os.PathLike) -> FedDPAData:
  """FedDPA data from a folder in the authors' Dataset 1 layout, or from a Dolly file (any other file)."""
  return load_dolly(path) if os.path.isfile(path) else load_feddpa(path)
