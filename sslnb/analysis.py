"""Looking inside representations: collapse statistics (more analyses join as notebooks need them)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """How collapsed are embeddings `z` [N, D]?

    `std`: per-dimension std of the L2-normalized embeddings times sqrt(D): about 1 when they
    spread over the sphere, 0 when collapsed to a point [0] SimSiam, 2021, arXiv:2011.10566 (sec. 4.1).
    `rank`: effective rank exp(H(sigma / sum sigma)) of the singular values: the number of
    dimensions actually used [1] RankMe, 2023, arXiv:2210.02885.
    """
    z = z.float().cpu() if z.device.type == "mps" else z.float()  # MPS has no SVD
    d = z.shape[1]
    std = F.normalize(z, dim=1).std(0).mean() * math.sqrt(d)
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    rank = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return {"std": float(std), "rank": float(rank)}
