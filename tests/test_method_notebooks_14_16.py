"""What notebooks 14 (Barlow Twins) and 15 (DirectPred) teach, checked on the package.

DirectPred's predictor is set from the eigendecomposition of the moving average F, never learned:
after every optimizer step (SGD with momentum and weight decay, as the loop builds it) and in the
checkpoint the loop writes, W_p equals U diag(sqrt(s / s_max) + eps) U^T of the *current* F, and the
optimizer neither holds nor changes it. [0] DirectPred, 2021, arXiv:2102.06810; thesis sec. 3.2, 4.6.5.
"""
import torch

from sslnb import losses
from sslnb.methods import build_method
from sslnb.optim import build_optimizer
from sslnb.runs import Run
from sslnb.train import default_config, train

SMALL = dict(backbone="resnet18", width=4)


def reference_predictor(F, eps=0.1):
    """U diag(p) U^T with p = sqrt(max(s, 0) / max(s)) + eps, in float64 (the paper's eq., thesis eq. 3.4)."""
    s, U = torch.linalg.eigh(F.double())
    p = (s.clamp(min=0) / s.max()).sqrt() + eps
    return U @ torch.diag(p) @ U.T


def test_directpred_predictor_is_U_diag_p_Ut_of_the_current_F_after_every_optimizer_step():
    torch.manual_seed(0)
    m = build_method("directpred", proj_dims=(32, 16), **SMALL).train()
    opt = build_optimizer(m.parameter_groups(), "sgd", 0.06, 0.9, 5e-4)  # weight decay on: it must not reach W_p
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m.predictor_weight) not in held and id(m.F) not in held
    assert "predictor_weight" not in dict(m.named_parameters()) and "predictor_weight" in dict(m.named_buffers())
    g = torch.Generator().manual_seed(0)
    F_ref = None
    for step in range(4):
        x1, x2 = torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)
        with torch.no_grad():
            z1, z2 = (m.projector(m.backbone(x)).double() for x in (x1, x2))
        out = m(x1, x2)
        corr = 0.5 * (z1.T @ z1 + z2.T @ z2) / len(z1)
        F_ref = corr if F_ref is None else 0.99 * F_ref + 0.01 * corr
        torch.testing.assert_close(m.F.double(), F_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(m.predictor_weight.double(), reference_predictor(m.F), rtol=1e-3, atol=1e-4)
        W, F = m.predictor_weight.clone(), m.F.clone()
        opt.zero_grad()
        out["loss"].backward()
        assert m.predictor_weight.grad is None
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
        opt.step()
        m.after_step()
        assert torch.equal(m.predictor_weight, W) and torch.equal(m.F, F)  # the step touches neither buffer
    # after several steps F is a moving average over all of them, far from the last batch's correlation
    assert (m.F.double() - corr).norm() > 1e-3 * corr.norm()


def test_directpred_checkpoint_holds_the_predictor_of_its_F(tmp_path):
    cfg = default_config("directpred", quick=True, epochs=1, image_size=8, width=4, batch_size=128,
                         method_kwargs={"proj_dims": (32, 16)})
    run = train(cfg, tmp_path / "dp", device="cpu", progress=False)
    state = Run(run.path).load()["model"]
    assert "predictor.weight" not in state and "predictor_weight" in state
    F, W = state["F"], state["predictor_weight"]
    torch.testing.assert_close(F, F.T)
    torch.testing.assert_close(W.double(), reference_predictor(F), rtol=1e-3, atol=1e-4)
    s = torch.linalg.eigvalsh(W.double())
    assert s.min() > 0.1 - 1e-4 and abs(s.max() - 1.1) < 1e-3  # p in [eps, 1 + eps], the top one 1 + eps


def test_barlow_twins_loss_of_unrelated_views_is_about_D_plus_lambda_D_squared_over_N():
    """Notebook 14's formula for the first loss: E L = D (1 + 1/N) + lambda D (D - 1) / N."""
    g = torch.Generator().manual_seed(0)
    for n, d in [(64, 512), (256, 256)]:
        z = torch.randn(2, n, d, generator=g)
        expected = d * (1 + 1 / n) + 0.005 * d * (d - 1) / n
        assert abs(float(losses.barlow_twins(z[0], z[1])) / expected - 1) < 0.03


def test_barlow_twins_first_sgd_step_at_lr_006_inflates_the_first_convolution():
    """Notebook 14, section 4: with a 2048-d head the first SGD step at lr 0.06 multiplies the norm of the
    first convolution's weights by far more than one at the cited script's lr 1e-3."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(32, 3, 16, 16, generator=g), torch.randn(32, 3, 16, 16, generator=g)

    def growth(lr):
        torch.manual_seed(0)
        m = build_method("barlow_twins", **SMALL)
        opt = build_optimizer(m.parameter_groups(), "sgd", lr, 0.9, 5e-4)
        before = m.backbone.conv1.weight.detach().norm()
        m(x1, x2)["loss"].backward()
        opt.step()
        return float(m.backbone.conv1.weight.detach().norm() / before)

    big, small = growth(0.06), growth(1e-3)
    assert big > 5 and big > 5 * small


def test_barlow_twins_loss_of_identical_views_is_bounded_below_when_the_batch_is_smaller_than_D():
    """Notebook 14: with N < D the cross-correlation has rank <= N - 1, so even identical views leave
    a loss of at least lambda (D^2 / (N - 1) - D) (Cauchy-Schwarz on its eigenvalues, trace D)."""
    z = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    n, d = z.shape
    bound = 0.005 * (d * d / (n - 1) - d)
    loss = float(losses.barlow_twins(z, z.clone()))
    assert bound * (1 - 1e-3) <= loss < 1.5 * bound
