"""Flax NNX integration: adapter wrappers, model surgery and the split/merge bridge to pure pytrees."""
from fedjax_adapters.nn.adapt import PARTS, AdapterSpec, ModelDef, adapt, adaptable_paths, find_context, split_model
from fedjax_adapters.nn.layers import (AdaptedConv, AdaptedEmbed, AdaptedLinear, AdaptedNorm, AdapterContext,
                                       AdapterRuntime, GlobalAdapter, LocalAdapter, RouterLogits)

__all__ = ['PARTS', 'AdapterSpec', 'ModelDef', 'adapt', 'adaptable_paths', 'find_context', 'split_model',
           'AdaptedConv', 'AdaptedEmbed', 'AdaptedLinear', 'AdaptedNorm', 'AdapterContext', 'AdapterRuntime',
           'GlobalAdapter', 'LocalAdapter', 'RouterLogits']
