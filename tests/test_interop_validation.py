"""Every file of a PEFT adapter folder is checked on load: one ValueError naming the file and the layer or tensor.

The folders are written here with safetensors directly (no torch), in PEFT's naming, then broken one way at a time:
non-float or non-finite factors, a 1-D ``lora_A``, a missing ``lora_B``, ranks that disagree, factors whose shapes
do not fit the model's layer, a truncated safetensors file, a bad ``adapter_config.json``, DoRA.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import save_file as save_jax
from safetensors.numpy import save_file

from fedjax_adapters import interop

LAYER = 'base_model.model.layers.0'
TREE = {'layers': {'0': {'global_a': np.zeros((2, 4, 2), np.float32), 'global_b': np.zeros((2, 2, 3), np.float32)}}}


def _rng(seed=0):
  return np.random.default_rng(seed)


def _good_tensors():
  return {f'{LAYER}.lora_A.weight': _rng(1).standard_normal((2, 4)).astype(np.float32),
          f'{LAYER}.lora_B.weight': _rng(2).standard_normal((3, 2)).astype(np.float32)}


def _folder(tmp_path, tensors=None, config=None, name='lora'):
  folder = tmp_path / name
  folder.mkdir()
  config = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['layers.0']} if config is None else config
  (folder / 'adapter_config.json').write_text(config if isinstance(config, str) else json.dumps(config))
  save_file(_good_tensors() if tensors is None else tensors, str(folder / 'adapter_model.safetensors'))
  return folder


def test_a_good_folder_imports_exactly(tmp_path):
  tree = interop.import_lora(_folder(tmp_path), TREE, alpha=2.0, index=1)
  t = _good_tensors()
  np.testing.assert_allclose(tree['layers']['0']['global_a'][1], t[f'{LAYER}.lora_A.weight'].T)
  # PEFT's scaling 4 / 2 = 2 against ours 2 / 2 = 1: B carries the factor 2.
  np.testing.assert_allclose(tree['layers']['0']['global_b'][1], 2.0 * t[f'{LAYER}.lora_B.weight'].T, rtol=1e-6)
  np.testing.assert_array_equal(tree['layers']['0']['global_a'][0], 0.0)


def test_bfloat16_factors_are_read(tmp_path):
  folder = tmp_path / 'bf16'
  folder.mkdir()
  (folder / 'adapter_config.json').write_text(json.dumps({'peft_type': 'LORA', 'r': 2, 'lora_alpha': 2}))
  save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in _good_tensors().items()},
           str(folder / 'adapter_model.safetensors'))
  _, layers = interop.load_peft_adapter(folder)
  expected = np.asarray(jnp.asarray(_good_tensors()[f'{LAYER}.lora_A.weight'], jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(layers['layers.0'].a, expected)


BAD_TENSORS = {
    'int32': ({'lora_A.weight': np.ones((2, 4), np.int32)}, r"'base_model.model.layers.0.lora_A.weight' has dtype "
                                                            r"int32; LoRA factors and weights must be floating"),
    'nan': ({'lora_B.weight': np.full((3, 2), np.nan, np.float32)}, r"lora_B.weight' holds 6 non-finite"),
    'one_dim_a': ({'lora_A.weight': np.ones((4,), np.float32)}, r"lora_A.weight' has shape \[4\]; lora_A.weight must "
                                                               r"have 2 dimension"),
    'ranks_differ': ({'lora_A.weight': np.ones((3, 4), np.float32)}, r"layer 'layers.0' has lora_A.weight of shape "
                                                                    r"\[3, 4\] \(rank 3\) but lora_B.weight .*rank 2"),
    'bias_shape': ({'lora_B.bias': np.ones((5,), np.float32)}, r"layer 'layers.0' has lora_B.bias of shape \[5\]"),
    'not_a_factor': ({'lora_C.weight': np.ones((2,), np.float32)}, r"tensor '.*lora_C.weight' is not a LoRA factor"),
    'dora': ({'lora_magnitude_vector': np.ones((3,), np.float32)}, r"layer 'layers.0' is a DoRA layer"),
}


@pytest.mark.parametrize('case', list(BAD_TENSORS))
def test_bad_tensors_are_named(tmp_path, case):
  change, message = BAD_TENSORS[case]
  folder = _folder(tmp_path, {**_good_tensors(), **{f'{LAYER}.{k}': v for k, v in change.items()}})
  with pytest.raises(ValueError, match=r'adapter_model\.safetensors: .*' + message):
    interop.import_lora(folder, TREE, alpha=2.0)


def test_a_missing_lora_b_is_named(tmp_path):
  folder = _folder(tmp_path, {f'{LAYER}.lora_A.weight': np.ones((2, 4), np.float32)})
  with pytest.raises(ValueError, match=r"layer 'layers.0' has lora_A.weight but no lora_B.weight"):
    interop.load_peft_adapter(folder)


def test_factors_that_do_not_fit_the_model_layer_are_named(tmp_path):
  folder = _folder(tmp_path, {f'{LAYER}.lora_A.weight': np.ones((2, 5), np.float32),
                              f'{LAYER}.lora_B.weight': np.ones((3, 2), np.float32)})
  with pytest.raises(ValueError, match=r"layer 'layers.0' has LoRA factors A \[2, 5\], B \[3, 2\] \(d_in 5, d_out 3\), "
                                       r"but the model's layer maps d_in=4 to d_out=3"):
    interop.import_lora(folder, TREE, alpha=2.0)
  with pytest.raises(ValueError, match=r"index=2 is not an adaptor of layer 'layers.0', which holds 2 global"):
    interop.import_lora(_folder(tmp_path, name='ok'), TREE, alpha=2.0, index=2)


def test_a_truncated_safetensors_file_is_named(tmp_path):
  folder = _folder(tmp_path)
  weights = folder / 'adapter_model.safetensors'
  weights.write_bytes(weights.read_bytes()[:-7])
  with pytest.raises(ValueError, match=r'adapter_model.safetensors is not a complete safetensors file'):
    interop.load_peft_adapter(folder)


BAD_CONFIGS = {
    'not_json': ('{"peft_type": "LORA", "r": ', r'adapter_config.json is not valid JSON'),
    'a_list': ('[1, 2]', r'adapter_config.json must hold a JSON object, found a list'),
    'prefix_tuning': ({'peft_type': 'PREFIX_TUNING'}, r"adapter_config.json: peft_type is 'PREFIX_TUNING'"),
    'negative_r': ({'peft_type': 'LORA', 'r': -2}, r"adapter_config.json: 'r' must be a positive integer, got -2"),
    'text_alpha': ({'peft_type': 'LORA', 'lora_alpha': 'big'}, r"'lora_alpha' must be a finite positive number"),
    'bad_pattern': ({'peft_type': 'LORA', 'rank_pattern': {'q': 1.5}}, r"rank_pattern\['q'\] must be a positive int"),
    'fan_in_fan_out': ({'peft_type': 'LORA', 'fan_in_fan_out': True}, r'fan_in_fan_out=True'),
    'r_disagrees': ({'peft_type': 'LORA', 'r': 8}, r"layer 'layers.0' has LoRA factors of rank 2 but "
                                                   r"adapter_config.json gives it r=8"),
}


@pytest.mark.parametrize('case', list(BAD_CONFIGS))
def test_bad_adapter_configs_are_named(tmp_path, case):
  config, message = BAD_CONFIGS[case]
  with pytest.raises(ValueError, match=message):
    interop.import_lora(_folder(tmp_path, config=config), TREE, alpha=2.0)


def test_use_dora_without_magnitudes_names_the_layers(tmp_path):
  folder = _folder(tmp_path, config={'peft_type': 'LORA', 'use_dora': True})
  with pytest.raises(ValueError, match=r"use_dora=True \(DoRA\) .* its layers \['layers.0'\]"):
    interop.load_peft_adapter(folder)
