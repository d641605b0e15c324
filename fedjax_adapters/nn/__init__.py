"""Flax NNX integration: adapter wrappers, model surgery and the split/merge bridge to pure pytrees."""
from fedjax_adapters.nn.adapt import (PARTS, AdapterSpec, ModelDef, adapt, adaptable_paths, adapted_paths, find_context,
                                      split_model)
from fedjax_adapters.nn.layers import (AdaptedConv, AdaptedEinsum, AdaptedEmbed, AdaptedLayer, AdaptedLinear,
                                       AdaptedLinearGeneral, AdaptedNorm, AdapterContext, AdapterRuntime, GlobalAdapter,
                                       LocalAdapter, RouterLogits)

__all__ = ['PARTS', 'AdapterSpec', 'ModelDef', 'adapt', 'adaptable_paths', 'adapted_paths', 'find_context',
           'split_model', 'AdaptedConv', 'AdaptedEinsum', 'AdaptedEmbed', 'AdaptedLayer', 'AdaptedLinear',
           'AdaptedLinearGeneral', 'AdaptedNorm', 'AdapterContext', 'AdapterRuntime', 'GlobalAdapter', 'LocalAdapter',
           'RouterLogits']
