"""Benchmarks of the federated round (issue "Scale and speed", part 4); run ``python -m fedjax_adapters.benchmarks.run --help``."""
import os

# PyTorch's OpenMP threads spin while they wait by default. On a shared, oversubscribed CPU that made the PyTorch loop
# 8-20x slower (0.66 s vs 0.08 s per MNIST client on 2 cores at load ~10), which would flatter the JAX round. Passive
# waiting must be set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
