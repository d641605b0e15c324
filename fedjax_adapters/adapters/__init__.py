"""Pure-function adaptors: LoRA deltas (dense, conv, embedding, bias, norm), FLoRAL mixtures, FedDPA dual weights."""
from fedjax_adapters.adapters.dual import dual_delta, example_weight
from fedjax_adapters.adapters.lora import (EinsumForm, bias_delta, conv_delta, conv_dense_kernel, conv_padding,
                                           dense_delta, dense_dense_weight, einsum_delta, einsum_form, embed_delta,
                                           init_bias, init_conv, init_dense, init_embed, init_norm,
                                           linear_general_form, norm_delta, resolve_rank)
from fedjax_adapters.adapters.mixture import aggregation_probs, oracle_logits, router_probs
from fedjax_adapters.adapters.targeting import match_targets, path_str

__all__ = ['dual_delta', 'example_weight', 'EinsumForm', 'bias_delta', 'conv_delta', 'conv_dense_kernel',
           'conv_padding', 'dense_delta', 'dense_dense_weight', 'einsum_delta', 'einsum_form', 'embed_delta',
           'init_bias', 'init_conv', 'init_dense', 'init_embed', 'init_norm', 'linear_general_form', 'norm_delta',
           'resolve_rank', 'aggregation_probs', 'oracle_logits', 'router_probs',
           'match_targets', 'path_str']
