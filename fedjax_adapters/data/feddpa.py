"""FedDPA instruction data: loading, the prompt template, and tokenization.

FedDPA (Yang et al., NeurIPS 2024, arXiv 2403.19211) gives each of ``K`` clients one Flan task. Each client trains on
its own examples. Each client's personalized model is then run on a shared test pool that holds every task. Its own
task gives the *personalization* score, and all the tasks together give the *test-time personalization* score (see
``fedjax_adapters.metrics.rouge.personalization_report``).

A folder in the layout the authors published (``data/dataset{1,2}`` of the official code) looks like::

  <folder>/<K>/local_training_<k>.json        k = 0..K-1, each a JSON list of records
  <folder>/flan_test_200_selected_nstrict_1.jsonl   one record per line (the test pool)

Every record has the string fields ``instruction``, ``output``, ``task`` and ``category``. There is no ``input``
field, because the options and context are already inside ``instruction``. ``task`` is the Flan task name (``snli``)
and ``category`` is what the paper's tables call the task (``entailment``). The official ``metric.py`` groups the
test pool by ``category``, so this module groups by ``category`` too, and checks that ``task`` and ``category``
determine each other, so either one names a group.

Tokenization follows the official ``main.py`` (``generate_and_tokenize_prompt``): the training text is
``build_prompt(instruction) + output``. It is truncated at ``cutoff_len`` and gets EOS if it is still shorter than
the cutoff. With ``train_on_inputs=False``, the loss covers only the response tokens and that EOS.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from fedjax_adapters.data.federated import FederatedData

# The official test file name. When `load_feddpa` gets no `test_file`, it uses this file if present, and otherwise
# the folder's only `*.jsonl` file.
DEFAULT_TEST_FILE = 'flan_test_200_selected_nstrict_1.jsonl'
FIELDS = ('instruction', 'output', 'task', 'category')

# `templates/alpaca_short.json` of the official code, "prompt_no_input" variant. The "prompt_input" variant is never
# used, because FedDPA records carry no `input` field.
PROMPT_TEMPLATE = '### Instruction:\n{instruction}\n\n### Response:\n'
# `response_split` of the same template: a decoded generation's answer is the text after this marker.
RESPONSE_SPLIT = '### Response:'


class Example(NamedTuple):
  """One FedDPA record."""
  instruction: str
  output: str
  task: str
  category: str


@dataclasses.dataclass(frozen=True)
class FedDPAData:
  """A FedDPA federated dataset: per-client training sets and one shared test pool.

  Attributes:
    train: ``K`` tuples of :class:`Example`. ``train[k]`` is client ``k``'s training set, in file order.
    test: the test pool in file order (``T`` examples). Predictions passed to the metrics are aligned with it.
    client_tasks: ``[K]`` Flan task name of each client (``'snli'``), read from its records.
    client_categories: ``[K]`` category of each client (``'entailment'``), the column name used in the paper's tables.
    test_indices: category -> ``[n_c]`` int32 indices into ``test``, in file order. Keys are in client order (the
      category of client 0 comes first).
    test_by_category: category -> the test examples at ``test_indices[category]``.
  """
  train: tuple[tuple[Example, ...], ...]
  test: tuple[Example, ...]
  client_tasks: tuple[str, ...]
  client_categories: tuple[str, ...]
  test_indices: Mapping[str, np.ndarray]
  test_by_category: Mapping[str, tuple[Example, ...]]

  @property
  def num_clients(self) -> int:
    return len(self.train)

  @property
  def categories(self) -> tuple[str, ...]:
    """The test categories, in client order."""
    return tuple(self.test_indices)

  def clients_of(self, category: str) -> tuple[int, ...]:
    """The ids of the clients whose own task is ``category``."""
    if category not in self.test_indices:
      raise ValueError(f'Unknown category {category!r}; the data has {list(self.test_indices)}.')
    return tuple(k for k, c in enumerate(self.client_categories) if c == category)

  def subset_test(self, per_category: int) -> FedDPAData:
    """Keeps the first ``per_category`` test examples of every category, for quick smoke runs.

    Args:
      per_category: how many test examples to keep from each category (at least 1).

    Returns:
      A new ``FedDPAData`` with the same training data and a smaller test pool, still in file order.
    """
    if per_category < 1:
      raise ValueError(f'per_category must be at least 1, got {per_category}.')
    keep = np.sort(np.concatenate([idx[:per_category] for idx in self.test_indices.values()]))
    return assemble(self.train, tuple(self.test[i] for i in keep), self.client_tasks, self.client_categories)


def assemble(train, test, client_tasks, client_categories) -> FedDPAData:
  """Builds `FedDPAData` from per-client training examples and a test pool, grouping the pool by category in client
  order (every test category must be some client's)."""
  order = list(dict.fromkeys(client_categories))
  groups: dict[str, list[int]] = {c: [] for c in order}
  for i, ex in enumerate(test):
    groups[ex.category].append(i)
  test_indices = {c: np.asarray(groups[c], dtype=np.int32) for c in order}
  test_by_category = {c: tuple(test[i] for i in groups[c]) for c in order}
  return FedDPAData(tuple(train), tuple(test), tuple(client_tasks), tuple(client_categories), test_indices,
                    test_by_category)


# ---------------------------------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------------------------------


def _expected_layout(num_clients: int) -> str:
  return (f'Expected:\n'
          f'  <folder>/{num_clients}/local_training_<k>.json for k = 0..{num_clients - 1}, each a JSON list of '
          f'records\n'
          f'  <folder>/{DEFAULT_TEST_FILE} (or the test_file given, or else exactly one *.jsonl file), one JSON '
          f'record per line\n'
          f'  every record with string fields {list(FIELDS)}; one task and one category per client; every test '
          f'category owned by some client')


def _listing(path: str) -> str:
  try:
    return str(sorted(os.listdir(path)))
  except OSError:
    return '(does not exist)'


def _first_few(problems: Sequence[str], limit: int = 3) -> list[str]:
  """The first `limit` problems of one file, and a count of the rest, so a wholly wrong file stays readable."""
  if len(problems) <= limit:
    return list(problems)
  return [*problems[:limit], f'... and {len(problems) - limit} more problem(s) in the same file']


def _layout_error(folder: str, num_clients: int, problems: Sequence[str]) -> ValueError:
  clients_dir = os.path.join(folder, str(num_clients))
  found = f'Found:\n  {folder}: {_listing(folder)}\n  {clients_dir}: {_listing(clients_dir)}'
  if not os.path.isdir(clients_dir) and os.path.isdir(folder):
    numbered = sorted(d for d in os.listdir(folder) if d.isdigit() and os.path.isdir(os.path.join(folder, d)))
    if numbered:
      found += f'\n  (client folders present: {numbered}; is num_clients={num_clients} right?)'
  lines = '\n'.join(f'  - {p}' for p in problems)
  return ValueError(f'FedDPA folder {folder!r} is not in the expected layout:\n{lines}\n'
                    f'{_expected_layout(num_clients)}\n{found}')


def _parse_record(record: Any, where: str, problems: list[str]) -> Example | None:
  """Checks that a record has every field as a string. Problems go to `problems`, and the record then gives None."""
  if not isinstance(record, dict):
    problems.append(f'{where} is a {type(record).__name__}, not a JSON object')
    return None
  missing = [f for f in FIELDS if f not in record]
  if missing:
    problems.append(f'{where} is missing field(s) {missing} (has {sorted(record)})')
    return None
  wrong = [f for f in FIELDS if not isinstance(record[f], str)]
  if wrong:
    problems.append(f'{where} has non-string field(s) {wrong}')
    return None
  return Example(*(record[f] for f in FIELDS))


def _find_test_file(folder: str, test_file: str | None, problems: list[str]) -> str | None:
  if test_file is not None:
    path = test_file if os.path.isabs(test_file) else os.path.join(folder, test_file)
    if not os.path.isfile(path):
      problems.append(f'missing test file {path}')
      return None
    return path
  default = os.path.join(folder, DEFAULT_TEST_FILE)
  if os.path.isfile(default):
    return default
  candidates = sorted(f for f in os.listdir(folder) if f.endswith('.jsonl') and os.path.isfile(os.path.join(folder, f)))
  if len(candidates) == 1:
    return os.path.join(folder, candidates[0])
  if not candidates:
    problems.append(f'missing test file: no {DEFAULT_TEST_FILE} and no other *.jsonl file in {folder}')
  else:
    problems.append(f'no {DEFAULT_TEST_FILE} and several *.jsonl files {candidates}; pass test_file= to pick one')
  return None


def load_feddpa(folder: str, *, num_clients: int = 8, test_file: str | None = None) -> FedDPAData:
  """Loads a FedDPA dataset folder (the authors' Dataset 1 or 2, or any folder in the same layout).

  Each client's task and category are read from its records, not hard-coded. The load checks the whole folder and
  raises one error that lists every problem.

  Args:
    folder: the dataset folder, e.g. ``.../dataset1``.
    num_clients: ``K``. Training files are read from ``<folder>/<K>/local_training_{0..K-1}.json``.
    test_file: the test pool file, absolute or relative to ``folder``. By default this is
      ``flan_test_200_selected_nstrict_1.jsonl`` if present, or else the folder's only ``*.jsonl`` file.

  Returns:
    :class:`FedDPAData`. For Dataset 1 that is 8 clients with 300 training examples each, and a 1,600-example test
    pool with 200 examples per category.

  Raises:
    ValueError: if the folder is not in the expected layout. The message lists what was expected and what was found:
      missing files, unreadable JSON, a record missing a field, a client whose records mix tasks, a test category that
      no client owns, or a client task absent from the test pool.
  """
  folder = os.fspath(folder)
  if num_clients < 1:
    raise ValueError(f'num_clients must be at least 1, got {num_clients}.')
  if not os.path.isdir(folder):
    raise _layout_error(folder, num_clients, [f'folder {folder} does not exist or is not a directory'])
  problems: list[str] = []
  clients = [_read_client(os.path.join(folder, str(num_clients), f'local_training_{k}.json'), k, problems)
             for k in range(num_clients)]
  clients = [c for c in clients if c is not None]
  test_path = _find_test_file(folder, test_file, problems)
  test = _read_test_pool(test_path, problems) if test_path is not None else []
  if problems:
    raise _layout_error(folder, num_clients, problems)
  train = [examples for examples, _, _ in clients]
  client_tasks = [task for _, task, _ in clients]
  client_categories = [category for _, _, category in clients]
  _check_task_groups(train, test, client_categories, test_path, problems)
  if problems:
    raise _layout_error(folder, num_clients, problems)
  return assemble(train, test, client_tasks, client_categories)


def _read_client(path: str, k: int, problems: list[str]):
  """Client ``k``'s records as ``(examples, task, category)``, or None with the reasons added to ``problems``."""
  if not os.path.isfile(path):
    problems.append(f'missing client file {path}')
    return None
  try:
    with open(path, encoding='utf-8') as f:
      records = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    problems.append(f'{path} is not valid JSON ({e})')
    return None
  if not isinstance(records, list) or not records:
    problems.append(f'{path} must hold a non-empty JSON list of records, found {type(records).__name__}'
                    f'{" (empty)" if isinstance(records, list) else ""}')
    return None
  record_problems: list[str] = []
  examples = [_parse_record(r, f'{path} record {i}', record_problems) for i, r in enumerate(records)]
  if record_problems:
    problems.extend(_first_few(record_problems))
    return None
  pairs = sorted({(ex.task, ex.category) for ex in examples})
  if len(pairs) != 1:
    problems.append(f'client {k} ({path}) mixes tasks: (task, category) pairs {pairs}; each client must hold '
                    f'exactly one task')
    return None
  return tuple(examples), pairs[0][0], pairs[0][1]


def _read_test_pool(test_path: str, problems: list[str]) -> list[Example]:
  """The test pool's records (one JSON object per line), with any problems added to ``problems``."""
  test: list[Example] = []
  line_problems: list[str] = []
  try:
    with open(test_path, encoding='utf-8') as f:
      lines = f.readlines()
  except UnicodeDecodeError as e:
    lines = []
    line_problems.append(f'{test_path} is not UTF-8 text ({e})')
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f'{test_path} line {line_no}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      line_problems.append(f'{where} is not valid JSON ({e})')
      continue
    ex = _parse_record(record, where, line_problems)
    if ex is not None:
      test.append(ex)
  problems.extend(_first_few(line_problems))
  if not test and not line_problems:
    problems.append(f'test file {test_path} holds no records')
  return test


def _check_task_groups(train, test, client_categories, test_path, problems: list[str]) -> None:
  """``task`` and ``category`` must name the same groups (so grouping by category, as ``metric.py`` does, is grouping
  by Flan task), every test category must have a client and every client test examples."""
  task_to_cats: dict[str, set[str]] = {}
  cat_to_tasks: dict[str, set[str]] = {}
  for ex in (*[ex for client in train for ex in client], *test):
    task_to_cats.setdefault(ex.task, set()).add(ex.category)
    cat_to_tasks.setdefault(ex.category, set()).add(ex.task)
  for task, cats in task_to_cats.items():
    if len(cats) > 1:
      problems.append(f'task {task!r} appears under several categories {sorted(cats)}')
  for cat, tasks in cat_to_tasks.items():
    if len(tasks) > 1:
      problems.append(f'category {cat!r} holds several tasks {sorted(tasks)}; categories must name one task each')
  test_categories = list(dict.fromkeys(ex.category for ex in test))
  for cat in test_categories:
    if cat not in client_categories:
      problems.append(f'test category {cat!r} (task {sorted(cat_to_tasks[cat])[0]!r}) has no client; clients hold '
                      f'{client_categories}')
  for k, cat in enumerate(client_categories):
    if cat not in test_categories:
      problems.append(f'client {k} category {cat!r} has no test examples in {test_path}')


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and tokenization.
# ---------------------------------------------------------------------------------------------------------------------


def build_prompt(instruction: str) -> str:
  """The FedDPA prompt: ``'### Instruction:\\n{instruction}\\n\\n### Response:\\n'``.

  The training text is ``build_prompt(instruction) + output`` with nothing in between, as in the official Prompter.
  """
  return PROMPT_TEMPLATE.format(instruction=instruction)


def extract_response(text: str, *, eos_token: str | None = '</s>') -> str:
  """The answer in a decoded generation: the text after ``### Response:``, cut at ``eos_token`` and stripped.

  Like the official ``GlobalModel_generated.py``. If the marker is missing (for example, only the new tokens were
  decoded), the whole text is taken.
  """
  if RESPONSE_SPLIT in text:
    text = text.split(RESPONSE_SPLIT, 1)[1]
  if eos_token:
    text = text.split(eos_token, 1)[0]
  return text.strip()


class TokenizedBatch(NamedTuple):
  """Right-padded training batch.

  Attributes:
    input_ids: ``[N, L]`` int32 token ids, padded with the pad id.
    attention_mask: ``[N, L]`` int32, 1 on real tokens.
    loss_mask: ``[N, L]`` int32, 1 where the token is a prediction target. It lines up with ``input_ids``, so the
      loss is ``CE(logits[:, :-1], input_ids[:, 1:]) * loss_mask[:, 1:]``. Position 0 is never a target.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    """``[N]`` int32 number of real tokens per row."""
    return self.attention_mask.sum(axis=1).astype(np.int32)

  def select(self, indices: Sequence[int] | np.ndarray, *, length: int | None = None) -> TokenizedBatch:
    """Takes rows ``indices``, and optionally cuts the columns to ``length`` (e.g. a bucket from `bucket_by_length`).

    Raises:
      ValueError: if cutting to ``length`` would drop a real token.
    """
    idx = np.asarray(indices, dtype=np.int64)
    out = TokenizedBatch(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx])
    if length is None:
      return out
    longest = int(out.lengths.max(initial=0))
    if length < longest:
      raise ValueError(f'select(length={length}) would cut real tokens: the longest selected row has {longest}.')
    if length > out.input_ids.shape[1]:
      raise ValueError(f'select(length={length}) is longer than the batch ({out.input_ids.shape[1]} columns).')
    return TokenizedBatch(*(a[:, :length] for a in out))


class PromptBatch(NamedTuple):
  """Left-padded prompts for batched generation.

  With left padding, the last column holds every row's last prompt token. Generation continues from there, and
  FedDPA takes its instance representation from there (the final hidden state at position -1). Position ids for a
  left-padded row should count real tokens only (``cumsum(attention_mask) - 1``).

  Attributes:
    input_ids: ``[N, L]`` int32 token ids, with pad ids on the left.
    attention_mask: ``[N, L]`` int32, 1 on real tokens.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray


def _pad_width(lengths: Sequence[int], *, pad_to_multiple_of: int, length: int | None, what: str) -> int:
  longest = max(lengths)
  if length is not None:
    if length < longest:
      raise ValueError(f'{what}: length={length} is shorter than the longest sequence ({longest} tokens).')
    return int(length)
  if pad_to_multiple_of < 1:
    raise ValueError(f'{what}: pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}.')
  return int(-(-longest // pad_to_multiple_of) * pad_to_multiple_of)


def _pad_id(tokenizer, pad_id: int | None) -> int:
  if pad_id is not None:
    return int(pad_id)
  # The official code sets the pad id to 0 (LLaMA's <unk>). Pad positions are masked everywhere, so the value only
  # has to be a valid id.
  return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _field(example: Example | Mapping[str, str], name: str, i: int) -> str:
  try:
    value = example[name] if isinstance(example, Mapping) else getattr(example, name)
  except (KeyError, AttributeError):
    raise ValueError(f'example {i} has no {name!r} field.') from None
  if not isinstance(value, str):
    raise ValueError(f'example {i} field {name!r} is a {type(value).__name__}, not a string.')
  return value


def tokenize_for_training(tokenizer,
                          examples: Sequence[Example | Mapping[str, str]],
                          *,
                          max_length: int,
                          train_on_inputs: bool = False,
                          add_eos: bool = True,
                          pad_to_multiple_of: int = 1,
                          length: int | None = None,
                          pad_id: int | None = None) -> TokenizedBatch:
  """Tokenizes instruction examples for causal-LM training, as the official ``generate_and_tokenize_prompt`` does.

  For each example, the text ``build_prompt(instruction) + output`` is tokenized with the tokenizer's special tokens
  (LLaMA adds BOS) and truncated to ``max_length`` (the official ``cutoff_len``). EOS is appended only when the
  tokens do not already end in EOS and are shorter than ``max_length``. A truncated example therefore gets no EOS.

  The response boundary is found the way the official code finds it: the prompt is tokenized **on its own** (same
  special tokens and truncation, no EOS), and its token count ``p`` is the number of masked positions. If a
  tokenizer merges characters across the prompt/response boundary, position ``p`` of the full sequence is not the
  exact start of the response. The mask then starts one merged token early or late, just as it does in the official
  code. SentencePiece LLaMA, whose prompt ends in ``"\\n"``, does not merge there.

  Args:
    tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerFast`` or similar). It needs ``eos_token_id`` when
      ``add_eos``.
    examples: ``N`` records with ``instruction`` and ``output`` (:class:`Example` or mappings).
    max_length: the cutoff, in tokens, including special tokens and EOS.
    train_on_inputs: if True, every token (except position 0) is a target. If False (FedDPA), only the response
      tokens and EOS are.
    add_eos: append EOS as described above.
    pad_to_multiple_of: with ``length=None``, pad to the longest row rounded up to this multiple.
    length: pad every row to exactly this many columns, for fixed jit shapes. It must be at least the longest row.
    pad_id: the id written into padding. Default: the tokenizer's pad id, or 0 if it has none (as the official code).

  Returns:
    :class:`TokenizedBatch` with ``[N, L]`` arrays, right-padded.
  """
  if not examples:
    raise ValueError('tokenize_for_training got no examples.')
  if max_length < 1:
    raise ValueError(f'max_length must be at least 1, got {max_length}.')
  eos = tokenizer.eos_token_id
  if add_eos and eos is None:
    raise ValueError('add_eos=True but the tokenizer has no eos_token_id; set eos_token on the tokenizer.')
  prompts = [build_prompt(_field(ex, 'instruction', i)) for i, ex in enumerate(examples)]
  fulls = [p + _field(ex, 'output', i) for i, (p, ex) in enumerate(zip(prompts, examples))]
  full_ids = tokenizer(fulls, truncation=True, max_length=max_length)['input_ids']
  prompt_lens = [len(ids) for ids in tokenizer(prompts, truncation=True, max_length=max_length)['input_ids']]

  rows = []
  for ids in full_ids:
    ids = list(ids)
    if add_eos and (not ids or ids[-1] != eos) and len(ids) < max_length:
      ids.append(eos)
    rows.append(ids)
  width = _pad_width([len(r) for r in rows], pad_to_multiple_of=pad_to_multiple_of, length=length,
                     what='tokenize_for_training')
  n = len(rows)
  input_ids = np.full((n, width), _pad_id(tokenizer, pad_id), dtype=np.int32)
  attention_mask = np.zeros((n, width), dtype=np.int32)
  loss_mask = np.zeros((n, width), dtype=np.int32)
  for i, (ids, p) in enumerate(zip(rows, prompt_lens)):
    input_ids[i, :len(ids)] = ids
    attention_mask[i, :len(ids)] = 1
    start = 1 if train_on_inputs else max(p, 1)
    loss_mask[i, start:len(ids)] = 1
  return TokenizedBatch(input_ids, attention_mask, loss_mask)


def client_training_arrays(tokenizer,
                           examples_by_client: Sequence[Sequence[Example | Mapping[str, str]]],
                           *,
                           max_length: int,
                           train_on_inputs: bool = False,
                           pad_id: int | None = None) -> FederatedData:
  """Tokenizes every client's training examples into the padded federated layout the round consumes.

  Clients may hold different numbers of examples: each is padded to ``N = max_k n_k`` rows, and ``counts`` says how
  many are real, so the round masks the padding rows (their attention and loss masks are all zero). Every row is
  padded to ``L = max_length`` columns, so all clients share one compiled shape.

  Args:
    tokenizer: a Hugging Face tokenizer (see :func:`tokenize_for_training`).
    examples_by_client: ``K`` sequences of records with ``instruction`` and ``output``; client ``k``'s are ``n_k``.
    max_length: the cutoff and padded length ``L``, in tokens.
    train_on_inputs: as in :func:`tokenize_for_training`.
    pad_id: the id written into padding (default: the tokenizer's pad id, or 0).

  Returns:
    :class:`~fedjax_adapters.data.federated.FederatedData` with ``x`` a dict of ``input_ids``, ``attention_mask``,
    ``loss_mask``, each ``[K, N, L]`` int32; ``y`` ``[K, N]`` int32 zeros (the targets are inside ``x``); ``counts``
    ``[K]`` int32. Pass it to ``client_data``.

  Raises:
    ValueError: naming the client, for no clients, a client that is not a sequence of records, a client with no
      examples, or a malformed record (missing or non-string ``instruction`` / ``output``).
  """
  if isinstance(examples_by_client, (str, Mapping)) or not examples_by_client:
    raise ValueError('client_training_arrays needs a non-empty sequence of clients, each a sequence of records.')
  batches = []
  for k, examples in enumerate(examples_by_client):
    if isinstance(examples, (str, Mapping, Example)) or not isinstance(examples, Sequence):
      raise ValueError(f'client {k}: examples must be a sequence of records, got {type(examples).__name__}.')
    if not examples:
      raise ValueError(f'client {k} has no training examples; every client needs at least one.')
    try:
      batches.append(tokenize_for_training(tokenizer, examples, max_length=max_length, length=max_length,
                                           train_on_inputs=train_on_inputs, pad_id=pad_id))
    except ValueError as e:
      raise ValueError(f'client {k}: {e}') from None
  counts = np.array([len(b.input_ids) for b in batches], dtype=np.int32)
  n = int(counts.max())
  x = {'input_ids': np.full((len(batches), n, max_length), _pad_id(tokenizer, pad_id), np.int32),
       'attention_mask': np.zeros((len(batches), n, max_length), np.int32),
       'loss_mask': np.zeros((len(batches), n, max_length), np.int32)}
  for k, b in enumerate(batches):
    for name in x:
      x[name][k, :counts[k]] = getattr(b, name)
  return FederatedData(x, np.zeros((len(batches), n), np.int32), counts)


def tokenize_prompts(tokenizer,
                     prompts: Sequence[str],
                     *,
                     max_length: int,
                     truncation: str = 'error',
                     pad_to_multiple_of: int = 1,
                     length: int | None = None,
                     pad_id: int | None = None) -> PromptBatch:
  """Tokenizes finished prompt strings (see `build_prompt`) for batched generation, LEFT-padded.

  The official inference code does not truncate prompts. Cutting the end of a prompt would drop ``### Response:``,
  so prompts longer than ``max_length`` raise an error by default.

  Args:
    tokenizer: a Hugging Face tokenizer. Special tokens (LLaMA's BOS) are added as usual.
    prompts: ``N`` prompt strings.
    max_length: the most tokens a prompt may have.
    truncation: ``'error'`` (default) raises ValueError for a prompt over ``max_length``. ``'left'`` keeps its last
      ``max_length`` tokens, which drops BOS and the start of the instruction.
    pad_to_multiple_of: with ``length=None``, pad to the longest prompt rounded up to this multiple.
    length: pad every row to exactly this many columns (fixed jit shapes).
    pad_id: the id written into padding. Default: the tokenizer's pad id, or 0.

  Returns:
    :class:`PromptBatch` with ``[N, L]`` arrays. Real tokens are right-aligned, so column ``L - 1`` is every row's
    last prompt token.
  """
  if not prompts:
    raise ValueError('tokenize_prompts got no prompts.')
  if truncation not in ('error', 'left'):
    raise ValueError(f"truncation must be 'error' or 'left', got {truncation!r}.")
  if isinstance(prompts, str):
    raise ValueError('tokenize_prompts expects a sequence of prompt strings, got a single string.')
  rows = [list(ids) for ids in tokenizer(list(prompts))['input_ids']]
  for i, ids in enumerate(rows):
    if len(ids) > max_length:
      if truncation == 'error':
        raise ValueError(f'prompt {i} has {len(ids)} tokens, more than max_length={max_length}; raise max_length or '
                         f"pass truncation='left'.")
      rows[i] = ids[-max_length:]
  width = _pad_width([len(r) for r in rows], pad_to_multiple_of=pad_to_multiple_of, length=length,
                     what='tokenize_prompts')
  input_ids = np.full((len(rows), width), _pad_id(tokenizer, pad_id), dtype=np.int32)
  attention_mask = np.zeros((len(rows), width), dtype=np.int32)
  for i, ids in enumerate(rows):
    if ids:
      input_ids[i, width - len(ids):] = ids
      attention_mask[i, width - len(ids):] = 1
  return PromptBatch(input_ids, attention_mask)


def bucket_by_length(lengths: Sequence[int] | np.ndarray, bucket_sizes: Sequence[int]) -> dict[int, np.ndarray]:
  """Groups sequences into the smallest bucket that holds them, so each bucket compiles one shape.

  Args:
    lengths: ``[N]`` sequence lengths (e.g. ``TokenizedBatch.lengths``).
    bucket_sizes: the allowed padded lengths, positive and in any order.

  Returns:
    bucket size -> ``[n_b]`` int64 indices (ascending) of the sequences whose smallest fitting bucket it is. Only
    non-empty buckets appear, in increasing size. ``batch.select(idx, length=size)`` cuts a batch to a bucket.

  Raises:
    ValueError: if ``bucket_sizes`` is empty or not positive, or if a sequence is longer than the largest bucket.
  """
  sizes = np.unique(np.asarray(bucket_sizes, dtype=np.int64))
  if sizes.size == 0 or sizes[0] < 1:
    raise ValueError(f'bucket_sizes must be non-empty and positive, got {list(bucket_sizes)}.')
  lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
  too_long = np.nonzero(lengths > sizes[-1])[0]
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(f'sequence {i} has length {int(lengths[i])}, longer than the largest bucket {int(sizes[-1])} '
                     f'({too_long.size} sequence(s) too long).')
  which = np.searchsorted(sizes, lengths, side='left')
  return {int(sizes[b]): np.nonzero(which == b)[0] for b in range(sizes.size) if np.any(which == b)}


def _as_numpy_rng(rng_or_key) -> np.random.Generator:
  """A numpy Generator from a Generator, an int seed, or a JAX PRNG key (typed or raw uint32)."""
  if isinstance(rng_or_key, np.random.Generator):
    return rng_or_key
  if isinstance(rng_or_key, (int, np.integer)) and not isinstance(rng_or_key, bool):
    return np.random.default_rng(int(rng_or_key))
  import jax  # Imported here so that loading and tokenizing data does not need JAX.
  if hasattr(rng_or_key, 'dtype') and jax.dtypes.issubdtype(rng_or_key.dtype, jax.dtypes.prng_key):
    rng_or_key = jax.random.key_data(rng_or_key)
  data = np.asarray(rng_or_key)
  if data.dtype != np.uint32 or data.size == 0:
    raise ValueError(f'rng_or_key must be a numpy Generator, an int seed or a JAX PRNG key, got {type(rng_or_key)} '
                     f'with dtype {getattr(data, "dtype", None)}.')
  return np.random.default_rng(data.ravel().tolist())


def sample_references(rng_or_key, num_local: int, num_refs: int, num_test: int) -> np.ndarray:
  """Draws the local reference examples for FedDPA's instance-wise weight, with a seed.

  The official ``get_weight`` calls ``random.sample(local_train, S)`` anew for every test instance, without a seed.
  Here each test instance also gets its own ``S`` distinct examples, but the draw is seeded, so a run repeats exactly.

  Args:
    rng_or_key: a ``np.random.Generator``, an int seed, or a JAX PRNG key (e.g. ``fold_in(key, client_id)``). A
      Generator is advanced in place.
    num_local: the number of local training examples to draw from.
    num_refs: ``S``, references per test instance (FedDPA default 5).
    num_test: ``T``, the number of test instances.

  Returns:
    ``[T, S]`` int32 indices into the client's training set, distinct within each row.
  """
  if num_local < 1 or num_refs < 1 or num_test < 0:
    raise ValueError(f'need num_local >= 1, num_refs >= 1 and num_test >= 0, got num_local={num_local}, '
                     f'num_refs={num_refs}, num_test={num_test}.')
  if num_refs > num_local:
    raise ValueError(f'num_refs={num_refs} distinct references cannot be drawn from num_local={num_local} examples.')
  rng = _as_numpy_rng(rng_or_key)
  # The first S entries of an independent random permutation per row: S distinct draws without replacement.
  keys = rng.random((num_test, num_local))
  return np.argsort(keys, axis=1, kind='stable')[:, :num_refs].astype(np.int32)
