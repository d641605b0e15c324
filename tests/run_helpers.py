"""Helpers shared by test files: the runners' resume tests (waiting for a round, wall-clock-free comparison) and
the compile-count tests (a client update that counts its traces)."""
import json
import time


def wait_for_round(proc, out, method: str, round_: int, timeout: float = 900) -> None:
  """Polls ``out/metrics.jsonl`` until ``method`` has logged round ``round_``; fails if ``proc`` exits first."""
  path, t0 = out / 'metrics.jsonl', time.time()
  while time.time() - t0 < timeout:
    assert proc.poll() is None, proc.communicate()
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          r = json.loads(line)
        except ValueError:  # a line being written
          continue
        if r['method'] == method and r['round'] >= round_:
          return
    time.sleep(0.02)
  raise AssertionError(f'{method} did not reach round {round_} in {timeout} s')


def kill_after_round(proc, out, method: str, round_: int) -> dict:
  """SIGKILLs ``proc`` once ``method`` has logged round ``round_``; returns the run's ``results.json`` as it was left."""
  wait_for_round(proc, out, method, round_)
  proc.kill()
  proc.wait()
  return json.loads((out / 'results.json').read_text())


def strip_wall_clock(doc, drop=('seconds', 'wall_s')):
  """``doc`` without the keys in ``drop`` at any depth (wall-clock fields, the only ones an interruption changes)."""
  if isinstance(doc, dict):
    return {k: strip_wall_clock(v, drop) for k, v in doc.items() if k not in drop}
  if isinstance(doc, list):
    return [strip_wall_clock(v, drop) for v in doc]
  return doc


def count_traces(alg):
  """``alg`` with a client_update that records each trace in the returned list: ``(alg, traces)``."""
  traces = []

  def counted(*args):
    traces.append(1)
    return alg.client_update(*args)

  return alg.replace(client_update=counted), traces
