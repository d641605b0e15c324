"""Old path of ``python -m fedjax_adapters.experiments.feddpa``, kept working from a checkout."""
from experiments._forward import forward

forward(__name__, 'fedjax_adapters.experiments.feddpa')
