"""The throughput column's pieces: client steps per local phase, pooled rates, and the FedDPA table's column (shown
only when a run recorded its client steps, so older documents render as before)."""
import numpy as np

from fedjax_adapters.experiments import feddpa_report
from fedjax_adapters.experiments.feddpa_run import client_steps
from fedjax_adapters.experiments.runlib import throughput


def test_local_steps_count_batches_holding_a_real_example():
  np.testing.assert_array_equal(throughput.local_steps([0, 1, 4, 5], batch_size=2, num_epochs=3), [0, 3, 6, 9])
  assert throughput.method_steps([{'client_steps': 4}, {'client_steps': 6}]) == 10
  assert throughput.method_steps([{'client_steps': 4}, {}]) is None
  assert throughput.rate(300, 2.0) == 150.0 and throughput.rate(None, 2.0) is None and throughput.rate(3, 0) is None
  assert throughput.format_rate(3846.2) == '3,846' and throughput.format_rate(None) == ''


def test_feddpa_phases_per_method():
  assert client_steps('fedit', 5, 16) == 80 and client_steps('ditto', 5, 16) == 80
  assert client_steps('feddpa_t', 5, 16) == 16 * 9  # the local phase from each client's second round
  assert client_steps('feddpa_f', 5, 16) == 16 * 6  # plus the personalization phase
  assert client_steps('feddpa_f', 5, 16, personalized=False) == 80


def _doc(**extra):
  block = {'a': 0.5, 'avg': 0.5}
  return {'config': 'smoke', 'seeds': [0], 'client_categories': ['a'], 'test_categories': ['a'],
          'methods': {'fedit': {'personalization': block, 'test_time': block, 'seconds': 4.0, **extra}}}


def test_feddpa_table_gets_the_column_only_with_recorded_steps():
  plain = feddpa_report.table([_doc()])
  assert 'client-steps/s' not in plain
  timed = feddpa_report.table([_doc(client_steps=64)]).splitlines()
  assert timed[4] == '| method | a | P avg | client-steps/s |' and timed[5] == '|---|---|---|---|'
  assert timed[6] == '| fedit | 50.0 | 50.0 | 16 |'
  assert timed[10] == '| method | a | TTP avg |'  # the TTP table is unchanged
