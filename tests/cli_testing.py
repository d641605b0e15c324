"""Helpers for tests that call a runner's ``main`` as the command line does."""
import pytest

FLORAL_SMOKE = ['--task', 'mnist_offline_label_shift', '--smoke', '--quiet']


def one_line_error(capsys, main, argv):
  """Runs ``main(argv)``, checks it exits with status 2 and one ``error: ...`` line on stderr; returns that line."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err, err
  return err


def run_floral(argv):
  """``(exit status, results)`` of the FLoRAL runner on ``argv`` (results None when it exits)."""
  from fedjax_adapters.experiments import floral  # pylint: disable=g-import-not-at-top
  try:
    return 0, floral.main(argv)
  except SystemExit as e:
    return e.code, None
