"""`python -m fedjax_adapters.experiments.feddpa`: the smoke config end to end on uneven clients (run directory, per-prompt scores,
paired intervals, report, PEFT export), resume after SIGKILL, and bad input stopping before any training."""
import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_adapters.experiments import feddpa as exp
from fedjax_adapters.experiments import report
from fedjax_adapters import checkpoint
from fedjax_adapters.metrics import bootstrap, rouge
from run_helpers import kill_after_round, strip_wall_clock
import cli_testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FedDPA's Dataset 1 sits in ../shared beside the repository (as in CI).
DATA = os.environ.get('FEDDPA_DATASET1', os.path.join(ROOT, '..', 'shared', 'data', 'feddpa', 'dataset1'))
METHODS = ('fedit', 'local', 'feddpa_t', 'feddpa_f')
CATEGORIES = {'coreference', 'entailment', 'linguistic_acceptability', 'paraphrase', 'question_classification',
              'structure_to_text', 'text_formatting', 'word_disambiguation'}


@pytest.fixture(scope='module')
def uneven_data(tmp_path_factory):
  """Dataset 1 with 6 training examples per client, except client 2 with 3 (fewer than the smoke config's 4)."""
  root = tmp_path_factory.mktemp('uneven')
  os.makedirs(root / '8')
  for k in range(8):
    with open(os.path.join(DATA, '8', f'local_training_{k}.json')) as f:
      records = json.load(f)
    (root / '8' / f'local_training_{k}.json').write_text(json.dumps(records[:3 if k == 2 else 6]))
  name = 'flan_test_200_selected_nstrict_1.jsonl'
  (root / name).write_text(open(os.path.join(DATA, name)).read())
  return str(root)


def _args(data, out):
  return ['--data', data, '--preset', 'smoke', '--out', str(out), '--bootstrap-samples', '200', '--quiet']


@pytest.fixture(scope='module')
def smoke(tmp_path_factory, uneven_data):
  out = tmp_path_factory.mktemp('feddpa') / 'run'
  peft = out.parent / 'peft'
  console = io.StringIO()
  with contextlib.redirect_stdout(console):
    result = exp.main(_args(uneven_data, out) + ['--export-peft', str(peft)])
  (out.parent / 'console.txt').write_text(console.getvalue())
  return out, peft, result


def test_smoke_run_says_its_scores_mean_nothing_at_the_start_and_beside_the_table(smoke):
  lines = (smoke[0].parent / 'console.txt').read_text().strip().splitlines()
  note = [i for i, line in enumerate(lines) if 'scores mean nothing' in line and '--preset mid' in line]
  table = [i for i, line in enumerate(lines) if line.startswith('| feddpa_f')]
  assert len(note) == 2 and note[0] == 0 and table and note[1] == len(lines) - 1 > table[-1], lines


def _strict(text):
  return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_smoke_run_writes_scores_intervals_and_a_report(smoke):
  out, _, result = smoke
  doc = _strict((out / 'results.json').read_text())
  assert doc['status'] == 'done' and doc['runner'] == 'feddpa' and doc['metric'] == 'rouge1'
  assert doc['methods'].keys() == set(METHODS) and doc['settings']['num_refs'] == 2
  assert set(doc['test_categories']) == CATEGORIES and len(doc['test_categories']) == 8
  for m in METHODS:
    r = doc['methods'][m]
    assert set(r['personalization']) == set(r['test_time']) == CATEGORIES | {'avg'}
    per_prompt = np.asarray(r['per_seed']['0']['per_prompt'])
    assert per_prompt.shape == (8, 8)
    # The stored averages are those of the stored per-prompt scores, so a report can be rebuilt from the file.
    strata = [np.flatnonzero(np.asarray(doc['test_categories']) == c) for c in dict.fromkeys(doc['client_categories'])]
    owners = rouge.owner_weights(doc['client_categories'], list(dict.fromkeys(doc['client_categories'])))
    means = bootstrap.stratum_means(per_prompt, strata)
    assert rouge.personalization_table(means, owners).mean() == pytest.approx(r['personalization']['avg'])
    assert rouge.test_time_table(means, owners).mean() == pytest.approx(r['test_time']['avg'])
    answers = _strict((out / 'predictions' / f'{m}-seed0.json').read_text())['answers']
    assert len(answers) == 8 and all(len(a) == 8 for a in answers)
  again = rouge.personalization_intervals({m: np.asarray(doc['methods'][m]['per_seed']['0']['per_prompt'])
                                           for m in METHODS}, doc['test_categories'], doc['client_categories'],
                                          num_samples=200, seed=0)
  assert again == doc['intervals']['0']
  claims = [(d['method'], d['baseline'], d['block']) for d in doc['intervals']['0']['differences']]
  assert claims == list(rouge.PAPER_COMPARISONS)
  lines = [_strict(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['method'], r['round']) for r in lines] == [(m, r) for m in METHODS for r in (1, 2)]
  assert all('eval' in r for r in lines if r['round'] == 2)
  assert result['methods'].keys() == set(METHODS)
  made = report.main([str(out), '--out', str(out / 'report')])
  png = [f for f in made['files'] if f.endswith('.png')]
  assert png and all(os.path.getsize(f) > 1000 for f in png)
  assert 'feddpa_f - fedit | TTP' in made['table']


def test_peft_export_writes_every_method(smoke):
  _, peft, _ = smoke
  for m in METHODS:
    manifest = json.loads((peft / m / 'manifest.json').read_text())
    assert manifest['base'] == str((peft / 'base').resolve())
  assert (peft / 'fedit' / 'global' / 'adapter_config.json').exists()
  assert (peft / 'local' / 'local' / 'client_2' / 'adapter_model.safetensors').exists()
  assert {p.name for p in (peft / 'base').iterdir()} >= {'config.json', 'model.safetensors', 'tokenizer.json'}


def test_peft_export_serves_offline_with_auto_peft_model(smoke, monkeypatch):
  """The exported folders name their base, written once beside them: AutoPeftModelForCausalLM loads them with the
  hub switched off, and their logits are the trained JAX model's."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from peft import AutoPeftModelForCausalLM  # pylint: disable=g-import-not-at-top
  from fedjax_adapters import interop  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments import feddpa_run  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments.configs.feddpa import CONFIGS  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  out, peft, _ = smoke
  ids = np.array([[1, 523, 2915, 28, 1789, 30, 198]])
  base, _ = feddpa_run.load_base(CONFIGS['smoke'])
  alg = feddpa_run.build_algorithm('feddpa_t', CONFIGS['smoke'], base)
  init = alg.init(jax.random.key(0), 8)
  with checkpoint.Manager(out / 'checkpoints' / 'feddpa_t' / 'seed0') as ckpts:
    state = ckpts.restore(ckpts.latest_step(), like=init._replace(frozen=()))._replace(frozen=init.frozen)
  mdef, parts, local, _ = interop.feddpa_parts(alg, state)
  parts = {**parts, 'local': jax.tree.map(lambda a: a[3], local)}
  for folder, (gw, lw) in (('global', (1.0, 0.0)), ('local/client_3', (0.0, 1.0))):
    expected, _ = mdef.apply(parts, ids, np.ones_like(ids), global_weight=gw, local_weight=lw)
    model = AutoPeftModelForCausalLM.from_pretrained(str(peft / 'feddpa_t' / folder), dtype=torch.float32)
    with torch.no_grad():
      got = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=0, err_msg=folder)


def _start(data, out):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, '-m', 'fedjax_adapters.experiments.feddpa', *_args(data, out)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _strip(doc):
  """The document without wall-clock fields and the export path (all an interruption or a new folder changes)."""
  return strip_wall_clock(doc, drop=('seconds', 'wall_s', 'peft'))


def test_sigkill_mid_method_then_resume_is_bit_identical(tmp_path, smoke, uneven_data):
  reference = smoke[0]
  out = tmp_path / 'run'
  proc = _start(uneven_data, out)
  saved = kill_after_round(proc, out, 'feddpa_t', 1)
  assert saved['units']['local']['0']['status'] == 'done' and saved['units']['feddpa_t']['0']['status'] == 'running'
  exp.main(['--resume', str(out), '--quiet'])
  got, want = (_strict((d / 'results.json').read_text()) for d in (out, reference))
  assert got['status'] == 'done' and _strip(got) == _strip(want)
  lines = [_strip(json.loads(x)) for x in (out / 'metrics.jsonl').read_text().splitlines()]
  assert lines == [_strip(json.loads(x)) for x in (reference / 'metrics.jsonl').read_text().splitlines()]
  from fedjax_adapters.experiments import feddpa_run
  from fedjax_adapters.experiments.configs.feddpa import CONFIGS
  base, _ = feddpa_run.load_base(CONFIGS['smoke'])
  for m in METHODS:
    assert (out / 'predictions' / f'{m}-seed0.json').read_text() == \
        (reference / 'predictions' / f'{m}-seed0.json').read_text()
    like = feddpa_run.build_algorithm(m, CONFIGS['smoke'], base).init(jax.random.key(0), 8)._replace(frozen=())
    with checkpoint.Manager(out / 'checkpoints' / m / 'seed0') as a, \
         checkpoint.Manager(reference / 'checkpoints' / m / 'seed0') as b:
      assert a.latest_step() == b.latest_step() == 2
      for x, y in zip(jax.tree.leaves(a.restore(2, like)), jax.tree.leaves(b.restore(2, like))):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
          x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _one_line_error(capsys, argv):
  return cli_testing.one_line_error(capsys, exp.main, argv)


@pytest.mark.parametrize('argv, words', [
    (['--seeds', '-1'], 'seeds must be >= 0'),
    (['--rounds', '-1'], '--rounds: must be >= 0'),
    (['--lr', '0'], '--lr: must be finite and > 0'),
    (['--lr', 'nan'], '--lr: must be finite and > 0'),
    (['--mix-weight', '2'], 'mix_weight must lie in [0, 1]'),
    (['--micro-batch', '3'], 'micro_batch=3 does not divide batch_size=2'),
    (['--micro-batch', '0'], '--micro-batch: must be >= 1, got 0'),
    (['--set', 'micro_batch=-1'], 'micro_batch must be an integer >= 1 or None; got -1'),
    (['--set', 'num_refs=9'], 'num_refs=9 references cannot be drawn from train_per_client=4'),
    (['--set', 'bogus=1'], 'unknown setting(s) bogus'),
    (['--weight-target', 'both'], "--weight-target: invalid choice: 'both'"),
    (['--preset', 'gpux'], "unknown preset 'gpux'; valid presets: paper, gpu, cpu, mid, smoke"),
    (['--config', 'gpux'], '--config gpux: no such settings file, and not a preset'),
    (['--rank', '33'], "rank 33 is larger than model 'tiny' allows (hidden size 32"),
    (['--num-epochs', '100000000'], 'num_epochs must be <= 1000'),
    (['--rounds', '3000000000'], 'rounds must be <= 2147483647'),
    (['--methods', 'fedprox'], 'unknown method(s) fedprox; valid methods: centralized, fedit, local, feddpa_t'),
    (['--seeds', '1', '2', '2'], 'lists a seed twice'),
    (['--model', '/nonexistent/model.gguf'], "--model /nonexistent/model.gguf: expected a Hugging Face folder"),
])
def test_bad_arguments_stop_before_any_training(capsys, tmp_path, argv, words):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(out)] + argv)
  assert words in err
  assert not out.exists()


def test_bad_data_model_and_paths_stop_before_any_training(capsys, tmp_path, uneven_data):
  out = tmp_path / 'run'
  err = _one_line_error(capsys, ['--data', uneven_data, '--preset', 'smoke', '--num-refs', '4', '--out', str(out)])
  assert 'client 2 has 3 training examples, fewer than num_refs=4' in err
  err = _one_line_error(capsys, ['--data', str(tmp_path / 'none'), '--preset', 'smoke', '--out', str(out)])
  assert f'--data {tmp_path / "none"}: FedDPA folder' in err and 'does not exist' in err
  bad = tmp_path / 'bad'
  os.makedirs(bad / '8')
  (bad / '8' / 'local_training_0.json').write_text('{not json')
  err = _one_line_error(capsys, ['--data', str(bad), '--preset', 'smoke', '--out', str(out)])
  assert 'local_training_0.json is not valid JSON' in err
  fake = tmp_path / 'model.gguf'
  fake.write_text('hello')
  err = _one_line_error(capsys, ['--data', DATA, '--model', str(fake), '--out', str(out)])
  assert 'not a GGUF file' in err
  fake.write_bytes(b'GGUF\x03\x00\x00\x00garbage')  # a GGUF header, then nothing the loader can read
  probed = tmp_path / 'probed'
  err = _one_line_error(capsys, ['--data', DATA, '--model', str(fake), '--out', str(probed), '--quiet'])
  assert err.startswith(f'error: --model {fake}: ')
  assert not (probed / 'config.json').exists()  # the model loads before the run is created: --out stays reusable
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(blocker / 'run')])
  assert '--out' in err and 'not writable' in err
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(out), '--json',
                                 str(blocker / 'x.json')])
  assert '--json' in err
  err = _one_line_error(capsys, ['--data', DATA, '--preset', 'smoke', '--out', str(out), '--export-peft',
                                 str(blocker / 'peft')])
  assert '--export-peft' in err and 'not writable' in err
  assert not out.exists()
  err = _one_line_error(capsys, ['--resume', str(tmp_path)])
  assert 'not a run directory' in err
  err = _one_line_error(capsys, ['--resume', str(tmp_path), '--rounds', '3'])
  assert '--resume continues a run with its own settings; drop --rounds' in err


def test_every_setting_has_a_flag_or_set_and_print_config(capsys):
  exp.main(['--preset', 'cpu', '--lr', '3e-4', '--num-epochs', '2', '--lambda', '0.3', '--S', '3', '--set',
            'max_new_tokens=4', '--print-config'])
  cfg = json.loads(capsys.readouterr().out)
  assert (cfg['lr'], cfg['num_epochs'], cfg['lam'], cfg['num_refs'], cfg['max_new_tokens']) == (3e-4, 2, 0.3, 3, 4)
  assert cfg['rounds'] == 5 and cfg['name'] == 'cpu'
  help_text = exp.build_parser().format_help()
  for flag in ('--lr', '--num-epochs', '--batch-size', '--rank', '--alpha', '--dropout', '--lambda', '--S',
               '--weight-target', '--max-new-tokens', '--num-beams', '--test-per-task', '--export-peft', '--resume'):
    assert flag in help_text
  assert "cpu 0.001" in " ".join(help_text.split())  # defaults are listed per config


def test_old_spellings_still_work_and_warn(capsys, tmp_path):
  """One vocabulary with the FLoRAL runner: --preset NAME, --config FILE, --seeds, --num-epochs; the old spellings
  (--config NAME, --config-file FILE, --seed K, --epochs N) mean the same and say what they are now."""
  settings = tmp_path / 'settings.json'
  settings.write_text(json.dumps({'lr': 0.002}))
  old = exp.make_plan(exp.build_parser().parse_args(['--config', 'smoke', '--config-file', str(settings), '--seed',
                                                     '3', '--epochs', '2', '--print-config']))
  warnings = capsys.readouterr().err.splitlines()
  new = exp.make_plan(exp.build_parser().parse_args(['--preset', 'smoke', '--config', str(settings), '--seeds',
                                                     '3:4', '--num-epochs', '2', '--print-config']))
  assert capsys.readouterr().err == ''
  assert old['cfg'] == new['cfg'] and old['seeds'] == new['seeds'] == [3]
  assert (new['cfg'].name, new['cfg'].lr, new['cfg'].num_epochs) == ('smoke', 0.002, 2)
  assert sorted(warnings) == sorted([
      'warning: --config smoke is now spelled --preset smoke; --config takes a settings file',
      'warning: --config-file is now spelled --config FILE; the old spelling still works but will go',
      'warning: --seed is now spelled --seeds K:K+1; the old spelling still works but will go',
      'warning: --epochs is now spelled --num-epochs; the old spelling still works but will go'])


def test_help_imports_no_jax():
  code = ('import sys; from fedjax_adapters.experiments import feddpa; feddpa.build_parser().format_help(); '
          'heavy = [m for m in ("jax", "transformers", "fedjax_adapters.federated", "fedjax_adapters.models") '
          'if m in sys.modules]; '
          'assert not heavy, heavy')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


def test_a_dolly_file_is_a_feddpa_dataset_one_client_per_category(capsys, tmp_path):
  from fedjax_adapters.experiments.configs.feddpa import CONFIGS  # pylint: disable=g-import-not-at-top
  records = [{'instruction': f'Q{i}', 'context': '', 'response': f'A{i}', 'category': c}
             for i in range(250) for c in ('open_qa', 'summarization')]
  path = tmp_path / 'databricks-dolly-15k.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  assert exp.check_data(str(path), CONFIGS['smoke']) == str(path)
  path.write_text(''.join(json.dumps(r) + '\n' for r in records[:300]))   # 150 per category: not more than 200
  err = _one_line_error(capsys, ['--data', str(path), '--preset', 'smoke', '--out', str(tmp_path / 'run')])
  assert "category 'open_qa' has 150 records, not more than test_per_category=200" in err


def test_clients_without_loss_tokens_are_found_at_a_short_cutoff():
  """At the smoke config's former 48-token cutoff, Dataset 1's clients 1, 4 and 7 keep no response token in their
  first 4 examples (their prompts fill it); at its 80 tokens every client trains."""
  from fedjax_adapters.data import feddpa as fdata  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments import feddpa_run  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments.configs.feddpa import CONFIGS  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.models.llama_loaders import load_tokenizer, smollm2_gguf_path  # pylint: disable=g-import-not-at-top
  tokenizer, data = load_tokenizer(smollm2_gguf_path()), fdata.load_feddpa(DATA)
  assert feddpa_run.clients_without_loss_tokens(tokenizer, data, CONFIGS['smoke'].replace(max_length=48)) == [1, 4, 7]
  assert feddpa_run.clients_without_loss_tokens(tokenizer, data, CONFIGS['smoke']) == []


def test_a_run_stored_before_micro_batching_resumes_with_the_whole_batch():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from fedjax_adapters.experiments.configs import feddpa as configs  # pylint: disable=g-import-not-at-top
  settings = dataclasses.asdict(configs.CONFIGS['cpu'])
  del settings['micro_batch']
  assert exp.settings_from_config({'settings': settings}, 'config.json') == configs.CONFIGS['cpu']
  del settings['rounds']
  with pytest.raises(exp.UserError, match='settings lack rounds'):
    exp.settings_from_config({'settings': settings}, 'config.json')
