"""Forwards an old module path (``experiments.floral``) to its home in the package."""
import importlib
import runpy
import sys


def forward(name: str, target: str) -> None:
  """Runs ``target`` as ``__main__`` when ``name`` is run with ``python -m``; otherwise makes ``name`` an alias."""
  if name == '__main__':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
  else:
    sys.modules[name] = importlib.import_module(target)
