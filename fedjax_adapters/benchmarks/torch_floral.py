"""A PyTorch per-client FLoRAL loop, the baseline the vmapped JAX round is timed against.

It does what the public FLoRAL code's client loop does (``floral/floral/{base,linear,conv}.py``,
``floral/training/precondlora_trainer.py``), written from a description of it, not from its code:

* C LoRA adaptors are attached to every ``nn.Linear`` / ``nn.Conv2d`` of an ordinary PyTorch model by **forward
  hooks**: ``y = m(x) + alpha * sum_c max(pi_c, floor) * lora_c(x)`` (alpha = 1, no 1/r scaling). A linear adaptor is
  ``B_c(A_c(x))`` (``A``: no bias; ``B``: bias iff the base layer has one); a conv adaptor is FLoRAL's balanced
  factorization, a ``1 x k_w`` conv to ``r`` channels then a ``k_h x 1`` conv back.
* A router of C logits per client: ``pi = max(softmax(w + noise_std * U[0, 1)), floor)`` drawn once per batch.
* Clients run **one after another**; each loads the global state and its own router, builds a **fresh SGD
  optimizer** (param groups base / lora / router), trains one epoch over its data without shuffling, and applies
  the **LoRA gradient preconditioning** between ``backward()`` and ``step()``.
* The server averages the base by ``p(k)`` and each adaptor by ``p(k|c)`` (server SGD with lr 1, i.e. the average).

Weights can be loaded from the JAX library's parts (:func:`load_from_jax`), so the two implementations can be run
from the same initial point and compared (``tests/test_benchmarks.py``).

Layouts: Flax kernels are ``[in, out]`` / ``[kh, kw, in, out]`` (NHWC); PyTorch's are ``[out, in]`` /
``[out, in, kh, kw]`` (NCHW). The CIFAR CNN here flattens its feature map in NHWC order (``permute`` before
``flatten``) so that ``fc1`` holds the same matrix as the Flax model's.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------------------
# Base models (the same architectures as fedjax_adapters.models.{mlp,cnn})
# --------------------------------------------------------------------------------------------------------------

class TorchMLP(nn.Module):
  """784-200-10 ReLU MLP on flattened inputs (FLoRAL's MNIST model)."""

  def __init__(self, in_features: int = 784, hidden: Sequence[int] = (200,), out_features: int = 10):
    super().__init__()
    widths = (in_features, *hidden, out_features)
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def forward(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = F.relu(layer(x))
    return self.layers[-1](x)


class TorchCifarCNN(nn.Module):
  """conv5x5(32)-pool2-conv3x3(64)-pool3-FC(flat->64)-FC(64->10), NCHW inputs, NHWC flatten order."""

  def __init__(self, in_features: int = 3, num_classes: int = 10, image_size: int = 32):
    super().__init__()
    side = ((image_size - 4) // 2 - 2) // 3
    self.conv1 = nn.Conv2d(in_features, 32, 5)
    self.conv2 = nn.Conv2d(32, 64, 3)
    self.fc1 = nn.Linear(side * side * 64, 64)
    self.fc2 = nn.Linear(64, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 3, 3)
    x = x.permute(0, 2, 3, 1).flatten(1)
    x = F.relu(self.fc1(x))
    return self.fc2(x)


# --------------------------------------------------------------------------------------------------------------
# LoRA adaptors, the router and the hooks
# --------------------------------------------------------------------------------------------------------------

def resolve_rank(rank, d_in: int, d_out: int) -> int:
  """FLoRAL's rank rule: a float budget rho < 1 gives ``max(1, int(rho * d_in * d_out / (d_in + d_out)))``."""
  if isinstance(rank, float) and rank < 1:
    return max(1, int(rank * d_in * d_out / (d_in + d_out)))
  return int(rank)


class LinearLoRA(nn.Module):
  def __init__(self, base: nn.Linear, rank: int):
    super().__init__()
    self.A = nn.Linear(base.in_features, rank, bias=False)
    self.B = nn.Linear(rank, base.out_features, bias=base.bias is not None)
    bound = math.sqrt(6.0 / base.in_features)       # FLoRAL's uniform_in init of A; B = 0; bias keeps torch default
    nn.init.uniform_(self.A.weight, -bound, bound)
    nn.init.zeros_(self.B.weight)

  def forward(self, x):
    return self.B(self.A(x))


class ConvLoRA(nn.Module):
  """FLoRAL's ``balanced_2d`` conv LoRA: ``1 x k_w`` (C_in -> r) then ``k_h x 1`` (r -> C_out)."""

  def __init__(self, base: nn.Conv2d, rank: int):
    super().__init__()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = base.kernel_size, base.stride, base.padding, base.dilation
    self.A = nn.Conv2d(base.in_channels, rank, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                       bias=False)
    self.B = nn.Conv2d(rank, base.out_channels, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1),
                       bias=base.bias is not None)
    bound = math.sqrt(6.0 / (base.in_channels * kw))
    nn.init.uniform_(self.A.weight, -bound, bound)
    nn.init.zeros_(self.B.weight)

  def forward(self, x):
    return self.B(self.A(x))


class FloralTorch(nn.Module):
  """A base model with C adaptors hooked onto every Linear/Conv2d, and a router.

  ``self.pi`` holds the mixture of the current forward pass; the hooks read it.
  """

  def __init__(self, base: nn.Module, num_adaptors: int, rank=0.01, *, floor: float = 0.01, alpha: float = 1.0,
               noise_std: float = 1.0, temperature: float = 1.0):
    super().__init__()
    self.base = base
    self.num_adaptors, self.floor, self.alpha = num_adaptors, floor, alpha
    self.noise_std, self.temperature = noise_std, temperature
    self.router = nn.Parameter(torch.zeros(num_adaptors))
    self.loras = nn.ModuleDict()
    self.pi = None
    self._hooks = []
    for name, m in base.named_modules():
      if isinstance(m, nn.Linear):
        r = resolve_rank(rank, m.in_features, m.out_features)
        lst = nn.ModuleList(LinearLoRA(m, r) for _ in range(num_adaptors))
      elif isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        r = resolve_rank(rank, m.in_channels * kw, m.out_channels * kh)
        lst = nn.ModuleList(ConvLoRA(m, r) for _ in range(num_adaptors))
      else:
        continue
      key = name.replace('.', '_')
      self.loras[key] = lst
      self._hooks.append(m.register_forward_hook(self._make_hook(lst)))

  def _make_hook(self, lst: nn.ModuleList):
    def hook(module, inputs, output):
      x = inputs[0]
      pi = self.pi
      for c, lora in enumerate(lst):
        output = output + self.alpha * pi[c] * lora(x)
      return output
    return hook

  def mixture(self, train: bool):
    z = self.router
    if train and self.noise_std:
      z = z + self.noise_std * torch.rand_like(z)
    pi = torch.softmax(z / self.temperature, 0)
    return torch.clamp(pi, min=self.floor) if self.floor is not None else pi

  def forward(self, x, train: bool = True):
    self.pi = self.mixture(train)
    return self.base(x)

  def lora_params(self):
    return list(self.loras.parameters())

  def base_params(self):
    return list(self.base.parameters())


@torch.no_grad()
def precondition_lora_grads(model: FloralTorch, eps: float = 1e-5) -> None:
  """FLoRAL's scaled-GD preconditioning, in place on ``.grad``; biases and the router are left alone.

  Linear: ``g_A <- (B^T B + eps I)^-1 g_A`` and ``g_B <- g_B (A A^T + eps I)^-1`` (``linalg.solve``).
  Conv: ``g_A /= ||sum_m B[m,a,..] B[m,b,..]||_F + eps`` and ``g_B /= ||sum_m A[a,m,..] A[b,m,..]||_F + eps``.
  """
  for lst in model.loras.values():
    for lora in lst:
      a, b = lora.A.weight, lora.B.weight
      if a.grad is None or b.grad is None:
        continue
      if isinstance(lora, LinearLoRA):                 # a: [r, d_in], b: [d_out, r]
        eye = eps * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        a.grad.copy_(torch.linalg.solve(b.T @ b + eye, a.grad))
        b.grad.copy_(torch.linalg.solve(a @ a.T + eye, b.grad.T).T)
      else:                                            # a: [r, C_in, 1, kw], b: [C_out, r, kh, 1]
        pa = torch.einsum('mahw,mbhw->ab', b, b)
        pb = torch.einsum('amhw,bmhw->ab', a, a)
        a.grad.div_(torch.linalg.matrix_norm(pa) + eps)
        b.grad.div_(torch.linalg.matrix_norm(pb) + eps)


# --------------------------------------------------------------------------------------------------------------
# Loading the JAX library's parts (same initial weights in both implementations)
# --------------------------------------------------------------------------------------------------------------

def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def _linear_kernel(k):        # Flax [in, out] -> torch [out, in]
  return _t(k).T.contiguous()


def _conv_kernel(k):          # Flax HWIO -> torch OIHW
  return _t(k).permute(3, 2, 0, 1).contiguous()


def _layer_modules(model: FloralTorch):
  """(jax path, torch base module, torch LoRA list) for each adapted layer, in a fixed order."""
  out = []
  for name, m in model.base.named_modules():
    if isinstance(m, (nn.Linear, nn.Conv2d)):
      parts = name.split('.')
      path = tuple(int(p) if p.isdigit() else p for p in parts)
      out.append((path, m, model.loras[name.replace('.', '_')]))
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def global_state_from_jax(model: FloralTorch, global_params: dict) -> dict[str, torch.Tensor]:
  """The library's FLoRAL global params (``{'base', 'adapters', ...}``) as a state dict of ``model``."""
  sd = {}
  for path, m, lst in _layer_modules(model):
    name = '.'.join(str(p) for p in path)
    base = _get(global_params['base'], path)['base']
    ada = _get(global_params['adapters'], path)
    conv = isinstance(m, nn.Conv2d)
    sd[f'base.{name}.weight'] = (_conv_kernel if conv else _linear_kernel)(base['kernel'])
    if m.bias is not None:
      sd[f'base.{name}.bias'] = _t(base['bias'])
    key = name.replace('.', '_')
    for c in range(len(lst)):
      if conv:    # a: [C, 1, kw, Cin, r] -> [r, Cin, 1, kw];  b: [C, kh, 1, r, Cout] -> [Cout, r, kh, 1]
        sd[f'loras.{key}.{c}.A.weight'] = _t(ada['global_a'][c]).permute(3, 2, 0, 1).contiguous()
        sd[f'loras.{key}.{c}.B.weight'] = _t(ada['global_b'][c]).permute(3, 2, 0, 1).contiguous()
      else:       # a: [C, d_in, r] -> [r, d_in];  b: [C, r, d_out] -> [d_out, r]
        sd[f'loras.{key}.{c}.A.weight'] = _t(ada['global_a'][c]).T.contiguous()
        sd[f'loras.{key}.{c}.B.weight'] = _t(ada['global_b'][c]).T.contiguous()
      if 'global_bias' in ada:
        sd[f'loras.{key}.{c}.B.bias'] = _t(ada['global_bias'][c])
  return sd


def global_state(model: FloralTorch) -> dict[str, torch.Tensor]:
  """The federated part of the model (everything but the router), detached copies."""
  return {k: v.detach().clone() for k, v in model.state_dict().items() if k != 'router'}


# --------------------------------------------------------------------------------------------------------------
# The client loop and the round
# --------------------------------------------------------------------------------------------------------------

class TorchFloralRound:
  """One FLoRAL round in PyTorch: clients trained one after another, then router-weighted aggregation.

  Args:
    model: the hooked model (its current weights are the initial global state).
    x: ``[K, N, ...]`` client inputs (already in the model's layout), ``y: [K, N]`` int labels, ``counts: [K]``.
    batch_size, lr, lora_lr, router_lr: local SGD (one epoch, no shuffling).
    precondition, eps: FLoRAL's LoRA gradient preconditioning.
    device: where to train.
  """

  def __init__(self, model: FloralTorch, x, y, counts, *, batch_size: int, lr: float, lora_lr: float | None = None,
               router_lr: float = 0.1, precondition: bool = True, eps: float = 1e-5, device: str = 'cpu'):
    self.device = torch.device(device)
    self.model = model.to(self.device)
    self.x = torch.as_tensor(np.asarray(x)).to(self.device)
    self.y = torch.as_tensor(np.asarray(y)).long().to(self.device)
    self.counts = [int(c) for c in np.asarray(counts)]
    self.batch_size, self.lr = batch_size, lr
    self.lora_lr = lr if lora_lr is None else lora_lr
    self.router_lr, self.precondition, self.eps = router_lr, precondition, eps
    self.routers = torch.zeros(len(self.counts), model.num_adaptors, device=self.device)
    self.global_sd = global_state(self.model)

  def load(self, global_sd: dict, router: torch.Tensor):
    with torch.no_grad():
      for k, v in self.model.state_dict().items():
        v.copy_(router if k == 'router' else global_sd[k])

  def client_update(self, k: int) -> tuple[dict, torch.Tensor, float, int]:
    """Client ``k``: one epoch of SGD from the current global state. Returns (state, router logits, loss sum, n)."""
    model = self.model
    self.load(self.global_sd, self.routers[k])
    opt = torch.optim.SGD([{'params': model.base_params(), 'lr': self.lr},
                           {'params': model.lora_params(), 'lr': self.lora_lr},
                           {'params': [model.router], 'lr': self.router_lr}], lr=self.lr)
    n = self.counts[k]
    loss_sum = 0.0
    model.train()
    for s in range(0, n, self.batch_size):
      xb, yb = self.x[k, s:s + self.batch_size][: n - s], self.y[k, s:s + self.batch_size][: n - s]
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(xb, train=True), yb)
      loss.backward()
      if self.precondition:
        precondition_lora_grads(model, self.eps)
      opt.step()
      loss_sum += loss.detach() * yb.shape[0]
    return global_state(model), model.router.detach().clone(), float(loss_sum), n

  @torch.no_grad()
  def aggregate(self, states, routers, counts):
    """Base by ``p(k)``; each adaptor c (A, B and bias separately) by ``p(k|c)``; server SGD lr 1."""
    p_k = torch.tensor(counts, dtype=torch.float32, device=self.device)
    p_k = p_k / p_k.sum()
    q = p_k[:, None] * torch.softmax(torch.stack(routers), -1)          # [M, C]
    p_kc = q / q.sum(0, keepdim=True)
    new = {}
    for name in self.global_sd:
      stacked = torch.stack([s[name] for s in states])
      if name.startswith('loras.'):
        c = int(name.split('.')[2])
        w = p_kc[:, c]
      else:
        w = p_k
      new[name] = torch.tensordot(w, stacked, dims=1)
    self.global_sd = new

  def run_round(self, client_ids: Sequence[int]) -> dict[str, Any]:
    states, routers, losses, counts = [], [], [], []
    for k in client_ids:
      sd, router, loss, n = self.client_update(int(k))
      states.append(sd)
      routers.append(router)
      losses.append(loss)
      counts.append(n)
      self.routers[int(k)] = router
    self.aggregate(states, routers, counts)
    if self.device.type == 'cuda':
      torch.cuda.synchronize()
    return {'loss': sum(losses), 'count': sum(counts)}

  @torch.no_grad()
  def evaluate(self, k: int, state: dict | None = None, router: torch.Tensor | None = None) -> float:
    """Sum of client ``k``'s losses on its own rows (eval mode: no router noise)."""
    self.load(self.global_sd if state is None else state, self.routers[k] if router is None else router)
    n = self.counts[k]
    return float(F.cross_entropy(self.model(self.x[k, :n], train=False), self.y[k, :n], reduction='sum'))


class PlainTorchRound(TorchFloralRound):
  """The per-client loop as a practitioner writes it: the same hooked model and data, no preconditioner.

  One model object serves every client: it loads the global weights and the client's router, trains one epoch with
  a single ``torch.optim.SGD(model.parameters(), lr)`` (one learning rate, the router's too) and reads the loss with
  ``.item()`` after each step. Router noise, the aggregation and everything else are :class:`TorchFloralRound`'s.
  The runner times it at torch's default thread count (``torch.get_num_threads()`` at import).
  """

  def client_update(self, k: int) -> tuple[dict, torch.Tensor, float, int]:
    model, n = self.model, self.counts[k]
    self.load(self.global_sd, self.routers[k])
    opt = torch.optim.SGD(model.parameters(), lr=self.lr)
    model.train()
    loss_sum = 0.0
    for s in range(0, n, self.batch_size):
      xb, yb = self.x[k, s:min(s + self.batch_size, n)], self.y[k, s:min(s + self.batch_size, n)]
      opt.zero_grad()
      loss = F.cross_entropy(model(xb), yb)
      loss.backward()
      opt.step()
      loss_sum += loss.item() * len(yb)
    return global_state(model), model.router.detach().clone(), loss_sum, n


def step_flops(loop: TorchFloralRound, k: int = 0) -> int:
  """Matmul/conv FLOPs of one full-batch training step (forward and backward) of client ``k``, counted by
  ``torch.utils.flop_counter``; the model's weights are reloaded from the global state afterwards."""
  from torch.utils.flop_counter import FlopCounterMode
  loop.load(loop.global_sd, loop.routers[k])
  xb, yb = loop.x[k, :loop.batch_size], loop.y[k, :loop.batch_size]
  with FlopCounterMode(display=False) as counter:
    F.cross_entropy(loop.model(xb), yb).backward()
  loop.model.zero_grad(set_to_none=True)
  return int(counter.get_total_flops())


DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice, read before the runner sets any


def set_threads(num_threads: int) -> dict[str, Any]:
  """Uses ``num_threads`` intra-op threads (the same core count JAX's CPU backend uses); returns what is in force."""
  torch.set_num_threads(max(1, int(num_threads)))
  return {'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads(),
          'torch_interop_threads': torch.get_num_interop_threads(), 'torch_default_threads': DEFAULT_THREADS,
          'torch_cuda': torch.cuda.is_available(),
          'torch_device_name': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}
