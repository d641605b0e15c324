"""Algorithms built from the shared pieces; none has its own round loop.

Each builder returns a :class:`~fedjax_adapters.federated.Algorithm` that exposes its model (``alg.model``, a
``ModelDef``) and adapter spec (``alg.spec``), takes a loss string or callable and an optax client optimizer, and
serves per-client predictions (``fedjax_adapters.federated.predict``).
"""
from fedjax_adapters.algorithms.common import (LOSSES, LossInputs, batch_metrics, per_example_loss,
                                               sq_distance, summarize, supervised, task_loss)
from fedjax_adapters.algorithms.ditto import ditto, ditto_loss
from fedjax_adapters.algorithms.ensemble import ensemble, ensemble_optimizer
from fedjax_adapters.algorithms.fedavg import fedavg
from fedjax_adapters.algorithms.fedalt import fedalt, rest_of_world
from fedjax_adapters.algorithms.fedsa_lora import fedsa_lora
from fedjax_adapters.algorithms.flora import flora, stacked_product
from fedjax_adapters.algorithms.floral import floral, floral_optimizer
from fedjax_adapters.algorithms.hetlora import hetlora, product_sq_norm
from fedjax_adapters.algorithms.local import local_adaptor, local_adaptor_optimizer
from fedjax_adapters.algorithms.lora_fedavg import lora_fedavg, uniform_weights
from fedjax_adapters.algorithms.lora_parts import (adapters_only, dense_factors_only, factor_pairs, is_a,
                                                   mask_factors, merge_dicts, rank_mask, select_leaves)

__all__ = ['LOSSES', 'LossInputs', 'batch_metrics', 'per_example_loss', 'sq_distance', 'summarize',
           'supervised', 'task_loss', 'ensemble', 'ensemble_optimizer', 'fedavg', 'floral', 'floral_optimizer',
           'local_adaptor', 'local_adaptor_optimizer', 'lora_fedavg', 'uniform_weights',
           # the personalized-LoRA family (docs/family.md) and the pieces it shares
           'fedsa_lora', 'ditto', 'ditto_loss', 'flora', 'stacked_product', 'hetlora', 'product_sq_norm', 'fedalt',
           'rest_of_world', 'adapters_only', 'dense_factors_only', 'factor_pairs', 'is_a', 'mask_factors',
           'merge_dicts', 'rank_mask', 'select_leaves']
