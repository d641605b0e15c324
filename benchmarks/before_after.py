"""Old path of ``python -m fedjax_adapters.benchmarks.before_after``, kept working from a checkout."""
from experiments._forward import forward

forward(__name__, 'fedjax_adapters.benchmarks.before_after')
