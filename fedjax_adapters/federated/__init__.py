"""The federated engine: client store, sampling, client updates, aggregators, the compiled round, sharding over a
device mesh (one or many processes) and a host-memory client store for large populations."""
from fedjax_adapters.federated.aggregators import Aggregator, fedavg, per_adaptor_weights, router_weighted, weighted_mean
from fedjax_adapters.federated.client_store import check_client_ids, gather, scatter
from fedjax_adapters.federated.client_update import (Batch, ClientData, ClientOutput, batch_indices,
                                                     make_client_update, masked_mean)
from fedjax_adapters.federated.host_store import (HostClientStore, evaluate_host, host_data, host_init,
                                                  make_host_round)
from fedjax_adapters.federated.round import (Algorithm, ServerState, client_data, evaluate, make_round,
                                             make_sampled_round, map_clients, round_client_ids, run_rounds)
from fedjax_adapters.federated.sampling import clients_per_round, sample_clients
from fedjax_adapters.federated.sharding import (client_mesh, client_sharding, initialize_distributed, replicate,
                                                replicated_sharding, shard_clients)

__all__ = ['Aggregator', 'fedavg', 'per_adaptor_weights', 'router_weighted', 'weighted_mean', 'check_client_ids',
           'gather', 'scatter', 'Batch', 'ClientData', 'ClientOutput', 'batch_indices', 'make_client_update',
           'masked_mean', 'HostClientStore', 'evaluate_host', 'host_data', 'host_init', 'make_host_round',
           'Algorithm', 'ServerState', 'client_data', 'evaluate', 'make_round', 'make_sampled_round',
           'round_client_ids', 'map_clients', 'run_rounds', 'clients_per_round', 'sample_clients', 'client_mesh',
           'client_sharding',
           'initialize_distributed', 'replicate', 'replicated_sharding', 'shard_clients']
