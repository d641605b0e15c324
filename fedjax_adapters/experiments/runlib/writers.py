"""Metric writers: where a run's per-round numbers go besides ``metrics.jsonl`` (which is always written).

Built in, each off by default and used only when its package is installed (``pip install
'fedjax_adapters[tracking]'``):

* ``tensorboard``: event files under ``DIR/tensorboard/<method>/seed<k>/`` through ``tensorboardX`` (no TensorFlow
  needed); ``tensorboard --logdir DIR/tensorboard`` shows them.
* ``wandb``: Weights & Biases in offline mode, one W&B run per (method, seed) under ``DIR/wandb/``, grouped by the
  run's name; ``wandb sync DIR/wandb/offline-run-*`` uploads them later.
* ``mlflow``: MLflow's local file store ``DIR/mlruns`` (experiment = the run's name, one MLflow run per (method,
  seed)); ``mlflow ui --backend-store-uri DIR/mlruns`` shows them. MLflow 3 keeps that store in maintenance mode
  and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; the writer sets that variable when it is unset.

Anything with ``write(method, seed, round, record)`` and ``close()`` is a writer too (pass it to
``fedjax_adapters.experiment.run(writers=[...])``). ``record`` is the ``metrics.jsonl`` line; :func:`scalars` flattens
it to ``{'train/loss': ..., 'test/<metric>': ...}``. A resumed run writes the rounds after its checkpoint again: the
jsonl file is cut back first, the trackers show those rounds twice (TensorBoard and MLflow keep both points).
"""
from __future__ import annotations

import abc
import importlib.util
import math
import os
from typing import Any, Protocol, Sequence

from fedjax_adapters.experiments.runlib.cli import UserError

# name -> (module that must be importable, the pip package that provides it)
BUILTIN = {'tensorboard': ('tensorboardX', 'tensorboardX'), 'wandb': ('wandb', 'wandb'),
           'mlflow': ('mlflow', 'mlflow-skinny')}


class Writer(Protocol):
  def write(self, method: str, seed: int, round_: int, record: dict[str, Any]) -> None: ...
  def close(self) -> None: ...


def check_names(names: Sequence[str]) -> list[str]:
  """``names`` if each is a built-in writer whose package is installed (checked without importing it).

  Raises:
    UserError: an unknown name (lists the known ones) or a missing package (says what to install).
  """
  out = []
  for name in names:
    if name not in BUILTIN:
      raise UserError(f'unknown writer {name!r}; known writers: {", ".join(BUILTIN)} (metrics.jsonl is always '
                      'written)')
    module, package = BUILTIN[name]
    if importlib.util.find_spec(module) is None:
      raise UserError(f'writer {name!r} needs the package {package}: pip install {package} (or pip install '
                      '"fedjax_adapters[tracking]")')
    if name not in out:
      out.append(name)
  return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """The numbers of a ``metrics.jsonl`` line a tracker plots: training loss, clients, rejected, test metrics."""
  out = {}
  for key, tag in (('train_loss', 'train/loss'), ('clients', 'train/clients'), ('rejected', 'train/rejected')):
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      out[tag] = float(value)
  for key, value in ((record.get('eval') or {}).get('test') or {}).items():
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
      out[f'test/{key}'] = float(value)
  return out


class _PerUnit(abc.ABC):
  """A writer that opens one tracker run per (method, seed) and closes it when the next unit starts; a tracker
  supplies ``open``, ``log`` and ``finish``."""

  def __init__(self):
    self._unit, self._handle = None, None

  def write(self, method: str, seed: int, round_: int, record: dict[str, Any]) -> None:
    if self._unit != (method, seed):
      self._finish()
      self._unit, self._handle = (method, seed), self.open(method, seed)
    values = scalars(record)
    if values:
      self.log(self._handle, values, round_)

  def close(self) -> None:
    self._finish()

  def _finish(self) -> None:
    if self._handle is not None:
      self.finish(self._handle)
    self._unit, self._handle = None, None

  @abc.abstractmethod
  def open(self, method: str, seed: int) -> Any:
    """Supplied by each tracker."""

  @abc.abstractmethod
  def log(self, handle: Any, values: dict[str, float], round_: int) -> None:
    """Supplied by each tracker."""

  @abc.abstractmethod
  def finish(self, handle: Any) -> None:
    """Supplied by each tracker."""


class TensorBoard(_PerUnit):
  """Event files ``DIR/tensorboard/<method>/seed<k>/events.out.tfevents.*`` (tensorboardX)."""

  def __init__(self, run_dir: str):
    super().__init__()
    self.root = os.path.join(run_dir, 'tensorboard')

  def open(self, method, seed):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (optional dependency)
    return SummaryWriter(logdir=os.path.join(self.root, method, f'seed{seed}'), flush_secs=5)

  def log(self, handle, values, round_):
    for tag, value in values.items():
      handle.add_scalar(tag, value, round_)

  def finish(self, handle):
    handle.close()


class WandB(_PerUnit):
  """Weights & Biases, offline: ``DIR/wandb/offline-run-*`` per (method, seed)."""

  def __init__(self, run_dir: str, name: str, config: dict[str, Any]):
    super().__init__()
    self.run_dir, self.name, self.config = run_dir, name, config

  def open(self, method, seed):
    import wandb  # pylint: disable=g-import-not-at-top  (optional dependency)
    return wandb.init(mode='offline', dir=self.run_dir, project='fedjax_adapters', group=self.name,
                      name=f'{self.name}/{method}/seed{seed}', config={**self.config, 'method': method, 'seed': seed},
                      reinit='create_new', settings=wandb.Settings(silent=True, console='off'))

  def log(self, handle, values, round_):
    handle.log(values, step=round_)

  def finish(self, handle):
    handle.finish()


class MLflow(_PerUnit):
  """MLflow's local file store ``DIR/mlruns``: experiment = the run's name, an MLflow run per (method, seed)."""

  def __init__(self, run_dir: str, name: str, config: dict[str, Any]):
    super().__init__()
    self.uri = 'file://' + os.path.join(run_dir, 'mlruns')
    self.name, self.config = name, config

  def open(self, method, seed):
    os.environ.setdefault('MLFLOW_ALLOW_FILE_STORE', 'true')  # a local store needs no server or database
    from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top  (optional dependency)
    client = MlflowClient(tracking_uri=self.uri)
    experiment = client.get_experiment_by_name(self.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.name)
    run = client.create_run(experiment_id, run_name=f'{method}-seed{seed}', tags={'method': method, 'seed': str(seed)})
    for key, value in self.config.items():
      client.log_param(run.info.run_id, key, str(value)[:500])
    return client, run.info.run_id

  def log(self, handle, values, round_):
    from mlflow.entities import Metric  # pylint: disable=g-import-not-at-top  (optional dependency)
    client, run_id = handle
    client.log_batch(run_id, metrics=[Metric(k, v, 0, round_) for k, v in values.items()])

  def finish(self, handle):
    client, run_id = handle
    client.set_terminated(run_id)


def make(names: Sequence[Any], run_dir: str, name: str, settings: dict[str, Any]) -> list[Writer]:
  """Writers from built-in ``names`` (see :data:`BUILTIN`) and writer objects, for the run in ``run_dir``."""
  flat = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool)) or v is None}
  out = []
  for w in names:
    if not isinstance(w, str):
      out.append(w)
      continue
    check_names([w])
    out.append({'tensorboard': lambda: TensorBoard(run_dir), 'wandb': lambda: WandB(run_dir, name, flat),
                'mlflow': lambda: MLflow(run_dir, name, flat)}[w]())
  return out
