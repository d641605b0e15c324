"""fedjax_adapters: personalized federated fine-tuning with adapters in JAX/Flax.

Pure-function adaptors (``adapters``), Flax NNX surgery and split/merge (``nn``), a federated engine whose round is
compiled once and vmapped over clients (``federated``), and algorithms built from those pieces (``algorithms``):
FedAvg, LoRA-FedAvg (FedIT), Local Adaptor, FLoRAL (arXiv 2410.03497) and its Ensemble baseline, FedDPA
(arXiv 2403.19211).
"""
from fedjax_adapters import adapters, algorithms, checkpoint, federated, nn, optim
from fedjax_adapters.adapters import (conv_delta, dense_delta, dual_delta, embed_delta, norm_delta, resolve_rank,
                                      router_probs)
from fedjax_adapters.algorithms import (LossInputs, ensemble, fedavg, floral, local_adaptor, lora_fedavg,
                                        summarize)
from fedjax_adapters.data.federated import FederatedData, FederatedDataset, stack_clients
from fedjax_adapters.federated import (Aggregator, Algorithm, ClientData, ClientOutput, Round, ServerState,
                                       UpdateGuard, chunked_clients, client_data, evaluate, make_client_update,
                                       make_round, predict, sequential_clients, sharded_clients, vmap_clients)
from fedjax_adapters.nn import AdapterSpec, ModelDef, adapt, split_model
from fedjax_adapters.optim import lora_preconditioner

__version__ = '0.1.0'

__all__ = [
    'adapters', 'algorithms', 'checkpoint', 'federated', 'nn', 'optim',
    'conv_delta', 'dense_delta', 'dual_delta', 'embed_delta', 'norm_delta', 'resolve_rank', 'router_probs',
    'LossInputs', 'ensemble', 'fedavg', 'floral', 'local_adaptor', 'lora_fedavg', 'summarize',
    'FederatedData', 'FederatedDataset', 'stack_clients',
    'Aggregator', 'Algorithm', 'ClientData', 'ClientOutput', 'Round', 'ServerState', 'UpdateGuard',
    'chunked_clients', 'client_data', 'evaluate', 'make_client_update', 'make_round', 'predict',
    'sequential_clients', 'sharded_clients', 'vmap_clients',
    'AdapterSpec', 'ModelDef', 'adapt', 'split_model',
    'lora_preconditioner',
]
