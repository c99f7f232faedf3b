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


@pytest.mark.parametrize("name", ["lars", "sgd"])
def test_float16_loss_scaling_stays_on_the_device(name, monkeypatch):
    """With GradScaler (float16 training: GPUs without bfloat16, e.g. Colab's T4) LARS and the
    fused SGD unscale the gradients and skip an inf step themselves: the same updates as
    without scaling, no host read per step, and an inf step leaves weights and momentum alone."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    models = [nn.Linear(5, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer([{"params": m.parameters()}], name, 0.5, 0.9, 1e-2, fused=True) for m in models]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    reads = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or original(t))
    for _ in range(3):
        for m, opt, scaled in zip(models, opts, [False, True]):
            loss = (m(x) - y).pow(2).mean()
            opt.zero_grad()
            if scaled:  # a power-of-two scale: the unscaled gradients are exactly the same
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    assert reads == []
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    # an overflowing step: skipped on the device, and the scaler halves its scale
    before = [p.detach().clone() for p in models[1].parameters()]
    momentum = [opts[1].state[p]["momentum_buffer" if name == "sgd" else "mu"].clone() for p in models[1].parameters()]
    opts[1].zero_grad()
    scaler.scale((models[1](x) - y).pow(2).mean() * float("inf")).backward()
    scaler.step(opts[1])
    scaler.update()
    for p, w, mu in zip(models[1].parameters(), before, momentum):
        assert torch.equal(p.detach(), w)
        assert torch.equal(opts[1].state[p]["momentum_buffer" if name == "sgd" else "mu"], mu)
    assert scaler.get_scale() == 2.0**9


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
