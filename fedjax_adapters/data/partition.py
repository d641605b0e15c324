"""Client partitions and cluster-wise concept shift for the FLoRAL vision tasks (arXiv 2410.03497).

The FLoRAL tasks (reference notes §3) give client ``k`` the ground-truth cluster ``k mod C`` and then:

* MNIST / CIFAR-10 *rotate*: an IID share of the data, every image of cluster ``c`` turned by ``(360 // C) · c``
  degrees counter-clockwise (0/90/180/270 for C = 4);
* MNIST / CIFAR-10 *label_shift*: an IID share, labels mapped ``y -> (y + c) mod num_classes``;
* CIFAR-100: fine label ``l`` belongs to cluster ``l mod 10``; the 10 clients of a cluster take contiguous shards of
  that cluster's examples (a 100-way head, no transform);
* ``*_reduced``: each client keeps 5% of its training examples (at least 10); test sets stay whole.

Every client has its own test split with its cluster's transform. Index-level functions (``iid_partition``,
``concept_shift_partition``, ``cifar100_cluster_partition``) return per-client index arrays; the ``*_dataset``
functions gather and transform the examples into a padded :class:`~fedjax_adapters.data.federated.FederatedDataset`.
All randomness comes from ``numpy.random.Generator``s, so a seed fixes the partition bit for bit.

These are FLoRAL's own constructions, kept so the README's numbers stay reproducible. Generic label-skew splits
(Dirichlet, pathological) come from ``flwr-datasets`` instead: ``fedjax_adapters.data.natural.label_skew_partition``.
None of them runs inside the compiled round; they all build the data once, on the host.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from fedjax_adapters.data.federated import FederatedDataset, stack_clients

SHIFTS = ('rotate', 'label_shift', 'none')
_ROTATE_CHUNK = 1024  # images per bilinear-rotation chunk


class ClientSplits(NamedTuple):
  """Per-client example indices.

  Attributes:
    train: ``K`` int64 index arrays into the training arrays.
    test: ``K`` int64 index arrays into the test arrays (the training arrays themselves when the test split was cut
      from them with ``test_fraction``).
    clusters: ``[K]`` int32 ground-truth cluster of each client.
  """
  train: list[np.ndarray]
  test: list[np.ndarray]
  clusters: np.ndarray


# ----------------------------------------------------------------------------------------------------------------------
# Index partitions
# ----------------------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: int) -> int:
  if int(value) != value or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  return int(value)


def iid_partition(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Shuffles ``range(n)`` and cuts it into ``num_clients`` near-equal shares (sizes differ by at most one).

  Args:
    n: number of examples.
    num_clients: number of shares ``K``.
    rng: source of the shuffle.

  Returns:
    ``K`` int64 index arrays; together they hold every index in ``range(n)`` exactly once.
  """
  num_clients = _check_positive('num_clients', num_clients)
  if n < 0:
    raise ValueError(f'n must be non-negative, got {n}.')
  return [np.asarray(s, dtype=np.int64) for s in np.array_split(rng.permutation(n), num_clients)]


def cluster_assignment(num_clients: int, num_clusters: int, sizes: Sequence[int] | None = None) -> np.ndarray:
  """Ground-truth cluster of each client. Returns ``[K]`` int32.

  Without ``sizes``: ``k mod C``, as in every FLoRAL task (equal clusters). With ``sizes`` (``C`` positive counts
  summing to ``K``): the first ``sizes[0]`` clients in cluster 0, the next ``sizes[1]`` in cluster 1, and so on — a
  task with a minority cluster, for measuring what a robust aggregator does to it.
  """
  num_clients = _check_positive('num_clients', num_clients)
  num_clusters = _check_positive('num_clusters', num_clusters)
  if sizes is None:
    return (np.arange(num_clients) % num_clusters).astype(np.int32)
  sizes = [int(s) for s in sizes]
  if len(sizes) != num_clusters or min(sizes) < 1 or sum(sizes) != num_clients:
    raise ValueError(f'cluster sizes {sizes} must be {num_clusters} positive counts (num_clusters) summing to '
                     f'num_clients={num_clients}.')
  return np.repeat(np.arange(num_clusters), sizes).astype(np.int32)


def split_train_test(indices: np.ndarray, test_fraction: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Splits one client's indices into ``(train, test)``, with ``round(test_fraction · n)`` test examples."""
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  indices = rng.permutation(np.asarray(indices, dtype=np.int64))
  n_test = int(round(test_fraction * len(indices)))
  return indices[n_test:], indices[:n_test]


def reduce_fraction(indices: np.ndarray, keep: float = 0.05, minimum: int = 10,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Keeps ``floor(keep · n)`` of a client's indices, but at least ``minimum`` (or all ``n`` if fewer).

  This is the FLoRAL "reduced" setting (``train_reduction=0.95``, ``min_reduced_size=10``), applied to each client's
  training indices.

  Args:
    indices: ``[n]`` one client's indices.
    keep: fraction to keep, in (0, 1].
    minimum: lower bound on the number kept.
    rng: picks a random subset; ``None`` keeps the first ones (already random after an IID partition).

  Returns:
    The kept indices, in their original relative order when ``rng`` is None.
  """
  if not 0.0 < keep <= 1.0:
    raise ValueError(f'keep must be in (0, 1], got {keep}.')
  if minimum < 0:
    raise ValueError(f'minimum must be non-negative, got {minimum}.')
  indices = np.asarray(indices, dtype=np.int64)
  n = len(indices)
  # The small epsilon keeps e.g. 0.05 · 200 from flooring to 9 through float rounding.
  n_keep = min(n, max(int(math.floor(keep * n + 1e-9)), minimum))
  if rng is None:
    return indices[:n_keep]
  return indices[np.sort(rng.choice(n, size=n_keep, replace=False))]


def cifar100_cluster_partition(labels: np.ndarray, *, num_clients: int = 100, num_clusters: int = 10,
                               rng: np.random.Generator | None = None) -> list[np.ndarray]:
  """FLoRAL's CIFAR-100 rule: label ``l`` in cluster ``l % C``; client ``k`` gets shard ``k // C`` of cluster ``k % C``.

  The examples of a cluster (in dataset order, or shuffled by ``rng``) are cut into ``K / C`` contiguous shards of
  near-equal size, so with 100 clients and 10 clusters each client holds ~500 CIFAR-100 training images of 10 fine
  labels.

  Args:
    labels: ``[N]`` fine labels.
    num_clients: ``K``, a multiple of ``num_clusters``.
    num_clusters: ``C``.
    rng: shuffles each cluster's examples before sharding (the FLoRAL pipeline shuffles the split first);
      ``None`` keeps dataset order.

  Returns:
    ``K`` int64 index arrays; together they hold every index exactly once.
  """
  labels = np.asarray(labels)
  num_clients = _check_positive('num_clients', num_clients)
  num_clusters = _check_positive('num_clusters', num_clusters)
  if num_clients % num_clusters:
    raise ValueError(f'num_clients={num_clients} must be a multiple of num_clusters={num_clusters} so that every '
                     f'cluster has the same number of clients.')
  if labels.ndim != 1:
    raise ValueError(f'labels must be one-dimensional, got shape {labels.shape}.')
  per_cluster = num_clients // num_clusters
  shards = []
  for c in range(num_clusters):
    idx = np.flatnonzero(labels % num_clusters == c)
    if rng is not None:
      idx = rng.permutation(idx)
    shards.append(np.array_split(idx, per_cluster))
  return [np.asarray(shards[k % num_clusters][k // num_clusters], dtype=np.int64) for k in range(num_clients)]


# ----------------------------------------------------------------------------------------------------------------------
# Cluster transforms
# ----------------------------------------------------------------------------------------------------------------------


def _rotate_bilinear(images: np.ndarray, degrees: float) -> np.ndarray:
  """Counter-clockwise rotation about the image centre, bilinear, zero outside (images ``[N, H, W, C]``)."""
  _, h, w, _ = images.shape
  theta = math.radians(degrees)
  cos, sin = math.cos(theta), math.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij')
  yo, xo = rows - cy, cols - cx
  # Inverse map: output pixel (x', y') samples the source at R(-theta)(x', y'). With rows growing downwards, a
  # counter-clockwise turn sends (x, y) to (x cos + y sin, -x sin + y cos); for 90° this is exactly np.rot90.
  xs = xo * cos - yo * sin + cx
  ys = xo * sin + yo * cos + cy
  # Snap coordinates within float noise of a pixel centre, so multiples of 90° reproduce np.rot90 exactly.
  xs = np.where(np.abs(xs - np.round(xs)) < 1e-6, np.round(xs), xs)
  ys = np.where(np.abs(ys - np.round(ys)) < 1e-6, np.round(ys), ys)
  x0, y0 = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
  fx, fy = xs - x0, ys - y0
  taps = []  # the four bilinear neighbours: (source rows, source cols, weight [H, W])
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      yy, xx = y0 + dy, x0 + dx
      weight = np.where((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w), wy * wx, 0.0)
      if weight.any():
        taps.append((np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1), weight[:, :, None]))
  out = np.empty_like(images)
  # Chunks bound the float64 temporaries (all of CIFAR at once would need gigabytes).
  for start in range(0, len(images), _ROTATE_CHUNK):
    src = images[start:start + _ROTATE_CHUNK].astype(np.float64)
    acc = np.zeros(src.shape, dtype=np.float64)
    for yy, xx, weight in taps:
      acc += weight * src[:, yy, xx, :]
    if np.issubdtype(images.dtype, np.integer):
      info = np.iinfo(images.dtype)
      acc = np.clip(np.round(acc), info.min, info.max)
    out[start:start + _ROTATE_CHUNK] = acc.astype(images.dtype)
  return out


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
  """Rotates images counter-clockwise (the torchvision ``rotate`` convention FLoRAL uses) by ``degrees``.

  Multiples of 90° are exact (``np.rot90`` on the H, W axes); other angles resample bilinearly about the image centre
  with zeros outside, keeping the size. (torchvision's default is nearest-neighbour; FLoRAL's C = 4 clusters only ever
  use multiples of 90°, where the two agree.)

  Args:
    images: ``[N, H, W, C]`` or ``[N, H, W]`` images, any numeric dtype (integers are rounded back).
    degrees: angle; ``0`` returns a copy.

  Returns:
    Rotated images with the same shape and dtype (for odd quarter turns ``H`` and ``W`` swap, so they must match
    for images to stay stackable; a ValueError says so otherwise).
  """
  images = np.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f'rotate expects [N, H, W] or [N, H, W, C] images, got shape {images.shape}.')
  squeeze = images.ndim == 3
  if squeeze:
    images = images[..., None]
  if images.shape[1] != images.shape[2] and degrees % 180 != 0:
    raise ValueError(f'rotating non-square images of shape {images.shape} by {degrees} degrees would change or '
                     f'crop their shape; only multiples of 180 degrees are supported for them.')
  if degrees % 90 == 0:
    out = np.ascontiguousarray(np.rot90(images, k=int(degrees // 90) % 4, axes=(1, 2)))
  else:
    out = _rotate_bilinear(images, degrees)
  return out[..., 0] if squeeze else out


def label_shift(labels: np.ndarray, c: int, num_classes: int) -> np.ndarray:
  """Cluster ``c``'s label permutation ``y -> (y + c) mod num_classes`` (same dtype as ``labels``)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}].')
  return ((labels.astype(np.int64) + int(c)) % num_classes).astype(labels.dtype)


def cluster_shift(images: np.ndarray, labels: np.ndarray, cluster: int, *, shift: str, num_clusters: int,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Applies cluster ``cluster``'s concept shift to a batch of examples.

  Args:
    images: ``[N, H, W, C]`` images.
    labels: ``[N]`` labels.
    cluster: ``c`` in ``[0, num_clusters)``.
    shift: ``'rotate'`` (by ``(360 // num_clusters) · c`` degrees), ``'label_shift'`` (``y -> (y + c) mod
      num_classes``) or ``'none'``.
    num_clusters: ``C``.
    num_classes: label range for ``'label_shift'``.

  Returns:
    ``(images, labels)`` of cluster ``c``.
  """
  if shift not in SHIFTS:
    raise ValueError(f'unknown shift {shift!r}; valid shifts are {list(SHIFTS)}.')
  if not 0 <= cluster < num_clusters:
    raise ValueError(f'cluster must be in [0, {num_clusters}), got {cluster}.')
  if shift == 'rotate':
    return rotate(images, (360 // num_clusters) * cluster), np.asarray(labels)
  if shift == 'label_shift':
    return np.asarray(images), label_shift(labels, cluster, num_classes)
  return np.asarray(images), np.asarray(labels)


# ----------------------------------------------------------------------------------------------------------------------
# Federated datasets
# ----------------------------------------------------------------------------------------------------------------------


def _reduce_all(train: Sequence[np.ndarray], reduce: float | None, minimum: int,
                rng: np.random.Generator) -> list[np.ndarray]:
  if reduce is None:
    return list(train)
  return [reduce_fraction(t, keep=reduce, minimum=minimum, rng=rng) for t in train]


def concept_shift_partition(num_examples: int, *, num_clients: int, num_clusters: int,
                            num_test_examples: int | None = None, test_fraction: float = 0.2,
                            reduce: float | None = None, reduce_minimum: int = 10,
                            cluster_sizes: Sequence[int] | None = None, seed: int = 0) -> ClientSplits:
  """Indices of the FLoRAL MNIST / CIFAR-10 tasks: IID shares, cluster ``k mod C`` (or ``cluster_sizes``).

  Args:
    num_examples: size of the training arrays.
    num_clients: ``K``.
    num_clusters: ``C``.
    num_test_examples: size of separate test arrays, which are then split IID over the clients as well (what the
      FLoRAL code does with the official test split). ``None``: cut each client's test set from its own share.
    test_fraction: share of each client's examples held out for testing when ``num_test_examples`` is None.
    reduce: keep this fraction of each client's training indices (FLoRAL "reduced": 0.05); None keeps all.
    reduce_minimum: but never fewer than this many (FLoRAL: 10).
    cluster_sizes: clients per cluster (:func:`cluster_assignment`); None: equal clusters ``k mod C``.
    seed: seeds the shuffles.

  Returns:
    :class:`ClientSplits`. Without ``reduce``, the clients' train (and, with ``test_fraction``, test) indices
    together cover ``range(num_examples)`` exactly once.
  """
  rng = np.random.default_rng(seed)
  clusters = cluster_assignment(num_clients, num_clusters, cluster_sizes)
  shares = iid_partition(num_examples, num_clients, rng)
  if num_test_examples is None:
    train, test = map(list, zip(*(split_train_test(s, test_fraction, rng) for s in shares)))
  else:
    train, test = shares, iid_partition(num_test_examples, num_clients, rng)
  return ClientSplits(_reduce_all(train, reduce, reduce_minimum, rng), test, clusters)


def _build_dataset(splits: ClientSplits, images, labels, test_images, test_labels, *, shift: str,
                   num_clusters: int, num_classes: int) -> FederatedDataset:
  xs_train, ys_train, xs_test, ys_test = [], [], [], []
  for k, c in enumerate(splits.clusters):
    x, y = cluster_shift(images[splits.train[k]], labels[splits.train[k]], int(c), shift=shift,
                         num_clusters=num_clusters, num_classes=num_classes)
    xs_train.append(x)
    ys_train.append(y)
    x, y = cluster_shift(test_images[splits.test[k]], test_labels[splits.test[k]], int(c), shift=shift,
                         num_clusters=num_clusters, num_classes=num_classes)
    xs_test.append(x)
    ys_test.append(y)
  return FederatedDataset(train=stack_clients(xs_train, ys_train), test=stack_clients(xs_test, ys_test),
                          clusters=splits.clusters, num_clusters=int(num_clusters))


def _check_arrays(images, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f'{what} images of shape {images.shape} and labels of shape {labels.shape} do not match; '
                     f'expected [N, ...] images and [N] labels.')
  return images, labels.astype(np.int32)


def _test_arrays(images, labels, test_images, test_labels):
  if (test_images is None) != (test_labels is None):
    raise ValueError('pass both test_images and test_labels, or neither (to cut test sets with test_fraction).')
  if test_images is None:
    return images, labels, None
  test_images, test_labels = _check_arrays(test_images, test_labels, 'test')
  return test_images, test_labels, len(test_labels)


def concept_shift_dataset(images: np.ndarray, labels: np.ndarray, *, num_clients: int, num_clusters: int,
                          shift: str, test_images: np.ndarray | None = None, test_labels: np.ndarray | None = None,
                          test_fraction: float = 0.2, reduce: float | None = None, reduce_minimum: int = 10,
                          num_classes: int = 10, cluster_sizes: Sequence[int] | None = None,
                          seed: int = 0) -> FederatedDataset:
  """The FLoRAL MNIST / CIFAR-10 concept-shift tasks as a padded federated dataset.

  Client ``k`` gets an IID share of the examples, transformed by its cluster ``c = k mod C``: rotated by
  ``(360 // C) · c`` degrees (``shift='rotate'``) or with labels ``(y + c) mod num_classes``
  (``shift='label_shift'``). Its test examples get the same transform.

  Args:
    images: ``[N, H, W, C]`` training images (any dtype; uint8 stays uint8, so scale afterwards).
    labels: ``[N]`` integer labels.
    num_clients: ``K`` (FLoRAL: 300 for MNIST, 20 for CIFAR-10).
    num_clusters: ``C`` (FLoRAL: 4).
    shift: ``'rotate'``, ``'label_shift'`` or ``'none'``.
    test_images: optional ``[M, H, W, C]`` test images, split IID over the clients (FLoRAL uses the official test
      split this way).
    test_labels: ``[M]`` labels of ``test_images``.
    test_fraction: without test arrays, each client's share of ``images`` is split into train/test with this
      fraction held out.
    reduce: keep this fraction of each client's training examples (FLoRAL "reduced": 0.05); None keeps all.
    reduce_minimum: lower bound per client when reducing (FLoRAL: 10).
    num_classes: label range for ``'label_shift'`` (10 for MNIST and CIFAR-10).
    cluster_sizes: clients per cluster, ``C`` counts summing to ``K`` (a minority cluster); None: ``k mod C``.
    seed: seeds every shuffle.

  Returns:
    :class:`FederatedDataset` with ``train.x: [K, N_max, H, W, C]``, ``train.y: [K, N_max]`` int32, counts, the
    same for ``test``, and ``clusters = arange(K) % C``.

  Example:
    >>> images, labels = load_mnist_offline()
    >>> data = concept_shift_dataset(images, labels, num_clients=300, num_clusters=4, shift='rotate')
    >>> data.train.x.shape[0], data.clusters[:5]
    (300, array([0, 1, 2, 3, 0], dtype=int32))
  """
  if shift not in SHIFTS:
    raise ValueError(f'unknown shift {shift!r}; valid shifts are {list(SHIFTS)}.')
  images, labels = _check_arrays(images, labels, 'training')
  test_images, test_labels, num_test = _test_arrays(images, labels, test_images, test_labels)
  if shift == 'label_shift':
    for what, y in (('training', labels), ('test', test_labels)):
      if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f'{what} labels lie in [{y.min()}, {y.max()}], outside [0, num_classes={num_classes}).')
  splits = concept_shift_partition(len(labels), num_clients=num_clients, num_clusters=num_clusters,
                                   num_test_examples=num_test, test_fraction=test_fraction, reduce=reduce,
                                   reduce_minimum=reduce_minimum, cluster_sizes=cluster_sizes, seed=seed)
  return _build_dataset(splits, images, labels, test_images, test_labels, shift=shift, num_clusters=num_clusters,
                        num_classes=num_classes)


def cifar100_cluster_dataset(images: np.ndarray, labels: np.ndarray, *, num_clients: int = 100,
                             num_clusters: int = 10, test_images: np.ndarray | None = None,
                             test_labels: np.ndarray | None = None, test_fraction: float = 0.2,
                             reduce: float | None = None, reduce_minimum: int = 10, shuffle: bool = True,
                             seed: int = 0) -> FederatedDataset:
  """The FLoRAL CIFAR-100 task: fine label ``l`` in cluster ``l mod C``, contiguous shards, labels unchanged.

  Args:
    images: ``[N, 32, 32, 3]`` training images.
    labels: ``[N]`` fine labels 0..99 (kept as the targets of a 100-way head).
    num_clients: ``K``, a multiple of ``num_clusters`` (FLoRAL: 100).
    num_clusters: ``C`` (FLoRAL: 10).
    test_images: optional test images, sharded over the clients by the same rule (FLoRAL: the official test split,
      ~100 per client).
    test_labels: their fine labels.
    test_fraction: without test arrays, each client's shard is split into train/test with this fraction held out.
    reduce: keep this fraction of each client's training examples (FLoRAL "reduced": 0.05); None keeps all.
    reduce_minimum: lower bound per client when reducing (FLoRAL: 10).
    shuffle: shuffle each cluster's examples (seeded) before cutting contiguous shards; False keeps dataset order.
    seed: seeds every shuffle.

  Returns:
    :class:`FederatedDataset` with ``clusters = arange(K) % C``.
  """
  images, labels = _check_arrays(images, labels, 'training')
  test_images, test_labels, num_test = _test_arrays(images, labels, test_images, test_labels)
  rng = np.random.default_rng(seed)
  shard_rng = rng if shuffle else None
  shards = cifar100_cluster_partition(labels, num_clients=num_clients, num_clusters=num_clusters, rng=shard_rng)
  if num_test is None:
    train, test = map(list, zip(*(split_train_test(s, test_fraction, rng) for s in shards)))
  else:
    train = shards
    test = cifar100_cluster_partition(test_labels, num_clients=num_clients, num_clusters=num_clusters, rng=shard_rng)
  splits = ClientSplits(_reduce_all(train, reduce, reduce_minimum, rng), test,
                        cluster_assignment(num_clients, num_clusters))
  return _build_dataset(splits, images, labels, test_images, test_labels, shift='none', num_clusters=num_clusters,
                        num_classes=100)
