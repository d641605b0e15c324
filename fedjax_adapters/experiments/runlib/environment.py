"""What a run ran on: Python, package versions, JAX devices, the repository's commit (for ``config.json``)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys

PACKAGES = ('fedjax_adapters', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-datasets',
            'transformers')


def _version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def _commit() -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                         check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'], capture_output=True,
                           text=True, timeout=5, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return out + ('+uncommitted changes' if dirty else '')


def environment() -> dict:
  """``{'python', 'platform', 'cpu_count', 'packages': {name: version}, 'backend', 'devices', 'commit'}``."""
  import jax  # pylint: disable=g-import-not-at-top  (only once a run starts)
  return {'python': sys.version.split()[0], 'platform': platform.platform(), 'cpu_count': os.cpu_count(),
          'packages': {p: _version(p) for p in PACKAGES}, 'backend': jax.default_backend(),
          'devices': [str(d) for d in jax.devices()], 'commit': _commit()}
