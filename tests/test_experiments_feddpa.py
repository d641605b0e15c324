"""`python -m experiments.feddpa`: the smoke config end to end (train, weighted decoding, ROUGE, JSON), bad input."""
import json
import os

import pytest

from experiments import feddpa as exp

# FedDPA's Dataset 1 sits in ../shared beside the repository (as in CI).
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'data', 'feddpa',
                    'dataset1')


def test_smoke_run_writes_the_documented_json(tmp_path):
  out = tmp_path / 'smoke.json'
  result = exp.main(['--data', DATA, '--config', 'smoke', '--methods', 'feddpa_t', '--json', str(out)])
  written = json.loads(out.read_text())
  assert written['methods'].keys() == {'feddpa_t'} == result['methods'].keys()
  r = written['methods']['feddpa_t']
  categories = {'coreference', 'entailment', 'linguistic_acceptability', 'paraphrase', 'question_classification',
                'structure_to_text', 'text_formatting', 'word_disambiguation'}
  for block in ('personalization', 'test_time'):
    assert set(r[block]) == categories | {'avg'}
    assert all(0.0 <= v <= 1.0 for v in r[block].values())
  assert written['config'] == 'smoke' and written['metric'] == 'rouge1' and written['settings']['num_refs'] == 2
  assert r['seconds']['train'] > 0 and r['seconds']['evaluate'] > 0


def test_bad_config_or_method_lists_the_valid_ones(capsys):
  with pytest.raises(SystemExit):
    exp.main(['--data', DATA, '--config', 'gpu'])
  assert "unknown config 'gpu'; valid configs: paper, cpu, smoke" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    exp.main(['--data', DATA, '--methods', 'fedprox'])
  assert 'unknown method(s) fedprox; valid methods: centralized, fedit, local, feddpa_t, feddpa_f' in \
      capsys.readouterr().err
