"""Token ids and next-token examples for the natural-partition language tasks (Shakespeare, Stack Overflow).

Both tasks are next-token prediction with one label per example, so the standard ``'xent'`` loss and accuracy
apply unchanged: an example is a context of ``L`` ids (left-padded with :data:`PAD`) and the id that follows it.

* **Shakespeare** (LEAF, Caldas et al. arXiv 1812.01097; TFF's ``shakespeare`` HDF5): characters. The vocabulary is
  the 86 characters TFF's Shakespeare pipeline uses, here in sorted order, after the pad id 0; then OOV, BOS, EOS
  (90 ids, as in FLoRAL's public ``vocab_size: 90``). LEAF's examples are an 80-character window and the next
  character; :func:`char_windows` cuts them from a line of text the same way (stride 1 = LEAF's every position).
* **Stack Overflow** next-word prediction (TFF, Reddi et al. arXiv 2003.00295): words. The vocabulary is the
  ``vocab_size`` most frequent words (10,000), then one OOV, BOS and EOS id; a sentence is cut at ``max_length``
  words (20) and framed ``BOS w_1 .. w_n EOS``; :func:`word_prefixes` makes one example per position: the preceding
  ids (at most ``max_length``) and the id at that position. Accuracy over these examples is accuracy over every
  predicted token, OOV and EOS included.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

PAD = 0
# The characters of TFF's Shakespeare vocabulary (86 of them: letters, digits, punctuation, space, \n, \r).
SHAKESPEARE_CHARS = ''.join(sorted(
    'dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'))
SHAKESPEARE_WINDOW = 80   # LEAF / TFF sequence length
STACKOVERFLOW_VOCAB = 10_000
STACKOVERFLOW_LENGTH = 20


class Vocabulary:
  """Token -> id: ``PAD = 0``, the tokens ``1 .. V``, then ``oov = V + 1``, ``bos = V + 2``, ``eos = V + 3``.

  Attributes:
    tokens: the ``V`` in-vocabulary tokens, in id order.
    size: ``V + 4``, the number of ids (the model's output width).
  """

  def __init__(self, tokens: Sequence[str]):
    tokens = list(tokens)
    if len(set(tokens)) != len(tokens):
      raise ValueError(f'vocabulary tokens must be distinct; {len(tokens) - len(set(tokens))} repeat.')
    self.tokens = tokens
    self.ids = {t: i + 1 for i, t in enumerate(tokens)}
    self.oov, self.bos, self.eos = len(tokens) + 1, len(tokens) + 2, len(tokens) + 3
    self.size = len(tokens) + 4

  def encode(self, tokens: Iterable[str]) -> np.ndarray:
    """``[n]`` int32 ids (unknown tokens map to ``oov``)."""
    return np.fromiter((self.ids.get(t, self.oov) for t in tokens), dtype=np.int32)


def shakespeare_vocabulary() -> Vocabulary:
  """The 86 characters plus PAD / OOV / BOS / EOS: 90 ids."""
  return Vocabulary(list(SHAKESPEARE_CHARS))


def word_vocabulary(counts: Mapping[str, int] | Iterable[tuple[str, int]], size: int = STACKOVERFLOW_VOCAB
                    ) -> Vocabulary:
  """The ``size`` most frequent words (ties: first seen first), as TFF builds Stack Overflow's vocabulary.

  Args:
    counts: word -> count (e.g. TFF's ``stackoverflow.word_count``: users whose training posts hold the word).
    size: number of words kept.
  """
  items = list(counts.items() if isinstance(counts, Mapping) else counts)
  order = sorted(range(len(items)), key=lambda i: -items[i][1])  # stable: equal counts keep their order
  return Vocabulary([items[i][0] for i in order[:size]])


def read_word_counts(path) -> dict[str, int]:
  """TFF's ``stackoverflow.word_count`` file: one ``word count`` pair per line. Raises naming the line."""
  counts = {}
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(f'{path} line {line_no} is {line.strip()!r}; expected "word count".')
      counts[parts[0]] = int(parts[1])
  return counts


def _left_padded(ids: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
  """``[len(ends), length]``: row ``i`` holds ``ids[max(0, ends[i] - length):ends[i]]``, left-padded with PAD."""
  padded = np.concatenate([np.full(length, PAD, ids.dtype), ids])
  cols = ends[:, None] + np.arange(length)[None, :]  # into `padded`, which is shifted by `length`
  return padded[cols]


def char_windows(text: str, vocab: Vocabulary, *, window: int = SHAKESPEARE_WINDOW, stride: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Next-character examples from one text: ``(x [n, window], y [n])`` int32.

  The text is framed ``BOS text EOS``; every ``stride``-th position ``i >= 1`` gives the example ``(the window ids
  before i, left-padded; id i)``. Stride 1 is LEAF's construction (every character predicted once).
  """
  if window < 1 or stride < 1:
    raise ValueError(f'window and stride must be >= 1, got {window} and {stride}.')
  ids = np.concatenate([[vocab.bos], vocab.encode(text), [vocab.eos]]).astype(np.int32)
  ends = np.arange(1, len(ids), stride)
  return _left_padded(ids, ends, window), ids[ends]


def word_prefixes(sentence: str, vocab: Vocabulary, *, max_length: int = STACKOVERFLOW_LENGTH
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Next-word examples from one space-separated sentence: ``(x [n + 1, max_length], y [n + 1])`` int32.

  The sentence keeps its first ``max_length`` words and is framed ``BOS w_1 .. w_n EOS``; position ``i`` predicts
  id ``i`` from the ids before it (left-padded).
  """
  words = sentence.split()[:max_length]
  ids = np.concatenate([[vocab.bos], vocab.encode(words), [vocab.eos]]).astype(np.int32)
  ends = np.arange(1, len(ids))
  return _left_padded(ids, ends, max_length), ids[ends]
