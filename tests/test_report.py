"""`python -m fedjax_adapters.experiments.report`: plots and tables from a real (tiny) FLoRAL run and from the committed JSONs."""
import glob
import json
import os

import numpy as np
import pytest

from fedjax_adapters.experiments import floral, report
from fedjax_adapters.experiments.runlib import strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results')
ROUNDS, EVERY = 100, 25


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('report') / 'run'
  floral.main(['--task', 'synthetic_linear', '--methods', 'fedavg', 'floral', '--seeds', '0', '1', '--rounds',
               str(ROUNDS), '--eval-every', str(EVERY), '--out', str(out), '--quiet'])
  return out


def test_metrics_have_one_line_per_round_and_router_probabilities_at_each_evaluation(run_dir):
  lines = [strict_json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  keys = [(r['method'], r['seed'], r['round']) for r in lines]
  assert sorted(keys) == sorted((m, s, r) for m in ('fedavg', 'floral') for s in (0, 1) for r in range(1, ROUNDS + 1))
  for r in lines:
    assert r['clients'] == 10 and r['rejected'] == 0 and r['train_loss'] > 0 and r['wall_s'] > 0
    assert ('eval' in r) == (r['round'] % EVERY == 0)
    if 'eval' in r:
      assert set(r['eval']['per_client']) == {'count', 'loss'} and len(r['eval']['per_client']['loss']) == 10
      assert ('router_probs' in r['eval']) == (r['method'] == 'floral')
  probs = np.asarray([r['eval']['router_probs'] for r in lines if 'eval' in r and r['method'] == 'floral'])
  assert probs.shape == (2 * ROUNDS // EVERY, 10, 2)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_report_renders_nonempty_plots_and_the_heatmap_separates_the_clusters(run_dir, tmp_path):
  out = report.main([str(run_dir), '--out', str(tmp_path)])
  names = sorted(os.path.basename(f) for f in out['files'])
  assert names == ['clients_synthetic_linear.png', 'curves_synthetic_linear.png',
                   'router_synthetic_linear_floral_seed0.png', 'router_synthetic_linear_floral_seed1.png', 'table.md']
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for name in names[:-1]:
    image = matplotlib.image.imread(tmp_path / name)
    assert image.shape[0] > 100 and image.shape[1] > 100 and float(np.std(image[..., :3])) > 0.01, name
  source = report.load_source(str(run_dir))
  for seed in (0, 1):
    probs, clusters = report.router_heatmap_data(source, 'floral', seed)
    np.testing.assert_array_equal(clusters, [0] * 5 + [1] * 5)  # rows sorted by true cluster
    chosen = probs.argmax(-1)
    # Every client of a cluster prefers the same adaptor, and the two clusters prefer different ones.
    assert len(set(chosen[:5])) == 1 and len(set(chosen[5:])) == 1 and chosen[0] != chosen[5], probs
  table = (tmp_path / 'table.md').read_text()
  assert '| FedAvg |' in table and '| FLoRAL (learned router) |' in table
  # A run shorter than the task's schedule says so in its heading.
  assert "synthetic_linear: test mse (2 seeds; only 100 of the task's 2000 rounds)" in table


def test_curves_and_per_client_values_come_from_the_run(run_dir):
  source = report.load_source(str(run_dir))
  curves = report.eval_curves(source, 'test_mse')
  results = json.loads((run_dir / 'results.json').read_text())
  for method in ('fedavg', 'floral'):
    for seed in (0, 1):
      assert [r for r, _ in curves[method][seed]] == [25, 50, 75, 100]
      assert curves[method][seed][-1][1] == results['units'][method][str(seed)]['test_mse']
  finals = report.final_evaluations(source)
  final_mse = results['units']['floral']['0']['test_mse']
  assert np.mean(finals['floral'][0]['per_client']['loss']) == pytest.approx(final_mse, rel=1e-5)  # 2 tests each
  assert report.train_loss(source)['fedavg'][1].shape == (ROUNDS,)


def _readme_table(heading):
  """``{row label: [cells]}`` of the first table after ``heading`` in the README."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  lines = text[text.index(heading):].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('|'))
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = cells[1:]
  return rows


def _table_rows(text):
  return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip('|').split('|')]
                                            for line in text.splitlines()[2:])}


def test_the_readme_mnist_table_is_regenerated_from_the_committed_jsons():
  docs = [report.load_source(p).results for p in
          sorted(glob.glob(os.path.join(RESULTS, 'mnist_offline_label_shift_*.json')))
          + sorted(glob.glob(os.path.join(RESULTS, 'mnist_offline_rotate_*.json')))]
  ours = _table_rows(report.results_table(docs))
  assert ours == _readme_table('### FLoRAL on MNIST')


def test_the_readme_synthetic_table_is_regenerated_from_the_committed_jsons():
  docs = [report.load_source(os.path.join(RESULTS, f'{t}.json')).results for t in ('synthetic_linear', 'synthetic_mlp')]
  ours = _table_rows(report.results_table(docs))
  readme = _readme_table('### FLoRAL synthetic tasks')
  names = {'Ensemble': 'Ensemble (learned router)', 'Ensemble, oracle router': 'Ensemble (oracle router)'}
  assert {names.get(k, k): v for k, v in ours.items()} == readme


def test_seeds_from_several_runs_are_pooled_and_conflicts_refused():
  a = {'task': 'synthetic_linear', 'metric': 'test_mse', 'seeds': [0, 1],
       'methods': {'fedavg': {'per_seed': [1.0, 2.0]}}}
  b = {'task': 'synthetic_linear', 'metric': 'test_mse', 'seeds': [2], 'methods': {'fedavg': {'per_seed': [3.0]}}}
  assert report.merge_seeds([a, b]) == {('synthetic_linear', 'fedavg'): {0: 1.0, 1: 2.0, 2: 3.0}}
  assert '| FedAvg | 2.00 ± 0.82 |' in report.table([a, b])
  clash = {**b, 'seeds': [1]}
  with pytest.raises(ValueError, match='fedavg seed 1 appears twice'):
    report.merge_seeds([a, clash])
  with pytest.raises(ValueError, match=r'different settings \(rounds 10 vs 20\)'):
    report.merge_seeds([{**a, 'rounds': 10}, {**b, 'rounds': 20}])
  # A failed seed (null) is left out, not counted as a value.
  assert report.merge_seeds([{**a, 'methods': {'fedavg': {'per_seed': [1.0, None]}}}]) == {
      ('synthetic_linear', 'fedavg'): {0: 1.0}}


def test_cell_formats():
  assert report.format_mse(2.9512, 0.2127) == '2.95 ± 0.21'
  assert report.format_mse(0.0110, 0.0054) == '0.0110 ± 0.0054'
  assert report.format_mse(3.1e-05, 1.5e-05) == '3.1e-05 ± 1.5e-05'
  assert report.format_cell('test_accuracy', [0.5, 0.7]) == '60.0 ± 10.0'


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / 'missing')])
  assert e.value.code == 2 and capsys.readouterr().err.startswith('error: ')
  (tmp_path / 'nan.json').write_text('{"x": NaN}')
  with pytest.raises(SystemExit):
    report.main([str(tmp_path / 'nan.json')])
  assert 'not a strict JSON results document' in capsys.readouterr().err


def _split_by_seed(run_dir, root, seed, rename=None):
  """A run directory holding only ``seed`` of ``run_dir`` (as if that seed had run on its own), methods renamed."""
  out = root / f'seed{seed}'
  out.mkdir()
  rename = rename or {}
  results = json.loads((run_dir / 'results.json').read_text())
  results['seeds'] = [seed]
  results['methods'] = {rename.get(m, m): dict(r, per_seed=[r['per_seed'][seed]]) for m, r in results['methods'].items()}
  results['data'] = {str(seed): results['data'][str(seed)]}
  (out / 'results.json').write_text(json.dumps(results))
  lines = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  (out / 'metrics.jsonl').write_text(''.join(json.dumps(dict(r, method=rename.get(r['method'], r['method']))) + '\n'
                                             for r in lines if r['seed'] == seed))
  return out


def test_one_task_from_two_runs_is_one_figure_and_oracle_routers_get_no_heatmap(run_dir, tmp_path):
  a = _split_by_seed(run_dir, tmp_path, 0)
  b = _split_by_seed(run_dir, tmp_path, 1, rename={'floral': 'floral_oracle'})
  made = report.main([str(a), str(b), '--out', str(tmp_path / 'report')])
  names = sorted(os.path.basename(f) for f in made['files'])
  assert names == ['clients_synthetic_linear.png', 'curves_synthetic_linear.png',
                   'router_synthetic_linear_floral_seed0.png', 'table.md']  # no _0/_1 files, no oracle heatmap
  sources = [report.load_source(str(d)) for d in (a, b)]
  curves = report.pooled(report.eval_curves, sources, 'test_mse')
  assert sorted(curves['fedavg']) == [0, 1]  # both runs' seeds in the one figure's band
  assert report.oracle('floral_oracle') and not report.oracle('floral') and not report.oracle('my_method')


def test_degenerate_numbers_get_a_note_in_the_table_and_on_the_console():
  zero = {'task': 'synthetic_linear', 'metric': 'test_mse', 'seeds': [0, 1], 'rounds': 2000,
          'methods': {'fedavg': {'per_seed': [0.0, 0.0]}, 'floral': {'per_seed': [1.0, 2.0]}}}
  text = report.summary([zero])
  assert text.startswith(report.results_table([zero]))
  assert text.endswith('note: synthetic_linear: every test mse of fedavg is 0 (2 values): the run learned nothing '
                       'measurable (too small or too short); these numbers say nothing about the method')
  same = dict(zero, methods={'fedavg': {'per_seed': [0.5, 0.5]}, 'floral': {'per_seed': [0.5, 0.5]}})
  assert report.notes([same]) == [
      'note: synthetic_linear: every test mse of fedavg, floral is the same number (0.5); check that the seeds (or '
      'tasks) differ and that the model trained',
      'note: synthetic_linear: every method scored exactly the same test mse; the comparison says nothing']
  assert report.notes([dict(zero, methods={'floral': {'per_seed': [1.0, 2.0]}})]) == []
  rouge = {'runner': 'feddpa', 'config': 'smoke', 'metric': 'rouge1', 'seeds': [0], 'client_categories': ['a', 'b'],
           'methods': {m: {'personalization': {'a': 0.0, 'b': 0.0, 'avg': 0.0},
                           'test_time': {'a': 0.0, 'b': 0.0, 'avg': 0.0}} for m in ('fedit', 'feddpa_f')}}
  assert 'note: FedDPA smoke: every ROUGE-1 of fedit, feddpa_f is 0 (12 values)' in report.summary([rouge])


def test_client_steps_are_recorded_and_the_table_gets_a_throughput_column(run_dir):
  """Each unit's client steps are rounds x sampled clients x each client's local steps (from the data), and the
  table's throughput column is their sum over the seeds divided by the summed seconds."""
  from fedjax_adapters.experiments import floral_tasks  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.federated import clients_per_round  # pylint: disable=g-import-not-at-top
  results = json.loads((run_dir / 'results.json').read_text())
  task = floral.TASKS['synthetic_linear']
  for seed in (0, 1):
    data = floral_tasks.load_data(task, seed)
    counts = np.asarray(data.train.counts)
    per_client = task.num_epochs * np.ceil(counts / min(task.batch_size, data.train.x.shape[1]))
    expected = ROUNDS * clients_per_round(len(counts), task.fraction) * per_client.mean()
    for m in ('fedavg', 'floral'):
      assert results['units'][m][str(seed)]['client_steps'] == round(expected)
  text = report.table([results])
  rows = _table_rows(text)
  assert text.splitlines()[0].endswith('| synthetic_linear: client-steps/s |')
  for m, label in (('fedavg', 'FedAvg'), ('floral', 'FLoRAL (learned router)')):
    r = results['methods'][m]
    assert r['client_steps'] == sum(results['units'][m][s]['client_steps'] for s in ('0', '1'))
    assert rows[label][-1] == f'{r["client_steps"] / r["seconds"]:,.0f}'
