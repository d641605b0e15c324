"""fedjax_adapters: personalized federated fine-tuning with adapters in JAX/Flax.

Pure-function adaptors (``adapters``), Flax NNX surgery and split/merge (``nn``), a federated engine whose round is
compiled once and vmapped over clients (``federated``), and algorithms built from those pieces (``algorithms``):
FedAvg, LoRA-FedAvg (FedIT), Local Adaptor, FLoRAL (arXiv 2410.03497) and its Ensemble baseline, FedDPA
(arXiv 2403.19211).

Names are imported on first use (PEP 562), so ``import fedjax_adapters`` is cheap and the command-line runners under
``fedjax_adapters.experiments`` answer ``--help`` without importing JAX.
"""
import importlib

__version__ = '0.1.0'

_SUBMODULES = ('adapters', 'algorithms', 'checkpoint', 'experiment', 'federated', 'interop', 'metrics', 'models', 'nn',
               'optim', 'data')
_NAMES = {
    'fedjax_adapters.adapters': ('conv_delta', 'dense_delta', 'dual_delta', 'embed_delta', 'norm_delta',
                                 'resolve_rank', 'router_probs'),
    'fedjax_adapters.algorithms': ('LossInputs', 'ensemble', 'fedavg', 'floral', 'local_adaptor', 'lora_fedavg',
                                   'summarize', 'ditto', 'fedalt', 'fedsa_lora', 'flora', 'hetlora'),
    'fedjax_adapters.data.federated': ('FederatedData', 'FederatedDataset', 'stack_clients'),
    'fedjax_adapters.federated': ('Aggregator', 'Algorithm', 'ClientData', 'ClientInfo', 'ClientMapping',
                                  'ClientOutput', 'Round', 'RoundInfo', 'ServerState', 'UpdateGuard',
                                  'chunked_clients', 'client_data', 'cyclic_sampling', 'evaluate', 'fixed_sampling',
                                  'make_client_update', 'make_round', 'poisson_sampling', 'predict',
                                  'sequential_clients', 'sharded_clients', 'tiled_clients', 'vmap_clients'),
    'fedjax_adapters.nn': ('AdapterSpec', 'ModelDef', 'adapt', 'split_model'),
    'fedjax_adapters.optim': ('lora_preconditioner',),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = [m for m in _SUBMODULES if m != 'data'] + [n for names in _NAMES.values() for n in names]


def __getattr__(name: str):
  if name in _WHERE:
    value = getattr(importlib.import_module(_WHERE[name]), name)
  elif name in _SUBMODULES:
    value = importlib.import_module(f'{__name__}.{name}')
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
