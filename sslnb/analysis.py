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


# -- how non-contrastive methods avoid collapse (thesis ch. 3 and sec. 4.7; issue 11) ----------
# [0] DirectPred, 2021, arXiv:2102.06810 (the linear BYOL model); [1] thesis 003_4473, ch. 3.
# The linear model's simulation lives in `sslnb.linear_byol`; these are its analytic results and
# the measurements a real run shares with it.

def linear_byol_fixed_points(tau: float, sigma2: float, weight_decay: float) -> list[tuple[float, bool]]:
    """Fixed points of the reduced dynamics dp/dt = p (tau p - (1 + sigma2) p^2 - eta), sorted by p.

    Once weight decay has made s_j = p_j^2 / alpha_p (eq. 3.3), one eigenvalue p of the predictor
    follows this 1-d equation [0] (sec. 4). Its roots are p = 0 and the roots of
    (1 + sigma2) p^2 - tau p + eta = 0. A point is stable when the slope of dp/dt there is
    negative; a double root (eta = 0 makes p = 0 one: the thesis's "saddle") is not stable.

    Returns: a list of `(p, stable)` pairs; p = 0 is always included.
    """
    if weight_decay < 0 or sigma2 < 0:
        raise ValueError(f"weight_decay and sigma2 must be >= 0, got {weight_decay}, {sigma2}")
    a = 1.0 + sigma2
    roots = {0.0}
    disc = tau * tau - 4.0 * a * weight_decay
    if disc >= 0:
        root = math.sqrt(disc)
        roots |= {(tau - root) / (2 * a), (tau + root) / (2 * a)}

    def slope(p):  # d/dp of p (tau p - a p^2 - eta)
        return 2 * tau * p - 3 * a * p * p - weight_decay

    scale = max(1.0, abs(tau), weight_decay)
    points = []
    for p in sorted(roots):
        if points and abs(p - points[-1][0]) <= 1e-12 * scale:
            continue  # a double root listed once
        points.append((p, slope(p) < -1e-12 * scale))  # a zero slope is a double root: not stable
    return points


def asymmetry(W) -> float:
    """||W - W^T||_F / ||W||_F (thesis eq. 4.1): 0 for a symmetric matrix, 2 for an antisymmetric one."""
    W = torch.as_tensor(W, dtype=torch.float64)
    norm = torch.linalg.matrix_norm(W)
    return float(torch.linalg.matrix_norm(W - W.T) / norm) if norm > 0 else 0.0


def eigenspace_alignment(W_p, F) -> torch.Tensor:
    """How well the predictor `W_p` keeps the eigenvectors of the symmetric correlation `F`.

    For each eigenvector u_j of F, sorted by decreasing eigenvalue: |u_j^T W_p u_j| / ||W_p u_j||,
    the cosine between u_j and its image W_p u_j (thesis fig. 4.8, third panel; [0] fig. 4):
    1 when W_p maps u_j onto a multiple of itself (their eigenspaces align), 0 when it maps it
    orthogonally. A u_j that W_p sends to zero gets 0.

    Returns: a float64 tensor [D].
    """
    W_p = torch.as_tensor(W_p, dtype=torch.float64)
    F_ = torch.as_tensor(F, dtype=torch.float64)
    _, U = torch.linalg.eigh(0.5 * (F_ + F_.T))  # ascending
    U = U.flip(1)
    WU = W_p @ U
    num = (U * WU).sum(0).abs()
    den = WU.norm(dim=0)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def commutator(F, W_p) -> float:
    """||F W_p - W_p F||_F / (||F||_F ||W_p||_F): 0 when F and W_p commute (share eigenvectors; eq. 3.2)."""
    F_ = torch.as_tensor(F, dtype=torch.float64)
    W_p = torch.as_tensor(W_p, dtype=torch.float64)
    den = torch.linalg.matrix_norm(F_) * torch.linalg.matrix_norm(W_p)
    return float(torch.linalg.matrix_norm(F_ @ W_p - W_p @ F_) / den) if den > 0 else 0.0


def predictor_eigen_analysis(W_p, F) -> dict:
    """Thesis fig. 4.8's four measurements of a linear predictor `W_p` [D, D] (maps z to W_p z)
    against the correlation `F` [D, D] of the online projections.

    Returns `F_eigs` (F's eigenvalues, decreasing), `pred_eigs` (eigenvalues of the predictor's
    symmetric part (W_p + W_p^T)/2, decreasing: real by construction), `pred_eigs_real` (real
    parts of W_p's own eigenvalues, decreasing), `alignment` (`eigenspace_alignment`, in F's
    order), `asymmetry` and `commutator`.
    """
    W_p = torch.as_tensor(W_p, dtype=torch.float64)
    F_ = torch.as_tensor(F, dtype=torch.float64)
    F_ = 0.5 * (F_ + F_.T)
    return {
        "F_eigs": torch.linalg.eigvalsh(F_).flip(0),
        "pred_eigs": torch.linalg.eigvalsh(0.5 * (W_p + W_p.T)).flip(0),
        "pred_eigs_real": torch.linalg.eigvals(W_p).real.sort(descending=True).values,
        "alignment": eigenspace_alignment(W_p, F_),
        "asymmetry": asymmetry(W_p),
        "commutator": commutator(F_, W_p),
    }


def byol_eigen_callback(split: str = "test", max_images: int = 10_000):
    """A per-epoch callback (`sslnb.train.train(callbacks=[...])`) recording BYOL's predictor
    against the correlation of its online projections (thesis sec. 4.7.2, fig. 4.8).

    F = mean of z z^T over the online projections z of `split`'s images (uncentered, like
    DirectPred's F; eval mode, the loop's evaluation transform, at most `max_images`). The
    method needs a linear predictor (`linear_predictor=True`, or DirectPred's set one).
    The history gains `eig_F`, `eig_pred` (symmetric part), `eig_pred_real`, `alignment`,
    `asymmetry` and `commutator`.
    """
    from .evaluate import extract_features

    def callback(ctx) -> dict:
        model = ctx.model
        weight = getattr(model, "predictor_weight", None)  # DirectPred: W_p is a buffer (z -> z W_p, symmetric)
        if weight is None:
            if not isinstance(getattr(model, "predictor", None), torch.nn.Linear):
                raise ValueError("byol_eigen_callback needs a linear predictor: build BYOL with linear_predictor=True")
            weight = model.predictor.weight  # nn.Linear: z -> W z
        images = getattr(ctx, split).images[:max_images]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            z = model.project(extract_features(model.backbone, images, ctx.transform)).double()
        model.train(was_training)
        F_ = z.T @ z / len(z)
        out = predictor_eigen_analysis(weight.detach().double().cpu(), F_.cpu())
        return {"eig_F": out["F_eigs"], "eig_pred": out["pred_eigs"], "eig_pred_real": out["pred_eigs_real"],
                "alignment": out["alignment"], "asymmetry": out["asymmetry"], "commutator": out["commutator"]}

    return callback


# -- t-SNE of a run's representations (VICReg study fig. 4; issue 10) ---------------------------
# [2] van der Maaten & Hinton, 2008, "Visualizing Data using t-SNE", JMLR 9; [3] VICReg study
# 000_643f, sec. 3.2.2: t-SNE of the expander's embeddings of CIFAR-10's test set in 2-D and 3-D.

def load_method(run, device="cpu", untrained: bool = False) -> torch.nn.Module:
    """The whole method of a run (backbone and projector/expander) in eval mode: the weights of
    its last checkpoint, or with `untrained=True` the same architecture freshly initialised with
    the run's seed (what the network looked like at epoch 0)."""
    from .methods import build_method
    from .runs import RunError

    cfg = run.config
    if cfg is None:
        raise RunError(f"{run.path} is not a run directory (no config.json)")
    ckpt = None if untrained else run.load(map_location="cpu")
    if not untrained and ckpt is None:
        raise RunError(f"{run.path} has no checkpoint.pt to take the trained weights from")
    head = (ckpt or {}).get("model", {}).get("classifier.weight")  # only the supervised baseline has one
    num_classes = len(head) if head is not None else (100 if cfg["dataset"] == "cifar100" else 10)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        model = build_method(cfg["method"], cfg["backbone"], cfg["width"], num_classes, **cfg["method_kwargs"])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


@torch.no_grad()
def representations(model, images: torch.Tensor, transform, kind: str = "embedding",
                    batch_size: int = 1024) -> torch.Tensor:
    """Features [N, D] of uint8 images: the backbone's "representation" (512-d for a ResNet-34)
    or the projector/expander's "embedding" (2048-d for VICReg), in eval mode."""
    from .evaluate import extract_features

    if kind not in ("representation", "embedding"):
        raise ValueError(f"kind must be 'representation' (backbone) or 'embedding' (expander), got {kind!r}")
    h = extract_features(model.backbone, images, transform, batch_size)
    if kind == "representation":
        return h
    was_training = model.training
    model.eval()
    z = torch.cat([model.project(h[i:i + batch_size]).float() for i in range(0, len(h), batch_size)])
    model.train(was_training)
    return z


def tsne(features, dims: int = 2, perplexity: float = 30.0, init: str = "pca", seed: int = 0,
         max_iter: int | None = None):
    """t-SNE (scikit-learn) of features [N, D] to `dims` (2 or 3) dimensions: a numpy array [N, dims].

    The perplexity (about the number of neighbours each point keeps close) is capped below N/3
    as scikit-learn requires; "pca" initialisation keeps the global layout more stable across
    seeds than "random". `max_iter` None keeps scikit-learn's default (1000); its first 250
    iterations exaggerate the attractions (early exaggeration), so a map needs a few hundred more
    (measured on digits: 250 leaves classes mixed, 500 is as good as 1000). [2]
    """
    from sklearn.manifold import TSNE

    x = torch.as_tensor(features).detach().float().cpu().numpy()
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if len(x) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(x)}")
    perplexity = min(float(perplexity), (len(x) - 1) / 3.0 - 1e-6)
    kwargs = {} if max_iter is None else {"max_iter": max_iter}
    return TSNE(n_components=dims, perplexity=perplexity, init=init, learning_rate="auto", random_state=seed,
                **kwargs).fit_transform(x)


# -- dimensional collapse: the spectrum of the embeddings (notebook 17, beyond the thesis) -------
# [4] Jing, Vincent, LeCun, Tian, "Understanding Dimensional Collapse in Contrastive
# Self-supervised Learning", ICLR 2022, arXiv:2110.09348 (fig. 1: sorted log singular values).

def covariance_spectrum(z: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Singular values of the covariance matrix of embeddings `z` [N, D] (its eigenvalues: it is
    symmetric positive semi-definite), largest first, as float64 on the CPU.

    Each value is the variance along one principal direction; a dimensionally collapsed
    representation uses only some directions, and the rest fall by orders of magnitude (plot
    on a log scale) [4]. `normalize` divides by the largest, so methods whose embeddings have
    different scales and sizes can share a plot.
    """
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"z must be [N, D] with N >= 2, got {list(z.shape)}")
    z = z.detach().double().cpu()
    z = z - z.mean(0)
    n, d = z.shape
    if n < d:  # C = zᵀz/(n-1) has rank < n: its values are z's squared singular values, then zeros
        s = torch.linalg.svdvals(z) ** 2 / (n - 1)
        s = torch.cat([s, s.new_zeros(d - len(s))])
    else:  # symmetric: eigenvalues, far cheaper than an SVD of the d x d matrix
        s = torch.linalg.eigvalsh(z.T @ z / (n - 1)).flip(0).clamp_min(0)
    return s / s[0].clamp_min(1e-300) if normalize else s


def neighbour_agreement(points, labels) -> float:
    """Share (%) of points whose nearest other point has the same label: how well a 2-D or 3-D
    map (a t-SNE) keeps the classes together, a number to read beside the picture."""
    x = torch.as_tensor(points).float()
    y = torch.as_tensor(labels).cpu()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float((y[d.argmin(1)] == y).float().mean() * 100)


def closest_class_pairs(features, labels, classes, top: int = 3) -> list[tuple[str, str, float]]:
    """The `top` pairs of classes whose mean L2-normalized features have the highest cosine
    similarity, as (class, class, cosine). The study saw trucks and automobiles close in its
    t-SNE (sec. 3.2.2); distances between clusters in a t-SNE map are not reliable, so we
    measure them in the feature space."""
    z = F.normalize(torch.as_tensor(features).float().cpu(), dim=1)
    y = torch.as_tensor(labels).cpu()
    present = [c for c in range(len(classes)) if (y == c).any()]
    means = F.normalize(torch.stack([z[y == c].mean(0) for c in present]), dim=1)
    sim = means @ means.T
    pairs = [(classes[present[i]], classes[present[j]], float(sim[i, j]))
             for i in range(len(present)) for j in range(i + 1, len(present))]
    return sorted(pairs, key=lambda p: -p[2])[:top]


def directions_for_variance(spectrum, share: float = 0.99) -> int:
    """How many of the largest values of a covariance spectrum hold `share` of its total
    (the variance of the embeddings): a compact reading of a spectrum plot."""
    s = torch.as_tensor(spectrum, dtype=torch.float64)
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    return min(int((s.cumsum(0) / s.sum() < share).sum()) + 1, len(s))
