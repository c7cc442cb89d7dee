"""Muon for the transformer blocks' matrices, AdamW for everything else, as one torch optimizer.

DeepSpeed takes a single optimizer, and the lr schedule and checkpoints see one set of param groups
and one state dict. Muon's step is torch.optim.Muon's (Nesterov momentum, the quintic Newton-Schulz
iteration in bf16, decoupled weight decay, the update scaled to AdamW's size), but it
orthogonalizes every matrix of a shape in one batched iteration, so a step launches one iteration
per shape rather than one per matrix. tests/trainer/test_muon.py checks it against torch.optim.Muon.
"""
from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic
NS_STEPS = 5


def adamw_groups(params, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on matrices, none on vectors (norms, biases)."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], list[dict]]:
    """(Muon's groups, AdamW's groups). Muon takes the blocks' hidden matrices only: the embeddings
    and the head map to and from characters, not between hidden features, and are better served by
    Adam (as in the Muon paper and modded-nanogpt). The attention's kv projection stacks the keys'
    and the values' matrices, each orthogonalized on its own, as separate projections would be
    ("parts": 2)."""
    kv = {id(block.attn.kv.weight) for block in getattr(model, "blocks", [])}
    matrices, fused, rest = [], [], []
    for name, p in model.named_parameters():
        if p.dim() < 2 or not name.startswith("blocks."):
            rest.append(p)
        else:
            (fused if id(p) in kv else matrices).append(p)
    return ([{"params": matrices, "weight_decay": weight_decay},
             {"params": fused, "weight_decay": weight_decay, "parts": 2}],
            adamw_groups(rest, weight_decay))


def orthogonalize(x: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz: x (..., m, n) mapped to about U V^T of its SVD (singular values into ~[0.7, 1.2]),
    in bf16, each matrix of the batch on its own."""
    a, b, c = NS_COEFFICIENTS
    wide = x.size(-2) <= x.size(-1)
    y = x.bfloat16() if wide else x.bfloat16().mT  # iterate on the m x m Gram side, the smaller one
    y = y / y.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y if wide else y.mT


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalized by Newton-Schulz, for 2-D parameters."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float = 0.0, parts: int = 1):
        """parts: each parameter of a group stacks this many matrices along its rows."""
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, parts=parts))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            grads = [p.grad for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"])  # Nesterov
            # each matrix (a fused parameter's parts apart), batched with the others of its shape
            parts = [u.unflatten(0, (group["parts"], -1)) for u in updates]
            by_shape: dict[torch.Size, list[int]] = {}
            for i, u in enumerate(parts):
                by_shape.setdefault(u.shape[1:], []).append(i)
            for shape, indices in by_shape.items():
                ortho = orthogonalize(torch.cat([parts[i] for i in indices])).split(group["parts"])
                scale = 0.2 * math.sqrt(max(shape))  # torch's match_rms_adamw: AdamW's update size
                for i, update in zip(indices, ortho):
                    params[i].mul_(1 - group["lr"] * group["weight_decay"])
                    params[i].add_(update.flatten(0, 1).to(params[i].dtype), alpha=-group["lr"] * scale)


class MuonAdamW(torch.optim.Optimizer):
    """param_groups: Muon's groups (marked "muon": True) then AdamW's; state: both halves'."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], lr: float, momentum: float,
                 betas: tuple[float, float], eps: float, fused: bool | None):
        self.muon = Muon(muon_groups, lr=lr, momentum=momentum)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused)
        for group in self.muon.param_groups:
            group["muon"] = True
        for group in self.adamw.param_groups:
            group["muon"] = False
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._share()

    def _share(self) -> None:
        """Point both halves at this optimizer's groups and state (again after load_state_dict, which
        replaces them)."""
        self.muon.param_groups = [g for g in self.param_groups if g["muon"]]
        self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW takes no closure")
        self.muon.step()
        self.adamw.step()
