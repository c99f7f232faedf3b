"""How non-contrastive methods avoid collapse (issue 11): the linear BYOL model's analysis,
the predictor's eigen-analysis, and SimSiam without its predictor collapsing on digits."""
import math
import tempfile

import numpy as np
import pytest
import torch

from sslnb import linear_byol as lb
from sslnb.analysis import (asymmetry, byol_eigen_callback, commutator, eigenspace_alignment,
                            linear_byol_fixed_points, predictor_eigen_analysis)


# -- fixed points of dp/dt = p (tau p - (1 + sigma2) p^2 - eta) ------------------------------

def test_fixed_points_without_weight_decay():
    # eta = 0: p = 0 is a double root (semi-stable, "saddle") and p = tau / (1 + sigma2) is stable
    assert linear_byol_fixed_points(1.0, 0.0, 0.0) == [(0.0, False), (1.0, True)]
    pts = linear_byol_fixed_points(0.9, 0.5, 0.0)
    assert [s for _, s in pts] == [False, True]
    assert pts[1][0] == pytest.approx(0.6)


def test_fixed_points_with_moderate_weight_decay():
    # 2 p^2 - p + 0.1 = 0  ->  p = (1 -+ sqrt(0.2)) / 4; 0 stable, the small root not, the large one stable
    pts = linear_byol_fixed_points(1.0, 1.0, 0.1)
    assert [s for _, s in pts] == [True, False, True]
    assert [p for p, _ in pts] == pytest.approx([0.0, (1 - math.sqrt(0.2)) / 4, (1 + math.sqrt(0.2)) / 4])


def test_fixed_points_with_too_much_weight_decay():
    assert linear_byol_fixed_points(1.0, 0.3, 0.25) == [(0.0, True)]  # 4 eta (1 + sigma2) = 1.3 > tau^2
    # on the boundary tau^2 = 4 eta (1 + sigma2) the two roots merge into one that is not stable
    pts = linear_byol_fixed_points(1.0, 0.0, 0.25)
    assert len(pts) == 2 and pts[0] == (0.0, True)
    assert pts[1][0] == pytest.approx(0.5) and pts[1][1] is False


def test_fixed_points_are_zeros_and_attract_trajectories():
    tau, sigma2, eta = 1.0, 0.3, 0.05
    pts = linear_byol_fixed_points(tau, sigma2, eta)
    for p, _ in pts:
        assert lb.reduced_rhs(p, tau, sigma2, eta) == pytest.approx(0.0, abs=1e-12)
    (_, _), (p_minus, _), (p_plus, _) = pts
    starts = np.array([0.5 * p_minus, 1.5 * p_minus, 0.5 * (p_minus + p_plus), 1.5 * p_plus])
    end = lb.integrate_reduced(starts, tau, sigma2, eta, t_end=400, n_steps=4000)["p"][-1]
    np.testing.assert_allclose(end, [0.0, p_plus, p_plus, p_plus], atol=1e-4)


def test_eigen_ode_invariant_eq_3_3():
    # s - p^2 / alpha_p = exp(-2 eta t) (s0 - p0^2 / alpha_p), whatever tau does
    alpha_p, eta = 2.0, 0.1
    r = lb.integrate_eigen(p0=[0.1, 0.5, -0.2], s0=[1.0, 0.3, 0.8], tau0=0.7, alpha_p=alpha_p, sigma2=0.3,
                           eta=eta, beta=0.5, t_end=20.0, n_steps=4000)
    c = r["s"][0] - r["p"][0] ** 2 / alpha_p
    expected = np.exp(-2 * eta * r["t"])[:, None] * c
    np.testing.assert_allclose(r["s"] - r["p"] ** 2 / alpha_p, expected, atol=1e-8)


def test_eigen_ode_matches_the_thesis_equations():
    p, s, tau, a, sig, eta, beta = 0.3, 0.8, 0.9, 1.5, 0.2, 0.05, 0.4
    dp, ds, dtau = lb.eigen_rhs(p, s, tau, a, sig, eta, beta)
    assert dp == pytest.approx(a * s * (tau - (1 + sig) * p) - eta * p)
    assert ds == pytest.approx(2 * p * s * (tau - (1 + sig) * p) - 2 * eta * s)
    assert s * dtau == pytest.approx(beta * (1 - tau) * s - tau * ds / 2)


# -- the matrix measurements ----------------------------------------------------------------

def test_asymmetry_closed_forms():
    assert asymmetry(torch.tensor([[2.0, 1.0], [1.0, 3.0]])) == 0.0
    assert asymmetry(torch.tensor([[0.0, 1.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    assert asymmetry(torch.tensor([[1.0, 1.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(2 / 3))
    assert asymmetry(torch.zeros(3, 3)) == 0.0


def test_eigenspace_alignment_closed_forms():
    F = torch.diag(torch.tensor([1.0, 3.0, 2.0]))  # eigenvectors in decreasing order: e2, e3, e1
    torch.testing.assert_close(eigenspace_alignment(F, F), torch.ones(3, dtype=torch.float64))
    swap = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # e1 <-> e3, e2 kept
    torch.testing.assert_close(eigenspace_alignment(swap, F), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    theta = 0.3
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    F2 = torch.diag(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(eigenspace_alignment(rot, F2), torch.full((2,), math.cos(theta), dtype=torch.float64))
    shear = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # e1 -> e1, e2 -> e1 + e2
    torch.testing.assert_close(eigenspace_alignment(shear, F2), torch.tensor([1.0, 1 / math.sqrt(2)], dtype=torch.float64))
    torch.testing.assert_close(eigenspace_alignment(torch.zeros(2, 2), F2), torch.zeros(2, dtype=torch.float64))


def test_commutator_and_predictor_eigen_analysis():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    F = U @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ U.T
    W = U @ torch.diag(torch.tensor([0.5, 0.4, 0.3, 0.2], dtype=torch.float64)) @ U.T  # commutes with F
    assert commutator(F, W) < 1e-12
    out = predictor_eigen_analysis(W, F)
    torch.testing.assert_close(out["F_eigs"], torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out["pred_eigs"], torch.tensor([0.5, 0.4, 0.3, 0.2], dtype=torch.float64))
    torch.testing.assert_close(out["pred_eigs_real"], out["pred_eigs"])
    torch.testing.assert_close(out["alignment"], torch.ones(4, dtype=torch.float64))
    assert out["asymmetry"] < 1e-12
    # [[0, 1], [1, 0]] and diag(2, 1): F W - W F = [[0, 1], [-1, 0]], norm sqrt2 / (sqrt5 sqrt2)
    assert commutator(torch.diag(torch.tensor([2.0, 1.0])), torch.tensor([[0.0, 1.0], [1.0, 0.0]])) == \
        pytest.approx(1 / math.sqrt(5))


# -- the linear network -----------------------------------------------------------------------

@pytest.mark.parametrize("stop_gradient", [True, False])
def test_linear_byol_grads_match_autograd(stop_gradient):
    g = torch.Generator().manual_seed(1)
    W, W_p, W_a = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 5), (3, 3), (3, 5)])
    x1, x2 = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    loss, dW, dW_p = lb.linear_byol_grads(W, W_p, W_a, x1, x2, stop_gradient)
    Wr, Wpr = W.clone().requires_grad_(), W_p.clone().requires_grad_()
    target = x2 @ (W_a if stop_gradient else Wr).T
    ref = 0.5 * ((x1 @ Wr.T @ Wpr.T - target) ** 2).sum(1).mean()
    gW, gWp = torch.autograd.grad(ref, [Wr, Wpr])
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(dW, gW)
    torch.testing.assert_close(dW_p, gWp)


def test_population_H_is_the_gradient_without_stop_gradient():
    # E 1/2 ||W_p W x1 - W x2||^2 + eta/2 ||W||^2 with x ~ N(0, X), views x + N(0, X'): gradient = H vec(W)
    g = torch.Generator().manual_seed(2)
    n1, n2, eta = 4, 3, 0.1
    A, B = torch.randn(n1, n1, generator=g, dtype=torch.float64), torch.randn(n1, n1, generator=g, dtype=torch.float64)
    X, Xa = A @ A.T, 0.3 * B @ B.T
    W_p = torch.randn(n2, n2, generator=g, dtype=torch.float64)
    W = torch.randn(n2, n1, generator=g, dtype=torch.float64, requires_grad=True)
    I = torch.eye(n2, dtype=torch.float64)
    M = (W_p - I) @ W
    J = 0.5 * (torch.trace(M @ X @ M.T) + torch.trace(W_p @ W @ Xa @ W.T @ W_p.T) + torch.trace(W @ Xa @ W.T)) \
        + 0.5 * eta * (W ** 2).sum()
    (grad,) = torch.autograd.grad(J, W)
    H = lb.population_H(W_p, X, Xa, eta)
    vec = W.detach().T.reshape(-1)  # column-stacking vec
    torch.testing.assert_close(H @ vec, grad.T.reshape(-1))
    assert torch.linalg.eigvalsh(H).min() >= eta - 1e-9  # PSD plus eta I: ||W|| decays to 0


def test_linear_network_collapses_without_stop_gradient_or_predictor():
    kw = dict(steps=1500, lr=0.05, eta=0.05, record_every=100, seed=0)
    both = lb.simulate(**kw)
    no_sg = lb.simulate(stop_gradient=False, **kw)
    no_pred = lb.simulate(predictor="none", **kw)
    direct = lb.simulate(predictor="direct", **kw)
    assert both["w_norm"][-1] > 0.3 * both["w_norm"][0]
    assert no_sg["w_norm"][-1] < 1e-3 * no_sg["w_norm"][0]
    assert no_pred["w_norm"][-1] < 1e-3 * no_pred["w_norm"][0]
    assert direct["w_norm"][-1] > 0.3 * direct["w_norm"][0]
    # weight decay makes the learned predictor symmetric and commute with F (eq. 3.2), and
    # drives F - W_p W_p^T / alpha_p to 0 (eq. 3.3)
    assert both["asymmetry"][-1] < 0.2 * both["asymmetry"][0]
    assert both["commutator"][-1] < 0.1 * both["commutator"][0]
    assert both["invariant"][-1] < 0.05 * both["invariant"][0]


# -- the per-epoch eigen-analysis callback ----------------------------------------------------

def _ctx(model, n=40):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    ds = SimpleNamespace(images=images)
    transform = lambda x: x.float() / 255 - 0.5  # noqa: E731
    return SimpleNamespace(epoch=1, model=model, record={}, train=ds, test=ds, transform=transform,
                           device=torch.device("cpu"))


def test_byol_eigen_callback_records_the_four_panels():
    from sslnb.methods import build_method

    torch.manual_seed(0)
    model = build_method("byol", "resnet18", width=4, proj_dims=(32, 16), linear_predictor=True)
    out = byol_eigen_callback()(_ctx(model))
    assert {"eig_F", "eig_pred", "eig_pred_real", "alignment", "asymmetry", "commutator"} <= set(out)
    assert len(out["eig_F"]) == len(out["alignment"]) == 16
    assert bool((out["eig_F"][:-1] >= out["eig_F"][1:]).all())
    assert model.training  # the mode is restored
    # DirectPred's predictor is set from F's eigenvectors: symmetric
    dp = build_method("directpred", "resnet18", width=4, proj_dims=(32, 16))
    z = torch.randn(64, 16)
    dp.update_predictor(z, z)
    assert byol_eigen_callback()(_ctx(dp))["asymmetry"] < 1e-6
    with pytest.raises(ValueError, match="linear predictor"):
        byol_eigen_callback()(_ctx(build_method("byol", "resnet18", width=4, proj_dims=(32, 16), pred_hidden=8)))


# -- SimSiam without its predictor collapses on digits (thesis sec. 4.7.1) ---------------------

def test_simsiam_without_predictor_collapses_on_digits():
    """Measured for seeds 0, 1, 2 (8x8 images, 3 epochs, lr 0.2): at the end std x sqrt(d) is
    0.005-0.024 without the predictor and 0.34-0.63 with it. One seed keeps the test to seconds."""
    from sslnb import train
    from sslnb.data import load_dataset

    data = load_dataset("digits", None, 8)
    final = {}
    for pred in (True, False):
        # every setting pinned (the thesis's crop, one lr), so retuned quick defaults cannot change the test
        cfg = train.default_config("simsiam", quick=True, image_size=8, width=8, batch_size=64, epochs=3, lr=0.2,
                                   crop_scale=(0.08, 1.0), seed=0,
                                   method_kwargs=dict(use_predictor=pred, proj_dims=(64, 64), pred_hidden=16,
                                                      predictor_lr=None))
        run = train.train(cfg, tempfile.mkdtemp(), progress=False, data=data)
        final[pred] = run.history[-1]["embedding_std"]
    assert final[False] < 0.1, final
    assert final[True] > 0.1 and final[True] > 5 * final[False], final


def test_reduced_limit_and_direct_predictor():
    # moderate weight decay: below the unstable root -> 0, above it -> the stable root; eta = 0: negatives rise to 0
    (_, _), (p_minus, _), (p_plus, _) = linear_byol_fixed_points(1.0, 0.3, 0.05)
    assert lb.reduced_limit(0.5 * p_minus, 1.0, 0.3, 0.05) == 0.0
    assert lb.reduced_limit(2 * p_minus, 1.0, 0.3, 0.05) == pytest.approx(p_plus)
    assert lb.reduced_limit(3.0, 1.0, 0.3, 0.05) == pytest.approx(p_plus)
    assert lb.reduced_limit(-0.1, 1.0, 0.3, 0.0) == 0.0
    # DirectPred in the linear model: F = diag(4, 1) -> W_p = diag(2 + 0.1 * 2, 1 + 0.1 * 2)
    W_p = lb.direct_predictor(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), eps=0.1)
    torch.testing.assert_close(W_p, torch.diag(torch.tensor([2.2, 1.2], dtype=torch.float64)))
