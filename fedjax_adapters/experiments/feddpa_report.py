"""FedDPA's part of ``python -m fedjax_adapters.experiments.report``: markdown tables and per-task P / TTP bar plots.

``table(docs)`` renders each FedDPA results document (a run's results.json, or an older ``--json`` file): per-task
and average ROUGE-1 x 100 for personalization (P) and test-time personalization (TTP), each average with its 95 %
paired bootstrap interval when the document has per-prompt scores, and the paper's claimed differences with their
intervals, and for a DP run (``--dp-*``) a line with each method's epsilon. ``plots(sources, out_dir)`` draws one PNG per run: grouped bars per task, P and TTP, with interval whiskers.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fedjax_adapters.experiments import report
from fedjax_adapters.experiments.runlib import throughput

BLOCKS = (('personalization', 'P'), ('test_time', 'TTP'))


def _categories(doc: dict[str, Any]) -> list[str]:
  if 'client_categories' in doc:
    return list(dict.fromkeys(doc['client_categories']))
  first = next(iter(doc['methods'].values()))
  return [c for c in first['personalization'] if c != 'avg']


def _seed_intervals(doc: dict[str, Any]) -> dict[str, Any] | None:
  seeds = doc.get('seeds') or [doc.get('seed', 0)]
  return doc.get('intervals', {}).get(str(seeds[0])) if len(seeds) == 1 else None


def _cell(value: float, interval: dict | None = None, sign: str = '') -> str:
  text = f'{100 * value:{sign}.1f}'
  if interval:
    text += f' [{100 * interval["low"]:{sign}.1f}, {100 * interval["high"]:{sign}.1f}]'
  return text


def _title(doc: dict[str, Any]) -> str:
  seeds = doc.get('seeds') or [doc.get('seed', 0)]
  tests = len(doc.get('test_categories', [])) or None
  what = f'{tests} test prompts, ' if tests else ''
  seed_text = f'seed {seeds[0]}' if len(seeds) == 1 else f'mean over seeds {seeds}'
  return f'FedDPA, config {doc.get("config")} ({what}{seed_text}; ROUGE-1 x 100)'


def dp_line(doc: dict[str, Any]) -> str | None:
  """The user-level DP settings and each method's epsilon after the run's rounds (None for a run without DP)."""
  dp = doc.get('dp')
  if not dp:
    return None

  def eps(m):
    value = doc['methods'][m].get('dp_epsilon', dp.get('epsilon'))
    return 'inf (no noise)' if value is None else f'{value:.3g}'

  methods = ', '.join(f'{m} {eps(m)}' for m in doc['methods'])
  return (f'User-level DP (docs/privacy.md): clip {dp["clip"]}, noise multiplier {dp["noise_multiplier"]:.4g}, '
          f'{dp["sampling"]} sampling, delta {dp["delta"]:.3g}; epsilon after {dp["rounds"]} rounds: {methods}. Only '
          'the global LoRA is private; local adapters and these per-client scores are outside the guarantee.')


def rates(doc: dict[str, Any]) -> dict[str, str] | None:
  """Each method's client-steps per second (``runlib.throughput``: training steps over the unit's wall seconds,
  evaluation included), or None when no method recorded its client steps (runs before the column existed)."""
  if not any('client_steps' in r for r in doc['methods'].values()):
    return None
  return {m: throughput.format_rate(throughput.rate(r.get('client_steps'), r.get('seconds')))
          for m, r in doc['methods'].items()}


def table(docs: Sequence[dict[str, Any]]) -> str:
  """Markdown: for each document, a P and a TTP table (per task, average [95 % interval]) and the differences; the
  P table ends with the client-steps per second when the run recorded them."""
  out = []
  for doc in docs:
    cats = _categories(doc)
    intervals = _seed_intervals(doc)
    speed = rates(doc)
    lines = [f'### {_title(doc)}']
    if dp_line(doc):
      lines += ['', dp_line(doc)]
    for block, short in BLOCKS:
      extra = speed is not None and block == 'personalization'
      lines += ['', f'{short} ({block})', '', '| method | ' + ' | '.join(cats) + f' | {short} avg |'
                + (' client-steps/s |' if extra else ''), '|---' * (len(cats) + 2 + extra) + '|']
      for m, r in doc['methods'].items():
        if block not in r:
          continue
        iv = intervals['methods'].get(m, {}).get(block, {}).get('avg') if intervals else None
        cells = [_cell(r[block][c]) for c in cats] + [_cell(r[block]['avg'], iv)] + ([speed[m]] if extra else [])
        lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
    if intervals and intervals['differences']:
      level = 100 * intervals['level']
      lines += ['', f'Paired differences of the averages ({level:.0f} % bootstrap interval, '
                    f'{intervals["num_samples"]} resamples of the test prompts)', '',
                '| method - baseline | block | difference |', '|---|---|---|']
      for d in intervals['differences']:
        lines.append(f'| {d["method"]} - {d["baseline"]} | {dict(BLOCKS)[d["block"]]} | '
                     f'{_cell(d["estimate"], d, "+")} |')
    out.append('\n'.join(lines))
  return '\n\n'.join(out)


def bar_data(doc: dict[str, Any], block: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray | None]:
  """``(methods, columns, values [M, C + 1], errors [2, M, C + 1] or None)`` of one block, x 100, columns = tasks +
  'avg'; errors are the distances to the interval's bounds (one seed with intervals only)."""
  cats = _categories(doc) + ['avg']
  methods = [m for m, r in doc['methods'].items() if block in r]
  values = np.array([[100 * doc['methods'][m][block][c] for c in cats] for m in methods])
  intervals = _seed_intervals(doc)
  if not intervals:
    return methods, cats, values, None
  lo = np.array([[100 * intervals['methods'][m][block][c]['low'] for c in cats] for m in methods])
  hi = np.array([[100 * intervals['methods'][m][block][c]['high'] for c in cats] for m in methods])
  return methods, cats, values, np.stack([np.maximum(values - lo, 0), np.maximum(hi - values, 0)])


def plot_bars(doc: dict[str, Any], path: str) -> str:
  """Grouped bars per task (and the average) for P and TTP, one bar per method, 95 % interval whiskers."""
  fig, axes = report.pyplot().subplots(2, 1, figsize=(12, 7), sharex=True)
  for ax, (block, short) in zip(axes, BLOCKS):
    methods, cats, values, errors = bar_data(doc, block)
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(cats))
    for i, m in enumerate(methods):
      ax.bar(x + (i - (len(methods) - 1) / 2) * width, values[i], width, label=m,
             yerr=None if errors is None else errors[:, i], capsize=2)
    ax.set_ylabel(f'{short} ROUGE-1')
    ax.set_xticks(x, [c.replace('_', '\n') for c in cats], fontsize=8)
  axes[0].legend(ncol=len(doc['methods']), fontsize=8)
  axes[0].set_title(_title(doc))
  return report.save_figure(fig, path, dpi=100)


def notes(docs: Sequence[dict[str, Any]]) -> list[str]:
  """Notes on scores that say nothing (``report.degenerate``), e.g. the smoke preset's all-zero ROUGE-1: a tiny
  random model's answers share no word with the references."""
  out = []
  for doc in docs:
    values = {m: [v for block, _ in BLOCKS for v in r.get(block, {}).values()] for m, r in doc['methods'].items()}
    out += report.degenerate(f'FedDPA {doc.get("config")}', 'ROUGE-1', values)
  return out


def plots(sources: Sequence[Any], out_dir: str) -> list[str]:
  """One P / TTP bar plot per source (``fedjax_adapters.experiments.report.Source``) into ``out_dir``; returns the files."""
  written = []
  for tag, source in report.tagged(sources, 'config', 'feddpa'):
    written.append(plot_bars(source.results, os.path.join(out_dir, f'feddpa_{tag}.png')))
  return written
