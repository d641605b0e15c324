"""Where a compiled FLoRAL round's time and memory traffic go on the CPU (issue 22's gap to the matmul peak).

``python -m fedjax_adapters.benchmarks.round_profile --clients 32 --tile 8 --json out/profile.json``

For FLoRAL (arXiv 2410.03497) on the benchmark's MNIST MLP (``setups.mnist_mlp``) at ``M`` clients, vmapped or
tiled, it reads three things from one compiled round:

* **thread time per category**: the XLA profiler's per-thunk events (``jax.profiler``) over a few rounds, each
  thunk put in a category by the source lines XLA kept for it (the optimized HLO's stack frames: ``optim.py`` is the
  preconditioner, ``guard.py`` the screen, a ``dot`` under ``transpose(jvp)`` a backward matmul, ...);
* **bytes moved per local step**: operands plus result of every instruction in the local step's loop body (the
  forward matmul's computation), what XLA's cost model counts, i.e. the traffic if nothing stayed in cache;
* **XLA's cost analysis** of the whole round (loop bodies counted once).

No result is asserted anywhere: these are measurements for ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import re
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_adapters.benchmarks import setups
from fedjax_adapters.federated import client_data, make_round, tiled_clients

_SHAPE = re.compile(r'\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:, |$)(.*)$')
_BYTES = {'pred': 1, 'bf16': 2}
# Instructions that move no data themselves (aliases, control flow whose bodies are counted on their own).
FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'while', 'conditional', 'call',
        'after-all', 'partition-id', 'replica-id', 'iota'}


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape string (``f32[16,32,200]{2,1,0}`` or a tuple of them)."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    size = _BYTES.get(dtype, int(dtype[1:]) // 8 if dtype[1:].isdigit() else 4)
    total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _frames(text: str) -> dict[int, list[str]]:
  """stack_frame_id -> ``file:function`` of that frame and its parents (the optimized HLO's tables)."""
  tables: dict[str, dict[int, str]] = collections.defaultdict(dict)
  section = None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = line
    elif section and (m := re.match(r'^(\d+) (.*)$', line)):
      tables[section][int(m.group(1))] = m.group(2)
    elif section and not line.strip():
      section = None if section == 'StackFrames' else section
  field = lambda entry, key: int(re.search(rf'{key}=(\d+)', entry).group(1))
  locations = {i: (tables['FileNames'].get(field(e, 'file_name_id'), '').strip('"').rsplit('/', 1)[-1] + ':' +
                   tables['FunctionNames'].get(field(e, 'function_name_id'), '').strip('"'))
               for i, e in tables['FileLocations'].items()}
  out: dict[int, list[str]] = {}
  for i in tables['StackFrames']:
    chain, j = [], i
    while j in tables['StackFrames'] and len(chain) < 64:
      entry = tables['StackFrames'][j]
      chain.append(locations.get(field(entry, 'file_location_id'), ''))
      parent = field(entry, 'parent_frame_id')
      j = parent if parent != j else None
    out[i] = chain
  return out


def parse_hlo(text: str) -> dict[str, list[dict[str, Any]]]:
  """Computations of an optimized HLO module: name -> instructions (name, opcode, result bytes, operand names,
  op_name, source frames, called computations)."""
  frames = _frames(text)
  comps: dict[str, list[dict[str, Any]]] = {}
  current = None
  for line in text.splitlines():
    head = re.match(r'^(?:ENTRY )?%([\w.\-]+) .*\{$', line)
    if head:
      current = comps.setdefault(head.group(1), [])
      continue
    m = _INSTR.match(line)
    if current is None or not m:
      continue
    name, shape, opcode, operands, attrs = m.groups()
    frame = re.search(r'stack_frame_id=(\d+)', attrs)
    current.append({'name': name, 'opcode': opcode, 'bytes': shape_bytes(shape),
                    'operands': re.findall(r'%([\w.\-]+)', operands),
                    'op_name': (re.search(r'op_name="([^"]*)"', attrs) or [None, ''])[1],
                    'frames': frames.get(int(frame.group(1)), []) if frame else [],
                    'calls': re.findall(r'(?:calls|body|to_apply)=%([\w.\-]+)', attrs)})
  return comps


def has_matmul(instr: dict, comps: dict) -> bool:
  """A dot or convolution, or a fusion of one (not a loop that holds one)."""
  return instr['opcode'] in ('dot', 'convolution') or (instr['opcode'] == 'fusion' and any(
      i['opcode'] in ('dot', 'convolution') for c in instr['calls'] for i in comps.get(c, [])))


def category(instr: dict, comps: dict) -> str:
  """What an instruction does for the round, from its source frames and op name (first match wins)."""
  where = ' '.join(instr['frames'])
  rules = [('server: update screen', 'guard.py'), ('server: aggregation', 'aggregators.py'),
           ('gather/scatter of client state and data', 'client_store.py'), ('LoRA preconditioner', 'optim.py'),
           ('SGD update and masked carry', 'optax/'), ('SGD update and masked carry', '_update.py'),
           ('SGD update and masked carry', 'client_update.py:_where')]
  for name, key in rules:
    if key in where or (key == 'optax/' and any(f.startswith(('update.py', 'transform.py', '_combining.py',
                                                              '_masking.py')) for f in instr['frames'])):
      return name
  if has_matmul(instr, comps):
    return 'matmul: backward' if 'transpose(' in instr['op_name'] else 'matmul: forward'
  if 'threefry' in instr['op_name'] or 'RngStream' in where or '_uniform' in instr['op_name']:
    return 'random numbers'
  if instr['opcode'] in ('gather', 'dynamic-slice'):
    return 'batch gather and slicing'
  return 'other elementwise (loss, activations, router)'


def step_body(comps: dict) -> str:
  """The local step's loop body: the while body computation that holds the most matmul bytes."""
  bodies = {c for instrs in comps.values() for i in instrs if i['opcode'] == 'while' for c in i['calls']}
  return max(bodies, key=lambda b: sum(i['bytes'] for i in comps[b] if has_matmul(i, comps)))


def bytes_per_step(comps: dict) -> dict[str, Any]:
  """Result + operand bytes of every instruction of the local step's body, in all and per category."""
  body = step_body(comps)
  sizes = {i['name']: i['bytes'] for instrs in comps.values() for i in instrs}
  per: dict[str, int] = collections.Counter()
  moving = [i for i in comps[body] if i['opcode'] not in FREE]
  for i in moving:
    per[category(i, comps)] += i['bytes'] + sum(sizes.get(o, 0) for o in i['operands'])
  return {'body': body, 'instructions': len(moving), 'bytes': sum(per.values()), 'bytes_by_category': dict(per)}


def thread_time(rf, args: tuple, rounds: int) -> tuple[dict[str, float], float]:
  """``({thunk name: thread ns per round}, wall s per round)`` of ``rounds`` calls under the XLA profiler."""
  jax.block_until_ready(rf(*args))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(rounds):
      jax.block_until_ready(rf(*args))
    wall = (time.perf_counter() - t0) / rounds
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(f'{d}/**/*.xplane.pb', recursive=True)[0])
  per: dict[str, float] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if 'XLAEigen' in line.name:
        for ev in line.events:
          per[ev.name] += ev.duration_ns / rounds
  return dict(per), wall


def profile(clients: int, tile: int | None, rounds: int = 5) -> dict[str, Any]:
  """Thread time per category, bytes per local step and XLA's cost analysis of one FLoRAL MNIST-MLP round."""
  w = setups.mnist_mlp()
  alg = setups.jax_algorithm(w)
  data = client_data(setups.make_data(w, clients))
  state = alg.init(jax.random.key(0), clients)
  ids = jnp.arange(clients, dtype=jnp.int32)
  rf = make_round(alg, clients_per_round=clients, mapping=tiled_clients(tile) if tile else None)
  compiled = rf.compiled.lower(state, data, ids, None).compile()
  comps = parse_hlo(compiled.as_text())
  kinds = {i['name']: (category(i, comps), i['opcode']) for instrs in comps.values() for i in instrs}
  per_thunk, wall = thread_time(rf.compiled, (state, data, ids, None), rounds)
  by_cat: dict[str, float] = collections.Counter()
  for name, ns in per_thunk.items():
    if name in kinds and kinds[name][1] not in FREE:
      by_cat[kinds[name][0]] += ns / 1e6
  total = sum(by_cat.values())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  steps = clients * w.steps_per_client
  return {'clients': clients, 'tile': tile or clients, 'round_wall_s': wall, 'client_steps_per_s': steps / wall,
          'thread_ms_per_round': total, 'thread_ms_by_category': dict(by_cat),
          'share_by_category': {k: v / total for k, v in by_cat.items()},
          'bytes_per_local_step': bytes_per_step(comps),
          'xla_cost_analysis': {k: cost.get(k) for k in ('flops', 'bytes accessed')},
          'load_average': list(__import__('os').getloadavg())}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog='python -m fedjax_adapters.benchmarks.round_profile', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--clients', default='1,32', help='comma-separated cohort sizes')
  p.add_argument('--tile', default='0', help='comma-separated tiles per size (0: the full vmap)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  out = [profile(int(m), int(t) or None, args.rounds) for m in args.clients.split(',') for t in args.tile.split(',')
         if int(t) <= int(m)]
  for r in out:
    print(f"M={r['clients']} tile={r['tile']}: {r['client_steps_per_s']:.0f} client-steps/s, "
          f"{r['bytes_per_local_step']['bytes'] / 2**20:.1f} MiB per step ({r['bytes_per_local_step']['instructions']} "
          f"instructions)")
    for k, v in sorted(r['thread_ms_by_category'].items(), key=lambda kv: -kv[1]):
      print(f"   {v:8.2f} ms  {100 * r['share_by_category'][k]:5.1f} %  {k}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return {'profiles': out}


if __name__ == '__main__':
  main()
