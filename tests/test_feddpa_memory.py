"""The FedDPA runner's memory report (--dry-run), its refusal of a step that does not fit, and the lever flags.

The figures come from XLA's memory_analysis of the compiled step: the test compiles the same step itself and
compares, and sizes the refusal's device from the report it just read.
"""
import os

import pytest

from fedjax_adapters.experiments import feddpa as exp
from fedjax_adapters.experiments import feddpa_run
from fedjax_adapters.experiments.configs import feddpa as configs
from fedjax_adapters.experiments.runlib import memory
from fedjax_adapters.algorithms import feddpa as F
from fedjax_adapters.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get('FEDDPA_DATASET1', os.path.join(ROOT, '..', 'shared', 'data', 'feddpa', 'dataset1'))
SMALL = ['--data', DATA, '--preset', 'smoke', '--batch-size', '1', '--max-length', '16']


@pytest.fixture(scope='module')
def dry_run():
  return exp.main(SMALL + ['--dry-run', '--base-dtype', 'bf16', '--remat', 'full'])['memory']


def test_dry_run_reports_the_compiled_steps_memory_analysis(dry_run, capsys):
  cfg = configs.CONFIGS['smoke'].replace(batch_size=1, max_length=16)
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  levers = memory.Levers('bf16', 'full')
  one = memory.compiled_memory(feddpa_run.model_config(cfg), spec, levers, clients=1, batch_size=1, seq_len=16)
  assert dry_run['one'] == one and one['temp_bytes'] > 0
  assert dry_run['per_client_bytes'] == dry_run['two']['total_bytes'] - one['total_bytes'] > 0
  assert dry_run['clients_per_step'] == 8  # smoke trains all of Dataset 1's clients at once (vmap)
  assert dry_run['needed_bytes'] == dry_run['fixed_bytes'] + 8 * dry_run['per_client_bytes']
  assert dry_run['levers'] == {'base_dtype': 'bf16', 'remat': 'full', 'quantize': None}


def test_quantized_levers_shrink_the_compiled_steps_arguments():
  cfg = configs.CONFIGS['smoke'].replace(batch_size=1, max_length=16)
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  args = {q: memory.compiled_memory(feddpa_run.model_config(cfg), spec, memory.Levers(quantize=q), clients=1,
                                    batch_size=1, seq_len=16)['argument_bytes'] for q in (None, 'int8', 'int4')}
  assert args[None] > args['int8'] > args['int4'], args


def test_a_step_that_does_not_fit_is_refused_in_one_line(dry_run, capsys):
  # A device with room for 3 of the 8 clients (from the figures the dry run just read).
  gb = (dry_run['fixed_bytes'] + 3.5 * dry_run['per_client_bytes']) / 1e9
  with pytest.raises(SystemExit) as e:
    exp.main(SMALL + ['--dry-run', '--base-dtype', 'bf16', '--remat', 'full', '--device-memory', str(gb)])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error: one training step of 8 client(s) needs')
  assert 'at most 3 client(s) fit' in err and '--quantize int8' in err and '--remat full' in err


@pytest.mark.parametrize('flag', [['--remat', 'bogus'], ['--base-dtype', 'f16'], ['--quantize', 'int3'],
                                  ['--device-memory', '-1']])
def test_bad_lever_values_are_refused(flag, capsys):
  with pytest.raises(SystemExit) as e:
    exp.main(SMALL + ['--dry-run'] + flag)
  assert e.value.code == 2 and flag[1] in capsys.readouterr().err


def test_gguf_lever_needs_a_gguf_model_and_its_dry_run_counts_the_files_blocks(capsys, tmp_path):
  with pytest.raises(SystemExit) as e:
    exp.main(SMALL + ['--dry-run', '--quantize', 'gguf'])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1
  assert '--quantize gguf keeps the quantized blocks of a GGUF model, and --model tiny is not one' in err
  # A tiny Q4_1 file: the dry run models its linears as 4-bit blocks (what the runner's int4 lever compiles).
  import gguf  # pylint: disable=g-import-not-at-top
  from llama_testing import random_llama, write_gguf  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'tiny.gguf'
  config = llama.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  write_gguf(path, random_llama(config, 0), quant=gguf.GGMLQuantizationType.Q4_1)
  argv = SMALL + ['--model', str(path), '--dry-run']
  report = exp.main(argv + ['--quantize', 'gguf'])['memory']
  assert report['levers']['quantize'] == 'gguf'
  assert report['one'] == exp.main(argv + ['--quantize', 'int4'])['memory']['one']  # below f32: the test above


def test_runner_lever_names_match_the_library():
  assert exp.REMAT_POLICIES == tuple(llama.REMAT_POLICIES)
  assert exp.BASE_DTYPES == tuple(memory.BASE_DTYPES)
  assert exp.QUANTIZE == tuple(q for q in memory.QUANTIZE if q)


def test_micro_batching_shrinks_the_dry_runs_temporaries(capsys):
  """The dry run compiles the micro-batched step: its temporaries are below those of the full batch's step."""
  argv = ['--data', DATA, '--preset', 'smoke', '--batch-size', '8', '--max-length', '16', '--backend', 'sequential']
  report = exp.main(argv + ['--micro-batch', '2', '--dry-run'])['memory']
  cfg = configs.CONFIGS['smoke'].replace(batch_size=8, max_length=16)
  spec = F.lm_spec(target=cfg.target, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
  full = memory.compiled_memory(feddpa_run.model_config(cfg), spec, memory.Levers(), clients=1, batch_size=8,
                                seq_len=16)
  assert report['micro_batch'] == 2 and report['one']['argument_bytes'] == full['argument_bytes']
  assert report['one']['temp_bytes'] < full['temp_bytes'], (report['one'], full)
  assert 'in micro-batches of 2' in capsys.readouterr().out


@pytest.mark.parametrize('batch, micro, hint', [(8, None, '--micro-batch 4 (or smaller; a divisor of --batch-size 8)'),
                                               (12, 6, '--micro-batch 3 (or smaller'), (8, 1, None), (1, None, None)])
def test_the_refusal_suggests_the_next_smaller_micro_batch(batch, micro, hint):
  text = feddpa_run.levers_hint(configs.CONFIGS['smoke'].replace(batch_size=batch, micro_batch=micro))
  assert '--remat full' in text and (hint in text if hint else '--micro-batch' not in text)


def test_the_benchmark_extrapolates_linearly_in_the_layer_count():
  from fedjax_adapters.benchmarks import feddpa_memory as bench  # pylint: disable=g-import-not-at-top
  lv = {'base_dtype': 'f32', 'remat': None, 'quantize': None}
  doc = lambda layers, fixed, per: {'config': {'num_hidden_layers': layers}, 'rows': [
      {'levers': lv, 'micro_batch': 8, 'fixed_bytes': fixed, 'per_client_bytes': per}]}
  (row,) = bench.extrapolate(doc(2, 3e9, 10e9), doc(4, 5e9, 14e9), layers=32)
  # fixed: 3 + 30 x 1 GB; per client: 10 + 30 x 2 GB; 141 GB holds (141 - 33) // 70 = 1 client, 80 GB (80 - 33) // 70 = 0.
  assert (row['fixed_gb'], row['per_client_gb'], row['one_client_gb']) == pytest.approx((33.0, 70.0, 103.0))
  assert (row['clients_141gb'], row['clients_80gb'], row['micro_batch']) == (1, 0, 8)
  assert '| 8 | f32 | 33.0 | 70.0 | 103.0 | 1 | 0 |' in bench.markdown([row])
