"""Interoperability: PEFT LoRA folders in and out, merged PyTorch state dicts, Hugging Face base checkpoints."""
from fedjax_adapters.interop.feddpa import adapter_alpha, export_feddpa, feddpa_parts
from fedjax_adapters.interop.peft import (LoraLayer, adaptor_layers, concat_loras, default_task_type,
                                          export_floral_client,
                                          export_global_adapter, export_local_adapter, export_mixed_adapter,
                                          floral_mixture, import_lora, kernel_split, load_peft_adapter,
                                          lora_layers, merged_params, merged_state_dict, peft_config,
                                          save_peft_adapter, saved_base_weights, torch_state_dict)
from fedjax_adapters.models.llama_loaders import llama_from_base_parts, save_hf_checkpoint

__all__ = ['adapter_alpha', 'export_feddpa', 'feddpa_parts', 'LoraLayer', 'adaptor_layers', 'concat_loras',
           'default_task_type',
           'export_floral_client', 'export_global_adapter', 'export_local_adapter', 'export_mixed_adapter',
           'floral_mixture', 'import_lora', 'kernel_split', 'load_peft_adapter', 'lora_layers', 'merged_params',
           'merged_state_dict', 'peft_config', 'save_peft_adapter', 'saved_base_weights', 'torch_state_dict',
           'llama_from_base_parts', 'save_hf_checkpoint']
