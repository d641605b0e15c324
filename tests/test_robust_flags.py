"""--aggregator / --attack / --attack-fraction on the FLoRAL runner: refused up front (one line, exit 2, nothing
written), stored in config.json and re-checked on resume, and a smoke run where the attack and the reducer act."""
import json

import pytest

from fedjax_adapters.experiments import floral
from fedjax_adapters.experiments.runlib import robust_flags
from fedjax_adapters.federated import attacks, robust

SMOKE = ['--task', 'mnist_offline_label_shift', '--smoke', '--quiet']


def test_tables_match_the_library():
  assert list(robust_flags.AGGREGATORS) == list(robust.REDUCERS)
  assert list(robust_flags.ATTACKS) == list(attacks.ATTACKS)


@pytest.mark.parametrize('argv,message', [
    (['--aggregator', 'krumm'], "unknown name 'krumm'"),
    (['--aggregator', 'krum:1.5'], 'num_byzantine must be an integer >= 0, got 1.5'),
    (['--aggregator', 'trimmed_mean:0.5'], 'fraction must be in [0, 0.5), got 0.5'),
    (['--aggregator', 'median:3'], 'median takes no parameter'),
    (['--aggregator', 'norm_bound:x'], "quantile must be a number, got 'x'"),
    (['--attack', 'sign_flip'], '--attack needs --attack-fraction'),
    (['--attack-fraction', '0.1'], '--attack-fraction needs --attack'),
    (['--attack', 'ipm', '--attack-fraction', '1.2'], 'must be in [0, 1], got 1.2'),
    (['--attack', 'gaussian:-1', '--attack-fraction', '0.1'], 'sigma must be > 0, got -1'),
    (['--aggregator', 'krum', '--methods', 'fedavg', 'ensemble'], 'ensemble keep their own aggregation'),
])
def test_bad_flags_one_line_exit_2(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    floral.main(SMOKE + ['--out', str(tmp_path / 'run')] + argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and message in err and '\n' not in err
  assert not (tmp_path / 'run').exists()


def test_smoke_run_with_attack_and_defense(tmp_path):
  out = tmp_path / 'run'
  common = SMOKE + ['--methods', 'fedavg', '--attack', 'sign_flip:10', '--attack-fraction', '0.5']
  attacked = floral.main(common + ['--out', str(out)])
  defended = floral.main(common + ['--aggregator', 'krum:1', '--methods', 'fedavg', 'floral_1', '--out',
                                   str(tmp_path / 'def')])
  assert defended['status'] == 'done'  # FLoRAL's per-adaptor Krum (and its empty shared group) runs too
  plain = floral.main(SMOKE + ['--methods', 'fedavg', '--out', str(tmp_path / 'plain')])
  config = json.loads((out / 'config.json').read_text())
  assert config['plan']['robust'] == {'aggregator': None, 'attack': 'sign_flip:10', 'attack_fraction': 0.5}
  accs = [r['methods']['fedavg']['test_accuracy'] for r in (attacked, defended, plain)]
  assert len(set(accs)) > 1, accs  # the attack and the reducer reach the compiled round
  assert robust_flags.from_plan(config['plan'], 'x') == config['plan']['robust']
  config['plan']['robust']['aggregator'] = 'krum:-1'
  with pytest.raises(robust_flags.UserError, match='x: --aggregator'):
    robust_flags.from_plan(config['plan'], 'x')


# FedDPA runner
from fedjax_adapters.experiments import feddpa  # noqa: E402
from test_experiments_feddpa import DATA  # noqa: E402


@pytest.mark.parametrize('argv,message', [
    (['--attack', 'label_flip', '--attack-fraction', '0.2'], 'label_flip needs class labels'),
    (['--aggregator', 'bulyan:-2'], 'num_byzantine must be an integer >= 0, got -2'),
])
def test_feddpa_bad_flags_one_line_exit_2(tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit) as e:
    feddpa.main(['--data', DATA, '--preset', 'smoke', '--out', str(tmp_path / 'run'), '--quiet'] + argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and message in err and '\n' not in err
  assert not (tmp_path / 'run').exists()


def test_feddpa_smoke_with_attack_and_defense(tmp_path):
  out = tmp_path / 'run'
  feddpa.main(['--data', DATA, '--preset', 'smoke', '--out', str(out), '--quiet', '--methods', 'fedit',
               '--bootstrap-samples', '50', '--attack', 'ipm:2', '--attack-fraction', '0.25', '--aggregator',
               'trimmed_mean:0.25'])
  config = json.loads((out / 'config.json').read_text())
  assert config['plan']['robust'] == {'aggregator': 'trimmed_mean:0.25', 'attack': 'ipm:2', 'attack_fraction': 0.25}
  assert json.loads((out / 'results.json').read_text())['status'] == 'done'
