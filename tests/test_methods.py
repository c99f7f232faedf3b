"""Methods: gradients flow where they must and stop where the method stops them; the
momentum encoders, MoCo's queue and DirectPred's predictor follow their formulas; a few
optimizer steps on `digits` lower every method's loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from sslnb import losses
from sslnb.methods import METHODS, build_method
from sslnb.optim import build_optimizer

SMALL = dict(backbone="resnet18", width=4)


def views(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["byol", "directpred"])
def test_byol_style_targets_get_no_gradient_and_online_does(name):
    m = build_method(name, proj_dims=(32, 16), **({"pred_hidden": 32} if name == "byol" else {}), **SMALL)
    m(*views())["loss"].backward()
    assert all(p.grad is None for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])
    assert all(p.grad is not None for p in [*m.backbone.parameters(), *m.projector.parameters()])
    assert all(not p.requires_grad for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])


def test_simsiam_stops_the_gradient_on_the_target_branch():
    torch.manual_seed(0)
    m = build_method("simsiam", proj_dims=(32, 32, 32), pred_hidden=8, **SMALL)
    x1, x2 = views()
    m(x1, x2)["loss"].backward()
    package = grads(m)

    def manual(detach):
        m.zero_grad()
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        (0.5 * (-F.cosine_similarity(p1, t2).mean() - F.cosine_similarity(p2, t1).mean())).backward()
        return grads(m)

    assert_same_grads(package, manual(detach=True))
    without_stop = manual(detach=False)
    assert any(not torch.allclose(package[k], without_stop[k], atol=1e-6) for k in package)


def test_moco_keys_get_no_gradient_and_the_queue_is_used_before_it_is_updated():
    torch.manual_seed(0)
    m = build_method("moco", queue_size=32, bn_splits=2, proj_dims=(16, 8), **SMALL)
    x1, x2 = views(8)
    queue_before = m.queue.clone()
    torch.manual_seed(1)
    out = m(x1, x2)
    out["loss"].backward()
    assert all(p.grad is None for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()])
    assert all(p.grad is not None for p in m.backbone.parameters())
    # the same keys (same shuffles) against the old queue give the same loss
    torch.manual_seed(1)
    k1, k2 = m.keys(x1), m.keys(x2)
    with torch.no_grad():
        q1, q2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
    expected = 0.5 * (losses.info_nce(q1, k2, queue_before, 0.1) + losses.info_nce(q2, k1, queue_before, 0.1))
    torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-4, atol=1e-5)
    # then both views' keys were enqueued at the pointer, and the pointer moved by 2 x batch
    torch.testing.assert_close(m.queue[:16], torch.cat([k1, k2]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.queue[16:], queue_before[16:])
    assert m.queue_ptr.item() == 16
    m.train(False)
    m(x1, x2)  # evaluating the loss never touches the queue
    assert m.queue_ptr.item() == 16
    m.train(True)
    m(x1, x2)
    assert m.queue_ptr.item() == 0  # wrapped around: 32 % 32


@pytest.mark.parametrize("updates", [1, 2])
def test_momentum_encoders_follow_the_ema_after_each_step(updates):
    """lightly's BYOL (the thesis's) updated its target twice per step: m = 0.9 moved it by 0.81."""
    m = build_method("byol", proj_dims=(16, 8), pred_hidden=16, ema=0.9, target_updates_per_step=updates, **SMALL)
    opt = build_optimizer(m.parameter_groups(), "sgd", 0.1, 0.9, 0.0)
    before = [p.clone() for p in m.target_backbone.parameters()]
    m(*views())["loss"].backward()
    opt.step()
    m.after_step()
    expected = [b.clone() for b in before]
    for _ in range(updates):  # lightly's two `_momentum_update(m)` calls, written out
        expected = [0.9 * e + 0.1 * o for e, o in zip(expected, m.backbone.parameters())]
    for t, e in zip(m.target_backbone.parameters(), expected):
        torch.testing.assert_close(t, e)


def test_the_thesis_byol_and_directpred_update_their_targets_twice_per_step():
    for name in ("byol", "directpred"):
        assert build_method(name, **SMALL).target_updates_per_step == 2


def test_byol_linear_predictor_is_one_square_matrix_without_bias():
    m = build_method("byol", proj_dims=(16, 8), linear_predictor=True, **SMALL)
    assert isinstance(m.predictor, torch.nn.Linear) and m.predictor.weight.shape == (8, 8) and m.predictor.bias is None
    m(*views())["loss"].backward()
    assert m.predictor.weight.grad is not None
    assert [g["name"] for g in m.parameter_groups()] == ["online", "predictor"]


def test_moco_without_projector_contrasts_backbone_features():
    m = build_method("moco", queue_size=32, bn_splits=2, use_projector=False, **SMALL)
    assert m.queue.shape == (32, m.backbone.feature_dim) and not any(True for _ in m.projector.parameters())
    m(*views())["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())


def test_moco_asymmetric_loss_is_one_direction_and_enqueues_one_view():
    torch.manual_seed(0)
    m = build_method("moco", queue_size=32, bn_splits=2, proj_dims=(16, 8), symmetric=False, **SMALL)
    x1, x2 = views(8)
    queue_before = m.queue.clone()
    torch.manual_seed(1)
    out = m(x1, x2)
    torch.manual_seed(1)
    k2 = m.keys(x2)
    with torch.no_grad():
        q1 = m.projector(m.backbone(x1))
    torch.testing.assert_close(out["loss"].detach(), losses.info_nce(q1, k2, queue_before, 0.1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.queue[:8], k2, rtol=1e-4, atol=1e-5)
    assert m.queue_ptr.item() == 8
    m.check_batch(8, {"symmetric": False, "queue_size": 24, "bn_splits": 2})  # 24 = 3 steps of 8 keys
    with pytest.raises(ValueError, match="multiple of the keys enqueued per step"):
        m.check_batch(8, {"queue_size": 24, "bn_splits": 2})  # symmetric: 16 keys per step


def test_directpred_predictor_is_set_from_F_and_passes_gradients_without_getting_any():
    torch.manual_seed(0)
    m = build_method("directpred", proj_dims=(32, 16), **SMALL)
    assert not any(n.startswith("predictor") for n, _ in m.named_parameters())  # a buffer, not a parameter
    x1, x2 = views()
    m(x1, x2)
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone(x1)), m.projector(m.backbone(x2))
    corr1 = 0.5 * (z1.T @ z1 + z2.T @ z2) / len(z1)
    torch.testing.assert_close(m.F, corr1, rtol=1e-4, atol=1e-6)  # the first batch sets F
    m.zero_grad()
    x3, x4 = views(seed=1)
    out = m(x3, x4)
    with torch.no_grad():
        z3, z4 = m.projector(m.backbone(x3)), m.projector(m.backbone(x4))
    F_expected = 0.99 * corr1 + 0.01 * 0.5 * (z3.T @ z3 + z4.T @ z4) / len(z3)
    torch.testing.assert_close(m.F, F_expected, rtol=1e-4, atol=1e-6)
    # W_p = U diag(sqrt(s / s_max) + 0.1) U^T: symmetric, eigenvalues in [0.1, 1.1], top one 1.1
    W = m.predictor_weight
    torch.testing.assert_close(W, W.T)
    s, U = torch.linalg.eigh(F_expected.double())
    p = (s.clamp(min=0) / s.max()).sqrt() + 0.1
    torch.testing.assert_close(W.double(), U @ torch.diag(p) @ U.T, rtol=1e-3, atol=1e-4)
    # gradients reach the projector through the fixed W_p
    out["loss"].backward()
    assert m.predictor_weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())


def test_directpred_guards_an_all_zero_F():
    m = build_method("directpred", proj_dims=(16, 8), **SMALL)
    m.update_predictor(torch.zeros(4, 8), torch.zeros(4, 8))
    torch.testing.assert_close(m.predictor_weight, 0.1 * torch.eye(8))  # s = 0 everywhere: p = eps


def test_byol_predictor_group_carries_its_own_lr_and_weight_decay():
    m = build_method("byol", proj_dims=(16, 8), pred_hidden=16, predictor_lr=0.5, predictor_weight_decay=0.1, **SMALL)
    opt = build_optimizer(m.parameter_groups(), "sgd", 0.06, 0.9, 5e-4)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["predictor"]["lr"] == 0.5 and by_name["predictor"]["weight_decay"] == 0.1
    assert by_name["online"]["lr"] == 0.06 and by_name["online"]["weight_decay"] == 5e-4
    n_pred = sum(p.numel() for p in by_name["predictor"]["params"])
    assert n_pred == sum(p.numel() for p in m.predictor.parameters())


def test_simsiam_predictor_group_carries_its_own_lr():
    m = build_method("simsiam", proj_dims=(16, 16, 16), pred_hidden=8, predictor_lr=0.3, **SMALL)
    opt = build_optimizer(m.parameter_groups(), "sgd", 0.03, 0.9, 5e-4)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["predictor"]["lr"] == 0.3 and by_name["online"]["lr"] == 0.03
    in_groups = [p for g in opt.param_groups for p in g["params"]]
    assert len(in_groups) == len(list(m.parameters()))  # every parameter, each once
    assert {id(p) for p in by_name["predictor"]["params"]} == {id(p) for p in m.predictor.parameters()}
    assert [g["name"] for g in build_method("simsiam", use_predictor=False, **SMALL).parameter_groups()] == ["online"]


def test_simsiam_without_predictor_is_the_collapsing_ablation():
    m = build_method("simsiam", use_predictor=False, proj_dims=(16, 16, 16), **SMALL)
    assert isinstance(m.predictor, torch.nn.Identity)
    assert m(*views())["loss"].item() >= -1


def test_unknown_method_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'simclear'; valid: simclr, moco"):
        build_method("simclear")
    with pytest.raises(ValueError, match="simclr has no option temprature; valid options:.*temperature"):
        build_method("simclr", temprature=0.1, **SMALL)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_batch_of_one_is_a_clear_error(name):
    m = build_method(name, **SMALL, **METHODS[name].quick)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="at least 2 samples"):
        m(x, x) if m.num_views == 2 else m(x, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("name", list(METHODS))
def test_a_few_steps_on_digits_lower_the_loss(name, digits):
    """Ten SGD steps on one fixed batch of augmented digits lower the loss on that batch."""
    from sslnb.augment import train_views

    torch.manual_seed(0)
    train, _ = digits
    images, labels = train.images[:64], train.labels[:64]
    x = train_views(name, *train.mean_std())(images, generator=torch.Generator().manual_seed(0))
    m = build_method(name, backbone="resnet18", width=8, **METHODS[name].quick)
    train_cfg = METHODS[name].train  # each method's own optimizer: VICReg diverges under plain SGD
    lr = train_cfg["lr"] * (64 / 256 if train_cfg["lr_batch_scaling"] else 1)
    opt = build_optimizer(m.parameter_groups(), train_cfg["optimizer"], lr, 0.9, 0.0)
    queue = m.queue.clone() if name == "moco" else None

    def loss():
        if queue is not None:
            m.queue.copy_(queue)  # MoCo: measure against the same negatives each time
        return m(*x, labels)["loss"]

    first = loss()
    for _ in range(10):
        opt.zero_grad()
        loss().backward()
        opt.step()
        m.after_step()
    with torch.no_grad():
        last = loss()
    assert math.isfinite(last.item())
    assert last.item() < first.item() - 1e-3, f"{name}: {first.item():.4f} -> {last.item():.4f}"
