"""The federated engine: client store, sampling, client updates, aggregators and the compiled round."""
from fedjax_adapters.federated.aggregators import Aggregator, fedavg, per_adaptor_weights, router_weighted, weighted_mean
from fedjax_adapters.federated.client_store import check_client_ids, gather, scatter
from fedjax_adapters.federated.client_update import (Batch, ClientData, ClientOutput, batch_indices,
                                                     make_client_update, masked_mean)
from fedjax_adapters.federated.round import Algorithm, ServerState, client_data, evaluate, make_round
from fedjax_adapters.federated.sampling import clients_per_round, sample_clients

__all__ = ['Aggregator', 'fedavg', 'per_adaptor_weights', 'router_weighted', 'weighted_mean', 'check_client_ids',
           'gather', 'scatter', 'Batch', 'ClientData', 'ClientOutput', 'batch_indices', 'make_client_update',
           'masked_mean', 'Algorithm', 'ServerState', 'client_data', 'evaluate', 'make_round', 'clients_per_round',
           'sample_clients']
