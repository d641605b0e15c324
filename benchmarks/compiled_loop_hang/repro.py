"""The compiled-loop hang, reproduced in a minute: batched LAPACK solves deadlock XLA:CPU's intra-op thread pool.

``python benchmarks/compiled_loop_hang/repro.py`` runs the minimal program (``batched_solves`` below: eight
independent ``jnp.linalg.solve`` calls on ``[120, 15, 15]`` matrices per step of a ``lax.scan``, the shapes of
FLoRAL 10 %'s preconditioner on the MNIST MLP) under a watchdog. On jax 0.10.2 it hangs within the first call;
``--inverse gauss_jordan`` (no LAPACK custom call) or jax >= 0.11.2 does not.

A hang here means: the process is alive, has printed nothing and used under 0.5 s of CPU for ``--stall`` seconds.
The watchdog then writes ``py-spy dump --native`` and ``gdb thread apply all bt`` (when those tools are installed)
to ``--out`` and kills the process group; exit status 3. A program that runs ``--minutes`` without stalling exits 0.
Any other command can be watched instead (after ``--``), e.g. the experiment runner itself::

  python benchmarks/compiled_loop_hang/repro.py --minutes 60 -- \\
    python -m fedjax_adapters.experiments.floral --task mnist_offline_rotate --methods floral_10 --compiled-loop --eval-every 500

More examples::

  python benchmarks/compiled_loop_hang/repro.py                         # hangs on jax 0.10.2 (exit 3)
  python benchmarks/compiled_loop_hang/repro.py --inverse gauss_jordan  # the fix: runs clean (exit 0)
  python benchmarks/compiled_loop_hang/repro.py --loop python           # also hangs: not specific to the scan
  python benchmarks/compiled_loop_hang/repro.py --xla-flags=--xla_cpu_multi_thread_eigen=false

README.md beside this file lists what was run and found.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

def gauss_jordan_inverse(m):
  """Inverse of symmetric positive definite ``[..., r, r]`` matrices in plain XLA ops (no LAPACK custom call).

  Gauss-Jordan elimination without pivoting, which is stable for SPD matrices such as FLoRAL's ``B^T B + eps I``.
  """
  import jax
  import jax.numpy as jnp
  r = m.shape[-1]
  aug = jnp.concatenate([m, jnp.broadcast_to(jnp.eye(r, dtype=m.dtype), m.shape)], axis=-1)  # [..., r, 2r]

  def eliminate(k, aug):
    row = jax.lax.dynamic_index_in_dim(aug, k, axis=-2, keepdims=False)  # [..., 2r]
    row = row / jax.lax.dynamic_index_in_dim(row, k, axis=-1)
    col = jax.lax.dynamic_index_in_dim(aug, k, axis=-1)  # [..., r, 1]
    aug = aug - col * row[..., None, :]
    return jax.lax.dynamic_update_index_in_dim(aug, row, k, axis=-2)

  return jax.lax.fori_loop(0, r, eliminate, aug, unroll=min(r, 16))[..., r:]


def batched_solves(args) -> None:
  """The minimal program: ``--solves`` independent batched ``[batch, size, size]`` inverses per step of a scan.

  With ``--inverse lapack`` each is ``jnp.linalg.solve`` (LAPACK getrf + trsm custom calls); on jax 0.10.2 XLA:CPU
  runs independent custom calls concurrently on its intra-op threads, and each getrf call splits its batch over
  those same threads and blocks until the pieces finish -- which never happens once every thread is blocked.
  Prints one line per call (the watchdog's progress signal).
  """
  import jax
  import jax.numpy as jnp
  jax.config.update('jax_cpu_enable_async_dispatch', args.async_dispatch)
  size, batch = args.size, args.batch
  eye = jnp.eye(size)
  inverse = (lambda m: jnp.linalg.solve(m, jnp.broadcast_to(eye, m.shape))) if args.inverse == 'lapack' \
      else gauss_jordan_inverse

  def step(ms, _):
    outs = [inverse(m) for m in ms]  # independent: the thunk executor may run them at the same time
    return [m + 1e-6 * o for m, o in zip(ms, outs)], outs[0][0, 0, 0]

  keys = jax.random.split(jax.random.key(0), args.solves)
  ms = [jax.random.normal(k, (batch, size, size)) / size + eye for k in keys]  # well conditioned, SPD-ish
  ms = [0.5 * (m + jnp.swapaxes(m, -1, -2)) + size * eye for m in ms]
  scanned = jax.jit(lambda ms: jax.lax.scan(step, ms, None, length=args.steps_per_call))
  stepped = jax.jit(lambda ms: step(ms, None))
  print(f'jax {jax.__version__}, inverse={args.inverse}, loop={args.loop}, {args.solves} solves of '
        f'[{batch}, {size}, {size}], async_dispatch={args.async_dispatch}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  t0 = time.time()
  for call in range(10 ** 9):
    if args.loop == 'compiled':
      ms, out = scanned(ms)
    else:
      for _ in range(args.steps_per_call):
        ms, out = stepped(ms)
    jax.block_until_ready(out)
    print(f'{time.time() - t0:8.1f} s: {(call + 1) * args.steps_per_call} steps', flush=True)


def cpu_seconds(pid: int) -> float | None:
  """User + system CPU time of process ``pid`` (threads included), or None once it is gone."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def dump_stacks(pid: int, out: str) -> list[str]:
  """Native stacks of every thread of ``pid`` with py-spy and gdb (whichever is installed); returns the files."""
  written = []
  for tool, cmd in (('py-spy', ['py-spy', 'dump', '--native', '--pid', str(pid)]),
                    ('gdb', ['gdb', '-p', str(pid), '-batch', '-ex', 'thread apply all bt 40'])):
    if shutil.which(tool) is None:
      continue
    path = os.path.join(out, f'stacks_{pid}.{tool}.txt')
    with open(path, 'w') as f:
      subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300, check=False)
    written.append(path)
  return written


def watch(cmd: list[str], *, minutes: float, stall: float, out: str, env: dict) -> int:
  """Runs ``cmd``; 3 if it stalls (stacks dumped), its exit status if it ends, 0 if it runs ``minutes`` cleanly."""
  os.makedirs(out, exist_ok=True)
  log_path = os.path.join(out, 'program.log')
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
  start = last_change = time.time()
  last_cpu, last_size = 0.0, 0
  try:
    while proc.poll() is None and time.time() - start < 60 * minutes:
      time.sleep(2)
      used, size = cpu_seconds(proc.pid), os.path.getsize(log_path)
      if used is None:
        break
      if used - last_cpu > 0.5 or size != last_size:
        last_cpu, last_size, last_change = used, size, time.time()
      elif time.time() - last_change > stall:
        print(f'HANG: no output and {used - last_cpu:.2f} s CPU for {stall:.0f} s, '
              f'{time.time() - start:.0f} s into the run; stacks: {dump_stacks(proc.pid, out)}', flush=True)
        return 3
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  if proc.returncode not in (0, -signal.SIGKILL):
    print(f'program failed with status {proc.returncode}; see {log_path}', flush=True)
    return proc.returncode
  print(f'no hang in {(time.time() - start) / 60:.1f} min; last line: {_last_line(log_path)!r}', flush=True)
  return 0


def _last_line(path: str) -> str:
  with open(path) as f:
    lines = f.read().strip().splitlines()
  return lines[-1] if lines else ''


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--minutes', type=float, default=3.0, help='how long to run without a stall before giving up')
  p.add_argument('--stall', type=float, default=30.0, help='seconds without output or CPU use that count as a hang')
  p.add_argument('--out', default='out/compiled_loop_hang', help='log and stack dumps go here')
  p.add_argument('--inverse', choices=('lapack', 'gauss_jordan'), default='lapack')
  p.add_argument('--loop', choices=('compiled', 'python'), default='compiled', help='one scan per call, or a '
                 'dispatch per step')
  p.add_argument('--solves', type=int, default=8, help='independent batched inverses per step')
  p.add_argument('--size', type=int, default=15, help='matrix size r')
  p.add_argument('--batch', type=int, default=120, help='matrices per batched inverse')
  p.add_argument('--steps-per-call', type=int, default=200)
  p.add_argument('--async-dispatch', action='store_true', help="keep JAX's asynchronous CPU dispatch")
  p.add_argument('--xla-flags', default=None, help='XLA_FLAGS for the program, e.g. --xla_cpu_multi_thread_eigen=false')
  p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('command', nargs='*', help='a command to watch instead of the built-in program (after --)')
  args = p.parse_args(argv)
  if min(args.minutes, args.stall) <= 0 or min(args.solves, args.size, args.batch, args.steps_per_call) < 1:
    p.error('--minutes and --stall must be positive; --solves, --size, --batch and --steps-per-call >= 1')
  if args.child:
    batched_solves(args)
    return 0
  env = dict(os.environ)
  if args.xla_flags is not None:
    env['XLA_FLAGS'] = args.xla_flags
  child = [sys.executable, os.path.abspath(__file__), '--child'] + [
      f'--{name.replace("_", "-")}={getattr(args, name)}'
      for name in ('inverse', 'loop', 'solves', 'size', 'batch', 'steps_per_call')] + (
      ['--async-dispatch'] if args.async_dispatch else [])
  return watch(args.command or child, minutes=args.minutes, stall=args.stall, out=args.out, env=env)


if __name__ == '__main__':
  sys.exit(main())
