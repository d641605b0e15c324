"""Greedy generation in plain PyTorch from an exported base folder and PEFT adapter folders.

  python examples/peft_generate.py --base RUN/peft/base --adapter RUN/peft/global --prompt "Name a color."
  python examples/peft_generate.py --base RUN/peft/base --adapter RUN/peft/global RUN/peft/local/client_0 \\
      --weights 0.4 0.6 --prompt "Name a color."

Several adapters with --weights become one adapter equal to the weighted sum of their deltas (PEFT's
add_weighted_adapter with combination_type='cat', which is exact): a FedDPA global + local pair at a fixed weight.
Needs torch, transformers and peft only (fedjax_adapters.interop.export_feddpa writes the folders).
"""
import argparse
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(base, adapters=(), weights=None, dtype=torch.float32):
  """The base model with the adapters applied; with ``weights``, their weighted combination as one adapter."""
  model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
  if not adapters:
    return model.eval()
  if weights is None and len(adapters) > 1:
    raise ValueError(f'{len(adapters)} adapters need --weights (one per adapter).')
  if weights is not None and len(weights) != len(adapters):
    raise ValueError(f'--weights has {len(weights)} values for {len(adapters)} adapters.')
  names = [f'adapter_{i}' for i in range(len(adapters))]
  model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
  for name, folder in zip(names[1:], adapters[1:]):
    model.load_adapter(str(folder), adapter_name=name)
  if weights is not None:
    model.add_weighted_adapter(names, [float(w) for w in weights], 'weighted', combination_type='cat')
    model.set_adapter('weighted')
  return model.eval()


def greedy(model, tokenizer, prompts, max_new_tokens):
  """Greedy continuations of the prompts (left padded): token ids [B, <= max_new_tokens], EOS then padding."""
  tokenizer.padding_side = 'left'
  batch = tokenizer(list(prompts), return_tensors='pt', padding=True, return_token_type_ids=False)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)
  return out[:, batch['input_ids'].shape[1]:]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--base', required=True, help='Hugging Face folder (config.json, model.safetensors, tokenizer)')
  p.add_argument('--adapter', nargs='*', default=[], help='PEFT LoRA folders')
  p.add_argument('--weights', nargs='*', type=float, default=None, help='one weight per adapter')
  p.add_argument('--prompt', nargs='+', required=True)
  p.add_argument('--max-new-tokens', type=int, default=32)
  args = p.parse_args(argv)
  try:
    model = load(args.base, args.adapter, args.weights)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  tokenizer = AutoTokenizer.from_pretrained(args.base)
  for prompt, ids in zip(args.prompt, greedy(model, tokenizer, args.prompt, args.max_new_tokens)):
    print(f'{prompt!r} -> {tokenizer.decode(ids, skip_special_tokens=True)!r}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
