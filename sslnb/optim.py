"""Optimizers and the learning-rate schedule.

SGD with momentum for the thesis's methods; LARS for the VICReg study. One schedule for
both: a linear warm-up from 0, then a cosine decay to an absolute end value.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("sgd", "lars")


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose update is rescaled per layer to `eta * ||w|| / ||g + wd w||`.

    As in the VICReg and Barlow Twins code, 1-d parameters (biases, BatchNorm weights and
    biases) are excluded from both the weight decay and the layer-wise adaptation.
    [0] LARS, 2017, arXiv:1708.03888; [1] VICReg, 2022, arXiv:2105.04906 (appendix C).
    """

    # With a float16 GradScaler, GradScaler.step hands over `grad_scale` and `found_inf` as
    # attributes instead of reading found_inf on the host (one sync per step): this step
    # unscales the gradients itself and skips a step with inf/NaN gradients on the device.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad if grad_scale is None else p.grad / grad_scale
                if p.ndim > 1:  # weights: decay and adapt; biases and norm parameters: neither
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(w_norm > 0, torch.where(g_norm > 0, g["eta"] * w_norm / g_norm, one), one)
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                if found_inf is None:
                    p.add_(mu.mul_(g["momentum"]).add_(dp), alpha=-g["lr"])
                else:  # where, not if: a skipped step leaves p and mu as they were, without a sync
                    skip = found_inf > 0
                    mu.copy_(torch.where(skip, mu, mu * g["momentum"] + dp))
                    p.sub_(torch.where(skip, 0.0, g["lr"] * mu))


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float,
                    fused: bool = False):
    """An optimizer over a method's parameter groups; a group's own `lr`/`weight_decay` win.

    Each group keeps its starting lr as `base_lr`, which the schedule scales. `fused=True` (for
    float16 training) picks torch's fused SGD, which like LARS above takes GradScaler's
    `grad_scale` and `found_inf` on the device: no host sync per step.
    """
    groups = [dict(g) for g in groups if g["params"]]
    for g in groups:
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", weight_decay)
        g["base_lr"] = g["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then cosine from `base_lr` to `final_lr`.

    [0] SGDR, 2017, arXiv:1608.03983. VICReg study: 10 warm-up epochs, end at 0.002;
    thesis: no warm-up, end at 0.
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int, base_lr: float,
           final_lr: float = 0.0) -> float:
    """Set every group's lr for `step`; groups with their own base lr are scaled alike. Returns the main lr."""
    lr = warmup_cosine(step, total_steps, warmup_steps, base_lr, final_lr)
    for g in optimizer.param_groups:
        g["lr"] = lr * g["base_lr"] / base_lr if base_lr else 0.0
    return lr
