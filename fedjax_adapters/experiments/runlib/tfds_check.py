"""Is a tensorflow-datasets dataset prepared locally? A filesystem check a runner makes before any training.

tfds reports a dataset that was never built in several ways (one is a bare ``KeyError`` about empty splits, raised
deep inside data loading), so the runners ask :func:`missing` first and stop with its message.
"""
from __future__ import annotations

import glob
import os


def tfds_root(data_dir: str | None) -> str:
  """Where tfds looks: ``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  if data_dir is not None:
    return os.path.abspath(os.path.expanduser(data_dir))
  return os.environ.get('TFDS_DATA_DIR') or os.path.join(os.path.expanduser('~'), 'tensorflow_datasets')


def missing(name: str, data_dir: str | None, *, hint: str = '') -> str | None:
  """Why dataset ``name`` cannot be read (a message saying how to prepare it), or None when it is prepared.

  A prepared dataset has ``<root>/<name>/<version>/dataset_info.json`` with ``array_record`` files beside it.
  """
  root = tfds_root(data_dir)
  versions = [os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(root), name, '*', 'dataset_info.json'))]
  if any(glob.glob(os.path.join(glob.escape(v), '*.array_record*')) for v in versions):
    return None
  return (f'tfds dataset {name!r} is not prepared in the array_record format under {root}. Prepare it once on a '
          f'machine with internet access: `pip install tensorflow-datasets tensorflow && tfds build {name} '
          f'--file_format=array_record --data_dir DIR`, copy DIR/{name} here, then rerun with `--data-dir DIR`.'
          f'{hint}')
