"""Data validation at the boundary: stack_clients, check_client_data and FedDPA's per-client training arrays."""
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fedjax_adapters.data import feddpa
from fedjax_adapters.data.federated import FederatedData, check_client_data, stack_clients


def test_stack_clients_pads_uneven_clients():
  xs = [np.arange(6.).reshape(3, 2), np.arange(2.).reshape(1, 2) + 10]
  ys = [np.array([0, 1, 2]), np.array([3])]
  fd = stack_clients(xs, ys)
  np.testing.assert_array_equal(fd.counts, [3, 1])
  np.testing.assert_array_equal(fd.x[1], [[10., 11.], [0., 0.], [0., 0.]])
  np.testing.assert_array_equal(fd.y, [[0, 1, 2], [3, 0, 0]])
  check_client_data(fd.x, fd.y, fd.counts, num_classes=4)


def test_stack_clients_rejects_a_different_trailing_shape_naming_the_client():
  xs = [np.zeros((6, 10)), np.zeros((6, 10)), np.zeros((6, 1))]  # numpy would broadcast client 2 into [6, 10]
  ys = [np.zeros(6, np.int32)] * 3
  with pytest.raises(ValueError, match=r'client 2 inputs have trailing shape \(1,\).*client 0 has \(10,\)'):
    stack_clients(xs, ys)
  with pytest.raises(ValueError, match=r'client 1 targets have trailing shape \(2,\).*client 0 has \(\)'):
    stack_clients(xs[:2], [np.zeros(6, np.int32), np.zeros((6, 2), np.int32)])
  with pytest.raises(ValueError, match='client 1 targets have dtype float64 but client 0 has int32'):
    stack_clients(xs[:2], [np.zeros(6, np.int32), np.full(6, 0.5)])  # 0.5 would silently become label 0
  with pytest.raises(ValueError, match='client 0 has 6 inputs but 5 targets'):
    stack_clients(xs[:1], [np.zeros(5, np.int32)])
  with pytest.raises(ValueError, match='client 1 has a scalar input'):
    stack_clients([np.zeros((2, 3)), np.float32(1)], [np.zeros(2), np.zeros(2)])


def padded(counts, n=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  k = len(counts)
  return rng.normal(size=(k, n, 2)).astype(np.float32), rng.integers(0, classes, (k, n)).astype(np.int32), \
      np.asarray(counts, np.int32)


def test_counts_must_lie_within_the_padded_rows():
  x, y, _ = padded([4, 2, 3])
  check_client_data(x, y, np.array([4, 0, 3]))
  with pytest.raises(ValueError, match=r'client 1 has count -1, outside \[0, 4\]'):
    check_client_data(x, y, np.array([4, -1, 3]))
  with pytest.raises(ValueError, match=r'client 2 has count 5, outside \[0, 4\].*1 client\(s\)'):
    check_client_data(x, y, np.array([4, 2, 5]))
  with pytest.raises(ValueError, match='1-D integer array'):
    check_client_data(x, y, np.array([4., 2., 3.]))
  with pytest.raises(ValueError, match=r'not \[K, N, ...\] with K = 2'):
    check_client_data(x, y, np.array([4, 2]))
  with pytest.raises(ValueError, match='disagree on padded rows'):
    check_client_data(x, y[:, :3], np.array([3, 2, 3]))


def test_labels_are_checked_on_real_rows_only():
  x, y, counts = padded([4, 2, 3], classes=3)
  y[1, 2:] = -1  # padding rows of client 1 may hold anything
  check_client_data(x, y, counts, num_classes=3)
  y[2, 1] = -1  # label -1 would silently index the last class
  with pytest.raises(ValueError, match=r'client 2 row 1 has label -1, outside \[0, 3\)'):
    check_client_data(x, y, counts, num_classes=3)
  y[2, 1] = 0
  y[0, 3] = 3  # label == num_classes gives a NaN loss
  y[2, 0] = 7
  with pytest.raises(ValueError, match=r'client 0 row 3 has label 3, outside \[0, 3\); 2 client\(s\)'):
    check_client_data(x, y, counts, num_classes=3)
  with pytest.raises(ValueError, match='integer array'):
    check_client_data(x, y.astype(np.float32), counts, num_classes=3)
  with pytest.raises(ValueError, match='num_classes must be >= 1'):
    check_client_data(x, y, counts, num_classes=0)


def test_labels_with_trailing_axes_and_pytree_inputs():
  _, y, counts = padded([4, 1], classes=5)
  x = {'a': np.zeros((2, 4, 3)), 'b': (np.zeros((2, 4)),)}
  labels = np.repeat(y[:, :, None], 2, axis=2)  # e.g. per-token labels [K, N, T]
  check_client_data(x, labels, counts, num_classes=5)
  labels[1, 0, 1] = 9
  with pytest.raises(ValueError, match=r'client 1 row 0 has label 9'):
    check_client_data(x, labels, counts, num_classes=5)
  with pytest.raises(ValueError, match=r'x leaf of shape \(2,\) is not \[K, N, ...\]'):
    check_client_data({'a': np.zeros((2,))}, y, counts)


def test_clients_too_small_for_the_batch_only_when_asked():
  x, y, _ = padded([8, 8, 8], n=8)
  counts = np.array([8, 3, 5], np.int32)
  check_client_data(x, y, counts)  # Small clients are fine unless the caller says otherwise.
  check_client_data(x, y, counts, batch_size=3)
  with pytest.raises(ValueError, match=r'client 1 has 3 examples, fewer than 1 batch\(es\) of 4; 1 client'):
    check_client_data(x, y, counts, batch_size=4)
  with pytest.raises(ValueError, match=r'client 1 has 3 examples, fewer than 2 batch\(es\) of 2; 1 client'):
    check_client_data(x, y, counts, batch_size=2, min_batches=2)
  with pytest.raises(ValueError, match='batch_size and min_batches must be >= 1'):
    check_client_data(x, y, counts, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# FedDPA: uneven clients.
# ---------------------------------------------------------------------------------------------------------------------


def word_tokenizer() -> PreTrainedTokenizerFast:
  """A LLaMA-like word tokenizer: BOS prepended, EOS not added automatically, pad id 0."""
  tok = Tokenizer(models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  words = [feddpa.build_prompt('say a b c d e') + 'yes no maybe']
  tok.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=['<pad>', '<unk>', '<s>', '</s>']))
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>',
                                 unk_token='<unk>')


def record(instruction, output):
  return feddpa.Example(instruction, output, 'task', 'cat')


CLIENTS = [[record('say a', 'yes'), record('say b c', 'no'), record('say d', 'maybe yes')],
           [record('say e', 'no')],
           [record('say a b', 'yes'), {'instruction': 'say c', 'output': 'maybe'}]]


def test_client_training_arrays_pads_uneven_clients():
  tok = word_tokenizer()
  fd = feddpa.client_training_arrays(tok, CLIENTS, max_length=16)
  assert isinstance(fd, FederatedData)
  np.testing.assert_array_equal(fd.counts, [3, 1, 2])
  assert fd.y.shape == (3, 3) and not fd.y.any()
  for k, examples in enumerate(CLIENTS):
    alone = feddpa.tokenize_for_training(tok, examples, max_length=16, length=16)
    n = len(examples)
    for name in ('input_ids', 'attention_mask', 'loss_mask'):
      assert fd.x[name].shape == (3, 3, 16) and fd.x[name].dtype == np.int32
      np.testing.assert_array_equal(fd.x[name][k, :n], getattr(alone, name))  # real rows: the client's own batch
      assert not fd.x[name][k, n:].any()  # padding rows: pad id 0, nothing attended, no loss
  check_client_data(fd.x, fd.y, fd.counts)


def test_client_training_arrays_errors_name_the_client():
  tok = word_tokenizer()
  with pytest.raises(ValueError, match='client 1 has no training examples'):
    feddpa.client_training_arrays(tok, [CLIENTS[0], []], max_length=16)
  with pytest.raises(ValueError, match="client 2: example 1 has no 'output' field"):
    feddpa.client_training_arrays(tok, [CLIENTS[0], CLIENTS[1], [CLIENTS[0][0], {'instruction': 'say a'}]],
                                  max_length=16)
  with pytest.raises(ValueError, match="client 0: example 0 field 'instruction' is a int"):
    feddpa.client_training_arrays(tok, [[{'instruction': 3, 'output': 'x'}]], max_length=16)
  with pytest.raises(ValueError, match='client 0: examples must be a sequence of records, got Example'):
    feddpa.client_training_arrays(tok, CLIENTS[0], max_length=16)  # A flat list of records, not one per client.
  with pytest.raises(ValueError, match='non-empty sequence of clients'):
    feddpa.client_training_arrays(tok, [], max_length=16)
  with pytest.raises(ValueError, match='client 0: max_length must be at least 1'):
    feddpa.client_training_arrays(tok, CLIENTS, max_length=0)
