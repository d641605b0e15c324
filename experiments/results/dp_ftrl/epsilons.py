"""Epsilon of DP-FedAvg (fixed-size / Poisson sampling) vs DP-FTRL (tree, cyclic) on the MNIST tasks' sizes.

300 clients, 30 per round (P = 10 rounds per tree, depth 4), delta = 1/300. Every epsilon and calibrated noise
multiplier comes from fedjax_adapters.privacy_accounting (dp-accounting's RDP accountant). The second table also
gives the variance of the noise left in the final model after ``rounds`` (server learning rate 1, units (clip/n)^2
per coordinate): ``rounds * z^2`` for DP-FedAvg (independent noise every round), ``z^2 * (number of tree nodes in
the releases that end each tree)`` for DP-FTRL (each tree leaves its last prefix sum's ``popcount(steps)`` nodes in
the model). Writes epsilons.json and epsilons.md here.
Run: PYTHONPATH=. python experiments/results/dp_ftrl/epsilons.py
"""
import json
import os

from fedjax_adapters import privacy_accounting as pa

N, M, DELTA = 300, 30, 1 / 300
SCHEMES = {'DP-FedAvg, fixed M of N': dict(sampling='fixed'), 'DP-FedAvg, Poisson q = M/N': dict(sampling='poisson'),
           'DP-FTRL, tree, cyclic': dict(sampling='cyclic', mechanism='tree')}


def model_noise_variance(z, rounds, kw):
  """Variance of the noise in the model after ``rounds`` (server lr 1), per coordinate, in units (clip / n)^2."""
  if kw.get('mechanism') != 'tree':
    return rounds * z ** 2
  full, rest = divmod(rounds, N // M)
  return z ** 2 * (full * bin(N // M).count('1') + bin(rest).count('1'))


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  out = {'num_clients': N, 'clients_per_round': M, 'delta': DELTA, 'epsilon': [], 'noise_for_epsilon': []}
  lines = ['| rounds | z | ' + ' | '.join(SCHEMES) + ' |', '|---|---|' + '---|' * len(SCHEMES)]
  for rounds in (100, 500, 1500):
    for z in (1.0, 2.0, 4.0, 8.0):
      eps = {name: pa.epsilon(z, rounds, delta=DELTA, num_clients=N, clients_per_round=M, **kw)
             for name, kw in SCHEMES.items()}
      out['epsilon'].append(dict(rounds=rounds, noise_multiplier=z, epsilon=eps))
      lines.append(f'| {rounds} | {z:g} | ' + ' | '.join(f'{e:.3g}' for e in eps.values()) + ' |')
  lines += ['', '| rounds | target epsilon | ' + ' | '.join(f'z (model noise var): {n}' for n in SCHEMES) + ' |',
            '|---|---|' + '---|' * len(SCHEMES)]
  for rounds in (100, 1500):
    for target in (1.0, 3.0, 8.0):
      zs = {name: pa.calibrate_noise(target, delta=DELTA, rounds=rounds, num_clients=N, clients_per_round=M, **kw)
            for name, kw in SCHEMES.items()}
      var = {name: model_noise_variance(zs[name], rounds, kw) for name, kw in SCHEMES.items()}
      out['noise_for_epsilon'].append(dict(rounds=rounds, epsilon=target, noise_multiplier=zs,
                                           model_noise_variance=var))
      lines.append(f'| {rounds} | {target:g} | ' + ' | '.join(f'{zs[n]:.3g} ({var[n]:.3g})' for n in SCHEMES) + ' |')
  with open(os.path.join(here, 'epsilons.json'), 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(here, 'epsilons.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
