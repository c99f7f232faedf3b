"""The losses, written as the papers write them.

Every loss runs in float32 even under autocast (`_fp32`): softmaxes over thousands of
negatives and covariance matrices of 2048-d embeddings lose too much in bf16/fp16.
Losses that use batch statistics or negatives gather the global batch (with gradients)
when a `torch.distributed` process group is running; one process never touches it.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .distributed import several_processes


def _fp32(loss):
    """Run `loss` outside autocast with its tensor arguments cast to float32."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device = next(a for a in (*args, *kwargs.values()) if torch.is_tensor(a)).device.type
        device = "cpu" if device == "meta" else device  # meta tensors: FLOP counting (sslnb.budget)
        with torch.autocast(device_type=device, enabled=False):
            args = [a.float() if torch.is_tensor(a) else a for a in args]
            kwargs = {k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            return loss(*args, **kwargs)

    return wrapper


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own rows, summed over
    every process (each computed the loss on the whole global batch). With DDP averaging the
    parameter gradients over the N processes, the update is one process's on the global batch."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # [N * n, ...], rank order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()  # autograd's buffer is not ours to change in place
        dist.all_reduce(grad)  # every process's gradient for every row, summed
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process, keeping gradients; `x` itself in one process."""
    if several_processes():
        return _AllGather.apply(x)
    return x


def off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The off-diagonal elements of a square matrix, flattened."""
    n = c.shape[0]
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str, min_batch: int = 2) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two embeddings of the same shape [N, D], got {list(a.shape)} and {list(b.shape)}")
    if a.shape[0] < min_batch:
        raise ValueError(f"{name} uses statistics of the batch: it needs a batch of at least {min_batch} samples, got {a.shape[0]}")


@_fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalized temperature-scaled cross-entropy over 2N samples.

    Each of the 2N embeddings must pick its other view among the 2N-1 others (the 2N-2
    views of other images are the negatives). [0] SimCLR, 2020, arXiv:2002.05709 (eq. 1).
    """
    _check_pair(z1, z2, "nt_xent")
    z = F.normalize(torch.cat([gather(z1), gather(z2)]), dim=1)  # [2N, D]
    n = z.shape[0] // 2
    sim = z @ z.T / temperature  # [2N, 2N] cosine similarities / t
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positive)


@_fp32
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """MoCo's InfoNCE: each query `q` [N,D] must find its key `k` [N,D] among the queue [K,D].

    logits = [q.k, q.queue^T] / t with the positive at index 0. [0] MoCo, 2020,
    arXiv:1911.05722 (eq. 1); the thesis's eq. 2.1-2.2 with cosine similarity.
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"info_nce: expected q, k [N,D] and queue [K,D], got {list(q.shape)}, {list(k.shape)}, {list(queue.shape)}")
    q, k, queue = (F.normalize(t, dim=1) for t in (q, k, queue))
    l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    l_neg = q @ queue.T  # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@_fp32
def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Minus the mean cosine similarity of predictions `p` and targets `z` (no stop-gradient here).

    [0] SimSiam, 2021, arXiv:2011.10566 (eq. 1); BYOL's 2 - 2cos differs by an affine map.
    """
    if p.shape != z.shape:
        raise ValueError(f"negative_cosine: p and z must have the same shape, got {list(p.shape)} and {list(z.shape)}")
    return -F.cosine_similarity(p, z, dim=-1).mean()


@_fp32
def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.005) -> torch.Tensor:
    """Push the cross-correlation matrix of the two views' embeddings to the identity.

    L = sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2, with c = z1n^T z2n / N after
    standardizing each dimension over the batch. [0] Barlow Twins, 2021, arXiv:2103.03230 (eq. 1-2).
    """
    _check_pair(z1, z2, "barlow_twins")
    z1, z2 = gather(z1), gather(z2)
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)  # BatchNorm without affine
    z2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = z1.T @ z2 / n  # [D, D]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


@_fp32
def vicreg(z_a: torch.Tensor, z_b: torch.Tensor, inv_weight: float = 25.0, var_weight: float = 25.0,
           cov_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """VICReg's variance-invariance-covariance loss, as in the authors' code.

    invariance: mean squared error over all N*D elements (the paper's s(Z,Z') = 1/n sum ||z-z'||^2
    is D times this); variance: mean over dimensions of relu(1 - sqrt(Var + 1e-4)), averaged over
    the two branches (the paper sums them: twice this); covariance: sum of squared off-diagonal
    entries of the covariance (N-1) divided by D, summed over the branches. The weights
    lambda=mu=25, nu=1 were tuned for this normalization. [0] VICReg, 2022, arXiv:2105.04906 (eq. 1-6).

    Returns the unweighted terms and `loss`, their weighted sum.
    """
    _check_pair(z_a, z_b, "vicreg")
    repr_loss = F.mse_loss(z_a, z_b)  # invariance
    z_a, z_b = gather(z_a), gather(z_b)
    n, d = z_a.shape
    z_a, z_b = z_a - z_a.mean(0), z_b - z_b.mean(0)
    std_a, std_b = torch.sqrt(z_a.var(0) + 1e-4), torch.sqrt(z_b.var(0) + 1e-4)
    std_loss = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2  # variance
    cov_a, cov_b = z_a.T @ z_a / (n - 1), z_b.T @ z_b / (n - 1)  # [D, D]
    cov_loss = off_diagonal(cov_a).pow(2).sum() / d + off_diagonal(cov_b).pow(2).sum() / d  # covariance
    loss = inv_weight * repr_loss + var_weight * std_loss + cov_weight * cov_loss
    return {"loss": loss, "invariance": repr_loss, "variance": std_loss, "covariance": cov_loss}
