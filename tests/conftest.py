import os
import sys

# Run from a checkout without installing: make the project root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite's time goes to XLA compiling many small programs on 2 cores, not to running them. XLA's cheaper compile
# settings cut that CPU time by about a fifth; they change how programs are optimized, not what they compute, and
# every tolerance stays as written. Set before JAX starts its backend; an XLA_FLAGS from the caller is kept.
_FAST_COMPILE = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')
_flags = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = ' '.join([_flags] + [f for f in _FAST_COMPILE if f.split('=')[0] not in _flags]).strip()
