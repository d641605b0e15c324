"""Plots and tables from run directories: ``python -m fedjax_adapters.experiments.report DIR [DIR|JSON ...] [--out REPORT]``.

Each argument is a run directory (``config.json``, ``metrics.jsonl``, ``results.json``) or a results JSON file, such
as the ones earlier runners wrote with ``--json`` (``experiments/results/*.json``). Writes into ``--out`` (default:
``DIR/report`` for one run directory, else ``report/``):

* ``table.md``: one markdown table per runner, merged over every input: FLoRAL tasks side by side, each with the
  paper's Table 1 column beside it (seeds of one task and method from several runs are pooled; the same seed twice
  with different values is an error);
* ``curves_<task>.png``: test metric per method against the round (mean over every seed of every input of that
  task, as the table pools them; band = lowest..highest seed), and the training loss per round (run directories);
* ``clients_<task>.png``: each method's per-client test metric after the last round (all seeds pooled);
* ``router_<task>_<method>_seed<k>.png``: router probabilities, clients x adaptors, clients sorted by true cluster,
  for learned routers (an oracle router is the true clustering by construction, so it gets no heatmap).

A column whose runs are shorter than the task's schedule (the paper's, for a Table 1 column) says so in its
heading; numbers that cannot be compared (a method scoring 0 everywhere, every method scoring the same) get a
``note:`` below the table, on the console too.

Runs of another runner are handed to its report module (:data:`REPORTERS`): a module with ``table(docs) -> str``
and ``plots(sources, out_dir) -> list[str]``. ``experiments/feddpa_report.py`` is the FedDPA one (per-task P / TTP
bars).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any, Sequence

import numpy as np

from fedjax_adapters.experiments.configs import floral as configs
from fedjax_adapters.experiments.runlib import cli, strict_json, throughput
from fedjax_adapters.experiments.runlib.cli import UserError

# runner name -> module with table(docs) and plots(sources, out_dir); 'floral' is this module.
REPORTERS = {'floral': 'fedjax_adapters.experiments.report', 'feddpa': 'fedjax_adapters.experiments.feddpa_report',
             'experiment': 'fedjax_adapters.experiments.experiment_report'}


@dataclasses.dataclass
class Source:
  """One input: its results document and, for a run directory, the path of its metrics.jsonl."""
  path: str
  results: dict[str, Any]
  metrics_path: str | None = None

  def records(self) -> list[dict[str, Any]]:
    if self.metrics_path is None:
      return []
    from fedjax_adapters.experiments.runlib.rundir import RunDir  # pylint: disable=g-import-not-at-top
    return list(RunDir(os.path.dirname(self.metrics_path)).records())


def load_source(path: str) -> Source:
  """A run directory or a results JSON file."""
  if os.path.isdir(path):
    results = os.path.join(path, 'results.json')
    if not os.path.isfile(results):
      raise UserError(f'{path} has no results.json (not a run directory, or the run wrote nothing yet)')
    return Source(path, strict_json.read(results), os.path.join(path, 'metrics.jsonl'))
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such run directory or file')
  try:
    with open(path) as f:
      doc = strict_json.loads(f.read())
  except ValueError as e:
    raise UserError(f'{path}: not a strict JSON results document ({e})') from None
  return Source(path, doc)


def runner_of(doc: dict[str, Any]) -> str:
  """Which runner wrote ``doc`` (older documents say so only through their keys)."""
  if 'runner' in doc:
    return doc['runner']
  return 'feddpa' if doc.get('metric') == 'rouge1' else 'floral'


def seeds_of(doc: dict[str, Any]) -> list[int]:
  """The seeds of ``doc``: a list, or (older documents) a count meaning seeds 0 .. N-1."""
  seeds = doc['seeds']
  return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


# ---------------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------------


def merge_seeds(docs: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[int, float]]:
  """``{(task, method): {seed: value}}`` over FLoRAL documents (finished seeds only).

  Raises:
    ValueError: runs of one task with different settings, or one (task, method, seed) with two different values.
  """
  merged: dict[tuple[str, str], dict[int, float]] = {}
  settings: dict[str, dict] = {}
  for doc in docs:
    mine = {'rounds': doc.get('rounds'), **doc.get('config', {})}
    first = settings.setdefault(doc['task'], mine)
    differ = [f'{k} {first[k]} vs {mine[k]}' for k in sorted(set(first) & set(mine)) if first[k] != mine[k]]
    if differ:
      raise ValueError(f'{doc["task"]}: runs with different settings ({", ".join(differ)}) cannot share a table '
                       'column.')
    for method, r in doc['methods'].items():
      per_seed = merged.setdefault((doc['task'], method), {})
      for seed, value in zip(seeds_of(doc), r['per_seed']):
        if value is None:
          continue
        if seed in per_seed and per_seed[seed] != value:
          raise ValueError(f'{doc["task"]} {method} seed {seed} appears twice with different results '
                           f'({per_seed[seed]} and {value}); pass each run once.')
        per_seed[seed] = value
  return merged


def format_mse(mean: float, std: float) -> str:
  """``mean ± std``: 3 significant digits for the mean and 2 for the std, scientific below 1e-3."""
  def fmt(v, digits):
    return f'{v:.1e}' if abs(v) < 1e-3 and v != 0 else f'{v:#.{digits}g}'
  return f'{fmt(mean, 3)} ± {fmt(std, 2)}'


def format_cell(metric: str, values: Sequence[float]) -> str:
  """A table cell: accuracy in % (one decimal), MSE as :func:`format_mse`; mean ± std over seeds."""
  mean, std = float(np.mean(values)), float(np.std(values))
  if metric == 'test_accuracy':
    return f'{100 * mean:.1f} ± {100 * std:.1f}'
  return format_mse(mean, std)


def _tasks_in_order(docs) -> list[str]:
  return list(dict.fromkeys(doc['task'] for doc in docs))


def label(method: str, known: bool = True) -> str:
  """A method's row label: the FLoRAL table's name for a known method, else the method itself."""
  return configs.METHODS[method].label if known and method in configs.METHODS else method


def heading(task: str, metric: str, seeds: int, rounds: int | None, known: bool = True) -> str:
  """A task's column heading: its metric, seed count and, for a run shorter than the task's schedule (the paper's
  for a Table 1 column), how many of its rounds ran."""
  unit = ' %' if metric == 'test_accuracy' else ''
  text = f'{task}: {metric.replace("_", " ")}{unit} ({seeds} seeds'
  full = configs.TASKS[task].rounds if known and task in configs.TASKS else None
  if full and rounds is not None and rounds < full:
    whose = "the paper's" if configs.TASKS[task].column else "the task's"
    text += f'; only {rounds} of {whose} {full} rounds'
  return text + ')'


def merge_rates(docs: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float | None]:
  """``{(task, method): client-steps per second}`` pooled over the documents that recorded client steps (their
  steps summed over their summed ``seconds``, on the machine each ran on); tasks without any are left out."""
  pooled: dict[tuple[str, str], list[float]] = {}
  for doc in docs:
    for method, r in doc['methods'].items():
      if r.get('client_steps') is not None and r.get('seconds'):
        acc = pooled.setdefault((doc['task'], method), [0.0, 0.0])
        acc[0] += r['client_steps']
        acc[1] += r['seconds']
  return {key: throughput.rate(steps, secs) for key, (steps, secs) in pooled.items()}


def table(docs: Sequence[dict[str, Any]], *, known: bool = True) -> str:
  """The merged markdown table of FLoRAL documents: one column per task (and its paper column beside it).

  With ``known=False`` (runs of :mod:`fedjax_adapters.experiment`) methods keep their own names and no paper column
  is added.
  """
  merged = merge_seeds(docs)
  tasks = _tasks_in_order(docs)
  metric = {doc['task']: doc['metric'] for doc in docs}
  rounds = {doc['task']: doc.get('rounds') for doc in docs}
  failed = {(doc['task'], m) for doc in docs for m, r in doc['methods'].items() if r.get('status') == 'failed'}
  order = list(configs.METHODS) if known else list(dict.fromkeys(m for doc in docs for m in doc['methods']))
  methods = [m for m in order if any(merged.get((t, m)) or (t, m) in failed for t in tasks)]
  columns = {t: configs.TASKS[t].column if known and t in configs.TASKS else None for t in tasks}
  rates = merge_rates(docs)
  timed = {t for t, _ in rates}
  head, rule = ['method'], ['---']
  for t in tasks:
    seeds = sorted({s for m in methods for s in merged.get((t, m), {})})
    head.append(heading(t, metric[t], len(seeds), rounds[t], known))
    rule.append('---')
    if columns[t] is not None:
      head.append(f'paper, {columns[t]}')
      rule.append('---')
    if t in timed:
      head.append(f'{t}: client-steps/s')
      rule.append('---')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(rule) + '|']
  for m in methods:
    cells = [label(m, known)]
    for t in tasks:
      values = merged.get((t, m), {})
      cell = format_cell(metric[t], [values[s] for s in sorted(values)]) if values else ''
      if (t, m) in failed:
        cell = f'{cell} (a seed failed)' if cell else 'failed'
      cells.append(cell)
      if columns[t] is not None:
        p = configs.PAPER[columns[t]].get(configs.METHODS[m].paper_row)
        cells.append(f'{p[0]:.1f} ({p[1]:.1f})' if p else '')
      if t in timed:
        cells.append(throughput.format_rate(rates.get((t, m))))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def results_table(docs: Sequence[dict[str, Any]]) -> str:
  """Markdown tables of any mix of documents, one per runner (each by its :data:`REPORTERS` module)."""
  by_runner: dict[str, list] = {}
  for doc in docs:
    by_runner.setdefault(runner_of(doc), []).append(doc)
  return '\n\n'.join(_reporter(r).table(d) for r, d in by_runner.items())


def _reporter(runner: str):
  if runner not in REPORTERS:
    raise UserError(f'no report for {runner!r} runs; known runners: {", ".join(REPORTERS)}')
  if REPORTERS[runner] == __name__:
    return sys.modules[__name__]
  try:
    return importlib.import_module(REPORTERS[runner])
  except ModuleNotFoundError as e:
    raise UserError(f'the report module {REPORTERS[runner]} for {runner!r} runs is missing ({e})') from None


# ---------------------------------------------------------------------------------------------------------------------
# Plot data (plain arrays; tests check these)
# ---------------------------------------------------------------------------------------------------------------------


def eval_curves(source: Source, metric: str) -> dict[str, dict[int, list[tuple[int, float]]]]:
  """``{method: {seed: [(round, value), ...]}}``: the test metric at every evaluation."""
  curves: dict[str, dict[int, list]] = {}
  records = source.records()
  if records:
    for r in records:
      if 'eval' in r:
        curves.setdefault(r['method'], {}).setdefault(r['seed'], []).append((r['round'], r['eval']['test'][metric]))
    return curves
  for method, r in source.results['methods'].items():  # an older document: its `curves`, when evaluated
    for seed, curve in zip(seeds_of(source.results), r.get('curves', [])):
      if curve:
        curves.setdefault(method, {})[seed] = [(int(a), b) for a, b in curve]
  return curves


def train_loss(source: Source) -> dict[str, dict[int, np.ndarray]]:
  """``{method: {seed: [rounds] training loss}}`` (NaN where every client was rejected)."""
  out: dict[str, dict[int, list]] = {}
  for r in source.records():
    out.setdefault(r['method'], {}).setdefault(r['seed'], []).append(
        np.nan if r['train_loss'] is None else r['train_loss'])
  return {m: {s: np.asarray(v, np.float64) for s, v in seeds.items()} for m, seeds in out.items()}


def final_evaluations(source: Source) -> dict[str, dict[int, dict[str, Any]]]:
  """``{method: {seed: the last evaluation record}}``."""
  out: dict[str, dict[int, dict]] = {}
  for r in source.records():
    if 'eval' in r:
      out.setdefault(r['method'], {})[r['seed']] = r['eval']
  return out


def router_heatmap_data(source: Source, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(probs [K, C], clusters [K])`` of the last evaluation, clients sorted by true cluster (stable)."""
  evaluation = final_evaluations(source)[method][seed]
  probs = np.asarray(evaluation['router_probs'], np.float64)
  clusters = np.asarray(source.results['data'][str(seed)]['clusters'])
  order = np.argsort(clusters, kind='stable')
  return probs[order], clusters[order]


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend (imported only when plotting)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only when plotting)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str, dpi: int = 110) -> str:
  """Lays out, writes and closes ``fig``; returns ``path``."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return path


def tagged(sources: Sequence[Any], name: str, default: str = 'run') -> list[tuple[str, Any]]:
  """``(tag, source)`` pairs: each source's ``results[name]``, numbered when there are several."""
  tags = [str(s.results.get(name, default)) for s in sources]
  return [(t if len(sources) == 1 else f'{t}_{i}', s) for i, (t, s) in enumerate(zip(tags, sources))]


def _group(sources) -> list[Source]:
  return [sources] if isinstance(sources, Source) else list(sources)


def pooled(fn, sources, *args) -> dict[str, dict[int, Any]]:
  """``fn(source, *args)`` (``{method: {seed: value}}``) merged over ``sources``: the seeds of several runs of one
  task side by side, as the table pools them."""
  out: dict[str, dict[int, Any]] = {}
  for source in _group(sources):
    for method, per_seed in fn(source, *args).items():
      out.setdefault(method, {}).update(per_seed)
  return out


def _band(ax, curves: dict[int, list], label: str, scale: float) -> None:
  rounds = sorted({r for c in curves.values() for r, _ in c})
  table_ = np.full((len(curves), len(rounds)), np.nan)
  for i, c in enumerate(curves.values()):
    for r, v in c:
      table_[i, rounds.index(r)] = np.nan if v is None else scale * v
  line, = ax.plot(rounds, np.nanmean(table_, 0), label=f'{label} ({len(curves)} seeds)' if len(curves) > 1 else label)
  if len(curves) > 1:
    ax.fill_between(rounds, np.nanmin(table_, 0), np.nanmax(table_, 0), alpha=0.2, color=line.get_color())


def plot_curves(sources, path: str) -> str | None:
  """Test metric per evaluation and training loss per round, one line per method (the mean over every seed of
  ``sources``, runs of one task), a band from the lowest to the highest seed."""
  group = _group(sources)
  doc = group[0].results
  metric = doc['metric']
  curves, losses = pooled(eval_curves, group, metric), pooled(train_loss, group)
  if not curves:
    return None
  plt = pyplot()
  fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(12 if losses else 6, 4), squeeze=False)
  scale = 100.0 if metric == 'test_accuracy' else 1.0
  for method, per_seed in curves.items():
    _band(axes[0, 0], per_seed, label(method, runner_of(doc) == 'floral'), scale)
  axes[0, 0].set(xlabel='round', ylabel=metric.replace('_', ' ') + (' %' if scale == 100 else ''),
                 title=f'{doc["task"]}: test (mean over seeds; band: lowest to highest seed)',
                 yscale='linear' if scale == 100 else 'log')
  axes[0, 0].legend(fontsize=7)
  if losses:
    for method, per_seed in losses.items():
      window = max(1, len(next(iter(per_seed.values()))) // 50)
      smooth = {s: [(i + window, v) for i, v in enumerate(np.convolve(x, np.ones(window) / window, 'valid'))]
                for s, x in per_seed.items()}
      _band(axes[0, 1], smooth, method, 1.0)
    axes[0, 1].set(xlabel='round', ylabel='training loss (moving mean)', yscale='log', title='train')
  return save_figure(fig, path)


def plot_clients(sources, path: str) -> str | None:
  """Per-client test metric after the last round, one box per method (every seed of ``sources`` pooled)."""
  group = _group(sources)
  finals = pooled(final_evaluations, group)
  if not finals:
    return None
  doc = group[0].results
  key = 'accuracy' if doc['metric'] == 'test_accuracy' else 'loss'
  methods = list(finals)
  data = [np.concatenate([np.asarray(e['per_client'][key], np.float64) for e in finals[m].values()]) for m in methods]
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 4))
  ax.boxplot([100 * d if key == 'accuracy' else d for d in data], showmeans=True)
  ax.set_xticks(range(1, len(methods) + 1), [label(m, runner_of(doc) == 'floral') for m in methods], rotation=30,
                ha='right', fontsize=8)
  ax.set(ylabel='per-client test accuracy %' if key == 'accuracy' else 'per-client test MSE',
         yscale='linear' if key == 'accuracy' else 'log', title=f'{doc["task"]}: clients after training')
  return save_figure(fig, path)


def plot_router(source: Source, method: str, seed: int, path: str) -> str:
  """Heatmap of the router probabilities, clients (sorted by true cluster) x adaptors."""
  probs, clusters = router_heatmap_data(source, method, seed)
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(1.2 + 0.6 * probs.shape[1], min(10, 2 + 0.05 * probs.shape[0])))
  im = ax.imshow(probs, aspect='auto', interpolation='nearest', vmin=0, vmax=1, cmap='viridis')
  edges = np.flatnonzero(np.diff(clusters)) + 0.5
  for e in edges:
    ax.axhline(e, color='white', lw=0.8)
  ax.set(xlabel='adaptor', ylabel='client (sorted by true cluster)', title=f'{method} seed {seed}')
  fig.colorbar(im, ax=ax, label='p(adaptor | client)')
  return save_figure(fig, path)


def oracle(method: str) -> bool:
  """Whether ``method``'s router is fixed to the true clusters (its heatmap is the identity by construction)."""
  return method in configs.METHODS and configs.METHODS[method].oracle


def plots(sources: Sequence[Source], out_dir: str) -> list[str]:
  """Every FLoRAL plot of ``sources`` into ``out_dir``; returns the files written.

  Runs of one task are pooled into one ``curves_<task>.png`` and one ``clients_<task>.png`` (every seed, as in
  the table). Router heatmaps are drawn for learned routers only: an oracle router is the true clustering.
  """
  written = []
  groups: dict[str, list[Source]] = {}
  for source in sources:
    groups.setdefault(str(source.results.get('task', 'run')), []).append(source)
  for task, group in groups.items():
    written += [p for p in (plot_curves(group, os.path.join(out_dir, f'curves_{task}.png')),
                            plot_clients(group, os.path.join(out_dir, f'clients_{task}.png'))) if p]
    for source in group:
      for method, per_seed in final_evaluations(source).items():
        for seed, evaluation in per_seed.items():
          if 'router_probs' in evaluation and not oracle(method):
            name = f'router_{task}_{method}_seed{seed}.png'
            written.append(plot_router(source, method, seed, os.path.join(out_dir, name)))
  return written


# ---------------------------------------------------------------------------------------------------------------------
# Numbers that say nothing
# ---------------------------------------------------------------------------------------------------------------------


def degenerate(task: str, metric: str, values: dict[str, list[float]]) -> list[str]:
  """Notes on numbers that cannot be compared: a method whose every value is 0, a method whose seeds all scored
  exactly the same, or every method scoring exactly the same. ``values``: ``{method: [numbers]}``."""
  values = {m: [v for v in vs if v is not None] for m, vs in values.items()}
  values = {m: vs for m, vs in values.items() if vs}
  notes = []
  zero = [m for m, vs in values.items() if all(v == 0 for v in vs)]
  if zero:
    notes.append(f'note: {task}: every {metric} of {", ".join(zero)} is 0 ({sum(len(values[m]) for m in zero)} '
                 'values): the run learned nothing measurable (too small or too short); these numbers say nothing '
                 'about the method')
  same = [m for m, vs in values.items() if m not in zero and len(vs) > 1 and len(set(vs)) == 1]
  if same:
    notes.append(f'note: {task}: every {metric} of {", ".join(same)} is the same number ({values[same[0]][0]:.6g}); '
                 'check that the seeds (or tasks) differ and that the model trained')
  rows = {tuple(vs) for vs in values.values()}
  if len(values) > 1 and len(rows) == 1 and not zero:
    notes.append(f'note: {task}: every method scored exactly the same {metric}; the comparison says nothing')
  return notes


def notes(docs: Sequence[dict[str, Any]]) -> list[str]:
  """:func:`degenerate` notes of FLoRAL / run-API documents (per-seed headline metrics)."""
  out = []
  for doc in docs:
    metric = doc.get('metric') or 'metric'
    out += degenerate(str(doc.get('task')), metric.replace('_', ' '),
                      {m: list(r.get('per_seed') or []) for m, r in doc.get('methods', {}).items()})
  return out


def summary(docs: Sequence[dict[str, Any]]) -> str:
  """:func:`results_table` and, below it, every note on degenerate numbers (what the runners print at the end)."""
  by_runner: dict[str, list] = {}
  for doc in docs:
    by_runner.setdefault(runner_of(doc), []).append(doc)
  lines = [n for r, d in by_runner.items() for n in getattr(_reporter(r), 'notes', lambda _: [])(d)]
  return results_table(docs) + ''.join(f'\n\n{n}' for n in lines)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the table and plots of the inputs; returns ``{'table': markdown, 'files': [paths]}``."""
  return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
  p = cli.Parser(prog='python -m fedjax_adapters.experiments.report', description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('inputs', nargs='+', metavar='DIR_OR_JSON', help='run directories and/or results JSON files')
  p.add_argument('--out', default=None, help='where to write table.md and the PNGs (default: DIR/report for one run '
                 'directory, else report/)')
  p.add_argument('--no-plots', action='store_true', help='only the table')
  args = p.parse_args(argv)
  sources = [load_source(path) for path in args.inputs]
  default = os.path.join(args.inputs[0], 'report') if len(sources) == 1 and sources[0].metrics_path else 'report'
  out_dir = cli.probe_writable_dir(args.out or default, '--out')
  try:
    text = summary([s.results for s in sources])
  except ValueError as e:
    raise UserError(str(e)) from None
  with open(os.path.join(out_dir, 'table.md'), 'w') as f:
    f.write(text + '\n')
  written = [os.path.join(out_dir, 'table.md')]
  if not args.no_plots:
    by_runner: dict[str, list] = {}
    for s in sources:
      by_runner.setdefault(runner_of(s.results), []).append(s)
    for runner, group in by_runner.items():
      written += _reporter(runner).plots(group, out_dir)
  print(text)
  print('\nwrote ' + ', '.join(written))
  return {'table': text, 'files': written}


if __name__ == '__main__':
  main(sys.argv[1:])
