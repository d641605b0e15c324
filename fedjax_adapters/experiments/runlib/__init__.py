"""What every experiment runner shares: a run directory, checkpoint + resume, progress, strict JSON, CLI checks.

Modules (importing this package imports no JAX, so a runner's ``--help`` stays fast):

* :mod:`~fedjax_adapters.experiments.runlib.cli`: argument types that reject bad values before any training, ``key=value``
  overrides of a config dataclass, writable-path probes, and :func:`~fedjax_adapters.experiments.runlib.cli.run_cli`, which turns a
  :class:`~fedjax_adapters.experiments.runlib.cli.UserError` into one line ``error: ...`` and exit status 2.
* :mod:`~fedjax_adapters.experiments.runlib.strict_json`: JSON with no NaN/Infinity (non-finite numbers become null plus a reason).
* :mod:`~fedjax_adapters.experiments.runlib.rundir`: ``config.json``, ``metrics.jsonl``, ``results.json`` and checkpoints of a run.
* :mod:`~fedjax_adapters.experiments.runlib.progress`: a progress bar per method/seed on a terminal, plain lines otherwise.
* :mod:`~fedjax_adapters.experiments.runlib.loop`: trains one (method, seed) unit with checkpoints, resume, SIGINT/SIGTERM
  handling and divergence checks (imports JAX).
* :mod:`~fedjax_adapters.experiments.runlib.memory`: the compiled memory of one FedDPA training step from abstract shapes
  (XLA's ``memory_analysis``), the memory levers, and the clients per step that fit a device (imports JAX).

``docs/experiments.md`` describes the run directory's files.
"""
