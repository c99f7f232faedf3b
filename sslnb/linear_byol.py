"""The linear BYOL model of thesis ch. 3 ([0] DirectPred, 2021, arXiv:2102.06810, sec. 3-4).

Online encoder W [n2, n1], linear predictor W_p [n2, n2], target W_a [n2, n1] (an EMA of W);
loss J = 1/2 E ||W_p W x1 - sg(W_a x2)||^2 (thesis eq. 3.1), where x ~ N(0, X) and each view
is x plus augmentation noise of covariance X'. With X = I, X' = sigma2 I, W_a = tau W and a
symmetric W_p that commutes with F = W X W^T, one eigenvalue p_j of W_p and s_j of F obey
(thesis sec. 3.1, [0] eq. 13-15; alpha_p = the predictor's relative lr, eta = weight decay,
beta = the EMA rate, all in continuous time t = steps x lr):

    dp/dt   = alpha_p s (tau - (1 + sigma2) p) - eta p
    ds/dt   = 2 p s (tau - (1 + sigma2) p) - 2 eta s
    s dtau/dt = beta (1 - tau) s - tau (ds/dt) / 2

and s - p^2/alpha_p decays as exp(-2 eta t) (eq. 3.3). Here: those ODEs integrated (RK4),
the reduced 1-d dynamics once s = p^2/alpha_p, and the network itself trained by SGD on
Gaussian data, with the stop-gradient and the predictor as switches. Everything runs in
seconds on a CPU. The analytic fixed points are `sslnb.analysis.linear_byol_fixed_points`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .analysis import asymmetry, commutator, eigenspace_alignment


def eigen_rhs(p, s, tau, alpha_p: float, sigma2: float, eta: float, beta: float):
    """Right-hand sides (dp/dt, ds/dt, dtau/dt) of the three eigenvalue equations (thesis sec. 3.1)."""
    gap = tau - (1.0 + sigma2) * p
    dp = alpha_p * s * gap - eta * p
    ds = 2.0 * p * s * gap - 2.0 * eta * s
    dtau = beta * (1.0 - tau) - tau * (p * gap - eta)  # (ds/dt) / (2 s), with s > 0 divided out
    return dp, ds, dtau


def _rk4(rhs, state: np.ndarray, t_end: float, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    dt = t_end / n_steps
    out = [state]
    for _ in range(n_steps):
        k1 = rhs(state)
        k2 = rhs(state + 0.5 * dt * k1)
        k3 = rhs(state + 0.5 * dt * k2)
        k4 = rhs(state + dt * k3)
        state = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(state)
    return np.linspace(0.0, t_end, n_steps + 1), np.stack(out)


def integrate_eigen(p0, s0, tau0=1.0, alpha_p: float = 1.0, sigma2: float = 0.3, eta: float = 0.0,
                    beta: float = 1.0, t_end: float = 50.0, n_steps: int = 5000) -> dict:
    """Integrate (p, s, tau) for one or several modes (arrays broadcast; each mode its own tau).

    One shared tau is exact only for one mode: W_a = tau W cannot hold for every mode at once
    when they grow at different rates, so each mode carries its own tau_j here.
    Returns: `t` [T] and `p`, `s`, `tau` [T, modes].
    """
    p0, s0, tau0 = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=float)) for v in (p0, s0, tau0)))
    m = len(p0)

    def rhs(state):
        return np.concatenate(eigen_rhs(state[:m], state[m:2 * m], state[2 * m:], alpha_p, sigma2, eta, beta))

    t, states = _rk4(rhs, np.concatenate([p0, s0, tau0]), t_end, n_steps)
    return {"t": t, "p": states[:, :m], "s": states[:, m:2 * m], "tau": states[:, 2 * m:]}


def reduced_rhs(p, tau: float, sigma2: float, eta: float):
    """dp/dt = p (tau p - (1 + sigma2) p^2 - eta): the dynamics once s = p^2 / alpha_p."""
    return p * (tau * p - (1.0 + sigma2) * p * p - eta)


def integrate_reduced(p0, tau: float = 1.0, sigma2: float = 0.3, eta: float = 0.0, t_end: float = 50.0,
                      n_steps: int = 5000) -> dict:
    """Integrate the reduced dynamics from each starting value in `p0`. Returns `t` [T], `p` [T, n]."""
    p0 = np.atleast_1d(np.asarray(p0, dtype=float))
    t, p = _rk4(lambda q: reduced_rhs(q, tau, sigma2, eta), p0, t_end, n_steps)
    return {"t": t, "p": p}


def reduced_limit(p0: float, tau: float, sigma2: float, eta: float) -> float:
    """Where the reduced dynamics started at `p0` end: the next fixed point in the direction of dp/dt
    (a 1-d flow cannot pass a fixed point), or p0 itself if it is one; -inf / inf if there is none."""
    from .analysis import linear_byol_fixed_points

    points = [p for p, _ in linear_byol_fixed_points(tau, sigma2, eta)]
    for p in points:
        if abs(p - p0) < 1e-12:
            return p
    if reduced_rhs(p0, tau, sigma2, eta) > 0:
        return min((p for p in points if p > p0), default=math.inf)
    return max((p for p in points if p < p0), default=-math.inf)


def population_H(W_p: torch.Tensor, X: torch.Tensor, X_aug: torch.Tensor, eta: float) -> torch.Tensor:
    """H with d vec(W)/dt = -H vec(W) when the target is W itself with no stop-gradient (thesis sec. 3.1):
    H = X' (x) (W_p^T W_p + I) + X (x) (W_p - I)^T (W_p - I) + eta I, vec stacking columns."""
    eye = torch.eye(W_p.shape[0], dtype=W_p.dtype)
    Wt = W_p - eye
    return (torch.kron(X_aug, W_p.T @ W_p + eye) + torch.kron(X, Wt.T @ Wt)
            + eta * torch.eye(X.shape[0] * W_p.shape[0], dtype=W_p.dtype))


def linear_byol_grads(W, W_p, W_a, x1, x2, stop_gradient: bool = True):
    """Loss 1/2 mean_b ||W_p W x1 - target||^2 and its gradients (dW, dW_p), written out.

    The target is W_a x2 without gradient (stop-gradient), or W x2 with it. Rows of x1, x2 are samples.
    """
    f1 = x1 @ W.T
    target = x2 @ (W_a if stop_gradient else W).T
    err = f1 @ W_p.T - target  # [B, n2]
    B = len(x1)
    loss = 0.5 * (err ** 2).sum(1).mean()
    dW_p = err.T @ f1 / B
    dW = W_p.T @ err.T @ x1 / B
    if not stop_gradient:
        dW = dW - err.T @ x2 / B
    return loss, dW, dW_p


def direct_predictor(F: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """DirectPred's rule in the linear model: W_p = U diag(sqrt(s_j) + eps sqrt(max s)) U^T for F = U diag(s) U^T.

    The real method also divides s by its largest value, which a cosine loss does not notice;
    the squared loss here does, so the scale is kept ([0] eq. 18; thesis eq. 3.4).
    """
    s, U = torch.linalg.eigh(0.5 * (F + F.T))
    root = s.clamp_min(0).sqrt()
    return U @ torch.diag(root + eps * root.max()) @ U.T


def simulate(n1: int = 32, n2: int = 16, sigma2: float = 0.3, lr: float = 0.01, alpha_p: float = 1.0,
             eta: float = 0.0, beta: float = 1.0, steps: int = 5000, batch_size: int = 128,
             stop_gradient: bool = True, predictor: str = "learned", direct_eps: float = 0.1,
             init_scale: float = 1.0, record_every: int = 50, seed: int = 0) -> dict:
    """Train the linear BYOL network by SGD on x ~ N(0, I), views x + N(0, sigma2 I).

    Args:
        lr: SGD step on W; W_p steps with lr * alpha_p; t = step * lr is the ODEs' time.
        eta: weight decay on W and W_p (as in the ODEs: not scaled by alpha_p).
        beta: EMA rate of the target, W_a += lr * beta * (W - W_a) (W_a = W when lr * beta >= 1).
        stop_gradient: False makes the target W x2 itself, with gradient (the thesis's H case).
        predictor: "learned" (W_p by SGD), "none" (W_p = I) or "direct" (`direct_predictor`
            of F = W W^T at every step).
    Returns: numpy arrays over the recorded steps: `t`, `loss`, `w_norm`, `s` [T, n2] (F's
    eigenvalues, decreasing), `p` [T, n2] (u_j^T W_p u_j on F's eigenvectors, same order),
    `asymmetry`, `commutator`, `alignment` (mean over modes) and `invariant` (||F - W_p W_p^T /
    alpha_p||_F, which eq. 3.3 says decays as exp(-2 eta t)), plus the final `W`, `W_p`.
    """
    if predictor not in ("learned", "none", "direct"):
        raise ValueError(f"predictor must be 'learned', 'none' or 'direct', got {predictor!r}")
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    W = torch.randn(n2, n1, generator=g, dtype=dt) * init_scale / math.sqrt(n1)
    W_p = torch.randn(n2, n2, generator=g, dtype=dt) / math.sqrt(n2)
    if predictor == "none":
        W_p = torch.eye(n2, dtype=dt)
    W_a = W.clone()
    ema = min(1.0, lr * beta)
    sigma = math.sqrt(sigma2)
    rec = {k: [] for k in ("t", "loss", "w_norm", "s", "p", "asymmetry", "commutator", "alignment", "invariant")}
    for step in range(steps + 1):
        if predictor == "direct":
            W_p = direct_predictor(W @ W.T, direct_eps)
        x = torch.randn(batch_size, n1, generator=g, dtype=dt)
        x1 = x + sigma * torch.randn(batch_size, n1, generator=g, dtype=dt)
        x2 = x + sigma * torch.randn(batch_size, n1, generator=g, dtype=dt)
        loss, dW, dW_p = linear_byol_grads(W, W_p, W_a, x1, x2, stop_gradient)
        if step % record_every == 0:
            F_ = W @ W.T  # the correlation of the representation W x for X = I
            s, U = torch.linalg.eigh(F_)
            s, U = s.flip(0), U.flip(1)
            rec["t"].append(step * lr)
            rec["loss"].append(float(loss))
            rec["w_norm"].append(float(W.norm()))
            rec["s"].append(s.numpy().copy())
            rec["p"].append(((U * (W_p @ U)).sum(0)).numpy().copy())
            rec["asymmetry"].append(asymmetry(W_p))
            rec["commutator"].append(commutator(F_, W_p))
            rec["alignment"].append(float(eigenspace_alignment(W_p, F_).mean()))
            rec["invariant"].append(float((F_ - W_p @ W_p.T / alpha_p).norm()))
        if step == steps:
            break
        W = W - lr * (dW + eta * W)
        if predictor == "learned":
            W_p = W_p - lr * (alpha_p * dW_p + eta * W_p)
        W_a = W_a + ema * (W - W_a)
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["W"], out["W_p"] = W.numpy(), W_p.numpy()
    return out
