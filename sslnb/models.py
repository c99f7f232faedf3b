"""CIFAR ResNets, MLP heads and the momentum (EMA) update.

[0] ResNet, 2016, arXiv:1512.03385. The CIFAR variant replaces the ImageNet stem
(7x7 stride-2 conv + max-pool) by one 3x3 stride-1 conv, so a 32x32 image reaches the
last stage at 4x4 instead of 1x1.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = ("resnet18", "resnet34", "resnet50")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = norm(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), norm(out_planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stride-1 stem, no max-pool, four stages of `width * (1, 2, 4, 8)` channels.

    `forward` returns the pooled representation `[N, feature_dim]` (512 for ResNet-18/34 and
    2048 for ResNet-50 at the default width 64). A small `width` (8, 16) gives tiny backbones
    for tests and CPU runs with the same topology.
    """

    def __init__(self, block, num_blocks: tuple[int, ...], width: int = 64, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width)
        in_planes, stages = width, []
        for i, n in enumerate(num_blocks):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(block(in_planes, planes, s, norm))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # [N, feature_dim]


def resnet(name: str = "resnet18", width: int = 64, norm=nn.BatchNorm2d) -> ResNet:
    """Build a CIFAR ResNet by name (`BACKBONES`)."""
    layouts = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
               "resnet50": (Bottleneck, (3, 4, 6, 3))}
    if name not in layouts:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int (64 is the standard ResNet), got {width!r}")
    block, num_blocks = layouts[name]
    return ResNet(block, num_blocks, width, norm)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` groups of the batch.

    A single GPU emulates MoCo's shuffling BN across GPUs with it: each group of samples
    is normalized with its own statistics, as on one of `num_splits` GPUs. In eval mode it
    is a plain BatchNorm. [0] MoCo, 2020, arXiv:1911.05722 (sec. 3.3, Shuffling BN).
    """

    def __init__(self, num_features: int, num_splits: int = 8, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        if n % g:
            raise ValueError(f"SplitBatchNorm2d: batch {n} is not divisible by num_splits {g}")
        # samples n = a*g + s go to group s: [N,C,H,W] -> [N/g, g*C, H, W], one BN call
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(x.reshape(n // g, g * c, h, w), mean, var, self.weight.repeat(g), self.bias.repeat(g),
                           True, self.momentum, self.eps)
        with torch.no_grad():  # keep one set of running statistics: the groups' average
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w)


def mlp(dims: list[int], batch_norm: bool = True, last_bias: bool = True, last_batch_norm: bool = False,
        last_affine: bool = True) -> nn.Sequential:
    """An MLP head: `Linear -> [BN] -> ReLU` between the sizes in `dims`, a final `Linear`.

    `mlp([512, 2048, 2048, 2048], last_bias=False)` is VICReg's expander;
    `mlp([512, 512, 128], batch_norm=False)` is MoCo's projection head.
    `last_batch_norm` ends with a BatchNorm (SimSiam); `last_affine=False` drops its scale and shift.
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {dims}")
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        # a bias right before a BatchNorm is redundant: BN's shift replaces it
        layers.append(nn.Linear(d_in, d_out, bias=(last_bias and not last_batch_norm) if last else not batch_norm))
        if not last:
            layers += [nn.BatchNorm1d(d_out)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
    if last_batch_norm:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_affine))
    return nn.Sequential(*layers)


@torch.no_grad()
def ema_update(target, online, momentum: float) -> None:
    """`target <- momentum * target + (1 - momentum) * online`, parameter by parameter.

    `target` and `online` are modules or lists of modules with matching parameters.
    [0] BYOL, 2020, arXiv:2006.07733 (eq. 1); [1] MoCo, 2020, arXiv:1911.05722 (eq. 2).
    Buffers (BatchNorm running statistics) are copied: the target runs in train mode, so
    they never enter the loss, and copying keeps an evaluated target consistent.
    """
    targets = [target] if isinstance(target, nn.Module) else list(target)
    onlines = [online] if isinstance(online, nn.Module) else list(online)
    t_params = [p for m in targets for p in m.parameters()]
    o_params = [p for m in onlines for p in m.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update: target has {len(t_params)} parameters, online {len(o_params)}")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
    for t, o in zip([b for m in targets for b in m.buffers()], [b for m in onlines for b in m.buffers()]):
        t.copy_(o)


# -- the official VICReg ImageNet ResNet-50 (study sec. 3.4) ------------------------------------

VICREG_RESNET50_URL = "https://dl.fbaipublicfiles.com/vicreg/resnet50.pth"  # the VICReg release's backbone


def vicreg_resnet50(weights: str | os.PathLike | None = None) -> nn.Module:
    """The VICReg authors' ImageNet ResNet-50 as a torchvision `resnet50` whose `fc` is the
    identity: `forward` returns 2048-d features (`feature_dim`). [0] VICReg, 2022, arXiv:2105.04906

    weights=None: the authors' `resnet50.pth`, downloaded once into the data folder
    (`sslnb.data.default_root() / "vicreg"`) with `torch.hub.load_state_dict_from_url`. A path:
    that local file (the same state dict). "random": randomly initialised weights, a stand-in
    offline. Files load with `weights_only=True` (tensors only: nothing in them is executed;
    `torch.hub.load` would run the downloaded repository's code, so it is never used). A
    classifier (`fc.*`) and a `module.` prefix in the file are ignored. A missing, corrupt or
    mismatched file raises a ValueError naming the path and what was expected.

    It keeps ImageNet's stem (7x7 stride-2 conv + max-pool): upsample 32x32 CIFAR images
    (`sslnb.augment.imagenet_transform`) before it.
    """
    import torchvision

    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    net.feature_dim = 2048
    if isinstance(weights, str) and weights == "random":
        return net
    expected = "a torchvision resnet50 state dict (conv1.weight [64, 3, 7, 7] ... layer4, no fc needed), " \
               "such as the VICReg release's resnet50.pth"
    if weights is None:
        from .data import default_root

        folder = default_root() / "vicreg"
        path = folder / "resnet50.pth"
        if not path.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.load_state_dict_from_url(VICREG_RESNET50_URL, model_dir=str(folder), map_location="cpu",
                                                   file_name="resnet50.pth", weights_only=True)
            except (OSError, RuntimeError) as e:  # offline (URLError is an OSError), a failed write
                raise ValueError(f"could not download {VICREG_RESNET50_URL} to {path} ({type(e).__name__}: {e}); "
                                 f"download it by hand and pass weights='path/to/resnet50.pth', or use "
                                 f"weights='random' for a stand-in") from None
    else:
        path = Path(weights)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; expected {expected}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused
        raise ValueError(f"{path} is corrupt or not a weights-only torch file ({type(e).__name__}); "
                         f"expected {expected}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; expected {expected}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k} {list(v.shape)} (expected {list(own[k].shape)})" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing keys ({', '.join(missing[:3])}...)" if missing else "",
                    f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}...)" if unexpected else "",
                    f"wrong shapes: {', '.join(wrong[:3])}" if wrong else ""]
        raise ValueError(f"{path} does not match a ResNet-50: {'; '.join(p for p in problems if p)}; "
                         f"expected {expected}")
    net.load_state_dict(state)
    return net
