"""The core install: `pip install fedjax_adapters` brings only the JAX side, and the library, the run API and the
report's table work with nothing else (extras: data, llm, interop, tracking, report)."""
import configparser
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS_ONLY = ('torch', 'peft', 'transformers', 'tokenizers', 'safetensors', 'gguf', 'rouge_score',
               'tensorflow', 'tensorflow_datasets', 'matplotlib', 'tensorboardX', 'tensorboard', 'wandb', 'mlflow',
               'tqdm')


def test_setup_cfg_core_is_the_jax_side_and_every_extra_is_declared():
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(ROOT, 'setup.cfg'))
  core = [line.split('>')[0].split('=')[0].split('<')[0] for line in cfg['options']['install_requires'].split()]
  assert core == ['jax', 'flax', 'optax', 'orbax-checkpoint', 'numpy']
  extras = cfg['options.extras_require']
  assert {'data', 'llm', 'interop', 'tracking', 'report', 'all', 'test'} <= set(extras)
  assert 'fedjax_adapters[data,llm,interop,tracking,report]' in extras['test'].split()


def test_the_run_api_and_the_report_import_no_extra(tmp_path):
  """A run of the API on a model of one's own and the report's table import no package outside the core: they work in
  a fresh `pip install fedjax_adapters` (where examples/experiment_custom_model.py was run, see docs/experiments.md)."""
  code = ('import sys\n'
          'import fedjax_adapters as fa\n'
          'from fedjax_adapters.experiments import report\n'
          'import experiment_job\n'
          'alg, train, test = experiment_job.job()\n'
          f'result = fa.experiment.run(alg, train, test, rounds=4, out={str(tmp_path / "run")!r}, seeds=[0], '
          'quiet=True)\n'
          'print(report.main([result.path, "--no-plots"])["table"])\n'
          f'print("loaded:", [m for m in {EXTRAS_ONLY!r} if m in sys.modules])\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')])))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'loaded: []' in proc.stdout and '| floral |' in proc.stdout, proc.stdout[-2000:]
