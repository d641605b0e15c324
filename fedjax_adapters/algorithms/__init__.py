"""Algorithms built from the shared pieces; none has its own round loop."""
from fedjax_adapters.algorithms.common import per_example_loss, summarize, supervised
from fedjax_adapters.algorithms.ensemble import ensemble
from fedjax_adapters.algorithms.fedavg import fedavg
from fedjax_adapters.algorithms.floral import floral
from fedjax_adapters.algorithms.local import local_adaptor

__all__ = ['per_example_loss', 'summarize', 'supervised', 'ensemble', 'fedavg', 'floral', 'local_adaptor']
