import math

import pytest
import torch
import torch.nn as nn

from sslnb.optim import LARS, build_optimizer, set_lr, warmup_cosine


def test_warmup_cosine_known_points():
    base, final, total, warm = 0.1, 0.002, 1000, 100  # the VICReg study's shape
    assert warmup_cosine(0, total, warm, base, final) == 0.0  # warm-up starts from 0
    assert warmup_cosine(50, total, warm, base, final) == pytest.approx(0.05)
    assert warmup_cosine(100, total, warm, base, final) == pytest.approx(base)
    assert warmup_cosine(550, total, warm, base, final) == pytest.approx((base + final) / 2)
    assert warmup_cosine(1000, total, warm, base, final) == pytest.approx(final)
    assert warmup_cosine(0, total, 0, 0.06) == pytest.approx(0.06)  # thesis: no warm-up, to 0
    assert warmup_cosine(total, total, 0, 0.06) == pytest.approx(0.0, abs=1e-12)
    lrs = [warmup_cosine(s, total, warm, base, final) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after the warm-up


def lars_reference(w, b, grads, lr, wd, momentum, eta):
    """Two-parameter LARS by hand (VICReg appendix C): weights adapted and decayed, biases neither."""
    w, b = w.clone(), b.clone()
    mu_w, mu_b = torch.zeros_like(w), torch.zeros_like(b)
    for gw, gb in grads:
        dw = gw + wd * w
        dw = dw * (eta * w.norm() / dw.norm())
        mu_w = momentum * mu_w + dw
        mu_b = momentum * mu_b + gb
        w, b = w - lr * mu_w, b - lr * mu_b
    return w, b


def test_lars_matches_the_reference_update():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    grads = [(torch.randn(3, 5), torch.randn(3)) for _ in range(3)]
    opt = LARS(layer.parameters(), lr=0.5, weight_decay=1e-2, momentum=0.9, eta=0.001)
    for gw, gb in grads:
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
    w, b = lars_reference(w0, b0, grads, 0.5, 1e-2, 0.9, 0.001)
    torch.testing.assert_close(layer.weight.detach(), w)
    torch.testing.assert_close(layer.bias.detach(), b)


def test_lars_leaves_zero_weights_and_zero_grads_finite():
    p = nn.Parameter(torch.zeros(3, 3))
    p.grad = torch.zeros(3, 3)
    LARS([p], lr=0.1, weight_decay=1e-5).step()
    assert torch.isfinite(p).all()


def test_set_lr_scales_groups_with_their_own_base_lr():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [a]}, {"params": [b], "lr": 0.3}], "sgd", 0.1, 0.9, 5e-4)
    lr = set_lr(opt, 500, 1000, 0, 0.1, 0.0)
    assert lr == pytest.approx(0.05)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.15)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid: sgd, lars"):
        build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], "adam", 0.1, 0.9, 0.0)
