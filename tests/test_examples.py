"""Every script in examples/ runs as a user would run it and asserts its own claim (loss falls, router separates
clusters, predictions equal evaluate, ...)."""
import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).parent.parent
# Examples that need inputs made by another test (which runs them there).
RUN_ELSEWHERE = {'peft_generate.py': 'tests/test_interop_feddpa.py'}
EXAMPLES = sorted(p for p in (ROOT / 'examples').glob('*.py') if p.name not in RUN_ELSEWHERE)


def test_every_example_is_short_and_run_somewhere():
  assert len(EXAMPLES) >= 5, EXAMPLES
  for path in (ROOT / 'examples').glob('*.py'):
    assert len(path.read_text().splitlines()) <= 80, f'{path.name} is longer than 80 lines'
  for name, test in RUN_ELSEWHERE.items():
    assert name in (ROOT / test).read_text(), f'{test} does not run examples/{name}'


@pytest.mark.parametrize('path', EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_and_asserts_its_claim(path):
  runpy.run_path(str(path), run_name='__main__')
