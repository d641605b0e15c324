"""Benchmark results and protocols; the code is ``fedjax_adapters.benchmarks`` (``python -m
fedjax_adapters.benchmarks.run --help``). The modules here forward the old spellings (``python -m benchmarks.run``)
from a checkout of the repository."""
