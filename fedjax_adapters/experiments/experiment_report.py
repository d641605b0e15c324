"""The report of runs made with :func:`fedjax_adapters.experiment.run`: the FLoRAL report's table and plots, with
the methods under their own names and no paper column (``python -m fedjax_adapters.experiments.report DIR``)."""
from __future__ import annotations

from typing import Any, Sequence

from fedjax_adapters.experiments import report


def table(docs: Sequence[dict[str, Any]]) -> str:
  """One markdown table over the runs: a column per run name (task), a row per method, mean ± std over seeds."""
  return report.table(docs, known=False)


def plots(sources: Sequence[Any], out_dir: str) -> list[str]:
  """Test-metric curves, training loss and per-client values of every run (``report.plots``)."""
  return report.plots(sources, out_dir)


def notes(docs: Sequence[dict[str, Any]]) -> list[str]:
  """Notes on degenerate numbers (``report.notes``)."""
  return report.notes(docs)
