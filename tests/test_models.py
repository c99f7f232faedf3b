import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslnb.models import SplitBatchNorm2d, ema_update, mlp, resnet


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,dim,params", [
    # the widely used CIFAR ResNets (kuangliu/pytorch-cifar) have 11,173,962 / 21,282,122 / 23,520,842
    # parameters with a 10-class linear layer; without it (dim*10 + 10 fewer):
    ("resnet18", 512, 11_173_962 - 5_130),
    ("resnet34", 512, 21_282_122 - 5_130),
    ("resnet50", 2048, 23_520_842 - 20_490),
])
def test_cifar_resnets_have_the_standard_size(name, dim, params):
    net = resnet(name)
    assert net.feature_dim == dim
    assert n_params(net) == params


def test_cifar_stem_keeps_resolution_until_the_last_stage():
    net = resnet("resnet18", width=8)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    seen = {}
    net.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    out = net(torch.randn(2, 3, 32, 32))
    assert seen["shape"] == (2, 64, 4, 4)  # 32 -> 32 -> 16 -> 8 -> 4: three stride-2 stages only
    assert out.shape == (2, 64)


def test_width_scales_channels_and_bad_names_are_clear():
    assert resnet("resnet18", width=16).feature_dim == 128
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'; valid: resnet18, resnet34, resnet50"):
        resnet("resnet19")
    with pytest.raises(ValueError, match="width"):
        resnet("resnet18", width=0)


def test_mlp_heads_follow_their_papers():
    vicreg = mlp([512, 2048, 2048, 2048], last_bias=False)  # VICReg expander
    linears = [m for m in vicreg if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 2048), (2048, 2048), (2048, 2048)]
    assert linears[-1].bias is None
    assert sum(isinstance(m, nn.BatchNorm1d) for m in vicreg) == 2 and sum(isinstance(m, nn.ReLU) for m in vicreg) == 2
    moco = mlp([512, 512, 128], batch_norm=False)  # Linear, ReLU, Linear
    assert [type(m) for m in moco] == [nn.Linear, nn.ReLU, nn.Linear]
    simsiam = mlp([512, 2048, 2048], last_batch_norm=True)  # lightly's two-layer SimSiam projector
    assert [type(m) for m in simsiam] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    assert simsiam[-1].affine and simsiam[-2].bias is None  # BN's shift replaces the bias
    assert not mlp([512, 2048, 2048, 2048], last_batch_norm=True, last_affine=False)[-1].affine  # the paper's


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    online, target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    online(torch.randn(8, 3))  # move the online BN statistics
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean)
    ema_update(target, online, 0.0)  # momentum 0: SimSiam's target is the online network
    for t, o in zip(target.parameters(), online.parameters()):
        torch.testing.assert_close(t, o)


def test_split_batch_norm_normalizes_each_group_on_its_own():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=4)
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    x = torch.randn(16, 3, 5, 5) * 3 + 1
    out = bn(x)
    for g in range(4):  # group g holds samples g, g+4, g+8, ...
        xs = x[g::4]
        ref = F.batch_norm(xs, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        torch.testing.assert_close(out[g::4], ref, rtol=1e-5, atol=1e-5)
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(bn.state_dict())  # the same keys: a split-BN backbone loads into a plain one
    bn.eval(), plain.eval()
    torch.testing.assert_close(bn(x), plain(x))
