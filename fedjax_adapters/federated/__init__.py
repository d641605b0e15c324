"""The federated engine: client store, sampling, client updates, screening, aggregators, the compiled round, how
clients are mapped (all at once, in chunks, in cache-sized tiles, one by one, over a device mesh) and a host-memory
client store for large populations."""
from fedjax_adapters.federated.aggregators import (Aggregator, Reducer, RoundInfo, coordinate_median, mean_aggregator,
                                                   per_adaptor_weights, router_aggregator, server_step, weighted_mean)
from fedjax_adapters.federated.algorithm import Algorithm, ServerState
from fedjax_adapters.federated.client_store import check_client_ids, gather, scatter
from fedjax_adapters.federated.client_update import (Batch, ClientData, ClientInfo, ClientOutput, accumulate_grads,
                                                     batch_indices, check_micro_batch, client_data,
                                                     default_client_info, make_client_update, masked_mean, rows_weight)
from fedjax_adapters.federated.evaluation import evaluate, predict
from fedjax_adapters.federated.guard import REJECT_REASONS, UpdateGuard
from fedjax_adapters.federated.host_store import (HostClientStore, evaluate_host, host_data, host_init,
                                                  make_host_round)
from fedjax_adapters.federated.mapping import (ClientMapping, chunked_clients, sequential_clients, sharded_clients,
                                               vmap_clients)
from fedjax_adapters.federated.privacy import DPConfig, DPState, dp_aggregator
from fedjax_adapters.federated.dp_ftrl import TreeState, dp_ftrl_aggregator
from fedjax_adapters.federated.round import Adversary, Round, make_round, round_client_ids, round_sample, run_rounds
from fedjax_adapters.federated import attacks, robust
from fedjax_adapters.federated.robust import (REDUCERS, bulyan, centered_clipping, geometric_median, krum,
                                              norm_bounded_mean, reducer_from_name, trimmed_mean)
from fedjax_adapters.federated.sampling import (Sampling, clients_per_round, cyclic_sampling, fixed_sampling,
                                                poisson_sampling, poisson_slots, sample_clients)
from fedjax_adapters.federated.tiling import TiledClients, tiled_clients
from fedjax_adapters.federated.sharding import (client_mesh, client_sharding, initialize_distributed, replicate,
                                                replicated_sharding, shard_clients)

__all__ = ['Aggregator', 'Reducer', 'RoundInfo', 'coordinate_median', 'mean_aggregator', 'per_adaptor_weights',
           'router_aggregator', 'server_step', 'weighted_mean', 'Algorithm', 'ServerState', 'check_client_ids',
           'gather', 'scatter', 'Batch', 'ClientData', 'ClientInfo', 'ClientOutput', 'default_client_info',
           'batch_indices', 'client_data', 'make_client_update', 'masked_mean', 'accumulate_grads',
           'check_micro_batch', 'rows_weight', 'evaluate', 'predict',
           'REJECT_REASONS', 'UpdateGuard', 'HostClientStore', 'evaluate_host', 'host_data', 'host_init',
           'make_host_round', 'ClientMapping', 'chunked_clients', 'sequential_clients', 'sharded_clients',
           'vmap_clients', 'Adversary', 'Round', 'make_round', 'round_client_ids', 'round_sample', 'run_rounds',
           'Sampling', 'clients_per_round', 'fixed_sampling', 'poisson_sampling', 'poisson_slots', 'sample_clients',
           'client_mesh', 'client_sharding', 'initialize_distributed', 'replicate', 'replicated_sharding',
           'shard_clients', 'TiledClients', 'tiled_clients', 'DPConfig', 'DPState', 'dp_aggregator', 'TreeState', 'dp_ftrl_aggregator',
           'cyclic_sampling', 'attacks', 'robust',
           'REDUCERS', 'bulyan', 'centered_clipping', 'geometric_median', 'krum', 'norm_bounded_mean', 'reducer_from_name',
           'trimmed_mean']
