"""How good is a backbone? Weighted kNN, linear probes on a frozen backbone, fine-tuning.

kNN follows the thesis (sec. 4.5, after [0] Wu et al., 2018, arXiv:1805.01978): cosine
similarity of L2-normalized backbone features, the k=200 nearest training images vote with
weight exp(sim / 0.1). It needs no training, so the loop runs it after every epoch.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import augment
from .data import ImageDataset, iterate_batches, labelled_subset
from .optim import warmup_cosine

KNN_K, KNN_T = 200, 0.1  # thesis sec. 4.5: the same for every experiment

# Linear-probe protocols of the two seeds. Unstated values are pinned here and said so.
PROBES = {
    # thesis sec. 4.5: 10 epochs, SGD, lr 0.3 (table 4.1), random resized crop only; batch 512
    # as all its experiments; momentum 0.9, no weight decay and a cosine schedule are pinned
    "thesis": dict(epochs=10, lr=0.3, batch_size=512, flip=False, momentum=0.9, weight_decay=0.0),
    # study sec. 3.3: 100 epochs, SGD, lr 0.01 with cosine decay, the paper's crop + flip;
    # batch 256 and momentum 0.9 from the VICReg evaluation code, no weight decay pinned
    "vicreg": dict(epochs=100, lr=0.01, batch_size=256, flip=True, momentum=0.9, weight_decay=0.0),
}
# thesis sec. 4.6.6: fine-tuning for 70 epochs with lr 0.005 on 10% or 100% of the labels;
# SGD momentum 0.9, weight decay 5e-4, cosine and the supervised crop + flip are pinned
FINETUNE = dict(epochs=70, lr=0.005, batch_size=512, momentum=0.9, weight_decay=5e-4)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, transform, batch_size: int = 1024,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Backbone features `[N, D]` (float32) of uint8 images in eval mode; restores the mode after."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats = []
    for start in range(0, len(images), batch_size):
        x = transform(images[start:start + batch_size].to(device))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            feats.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(feats)


@torch.no_grad()
def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = KNN_K, t: float = KNN_T, chunk: int = 512) -> torch.Tensor:
    """Weighted kNN labels for `features` [N,D] against a feature `bank` [M,D] (thesis fig. 4.4).

    Features are L2-normalized here, so the dot product is the cosine similarity.
    """
    features, bank = F.normalize(features, dim=1), F.normalize(bank, dim=1)
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(features), chunk):  # bound the [chunk, M] similarity matrix
        sim = features[start:start + chunk] @ bank.T  # [B, M]
        weight, idx = sim.topk(k, dim=1)  # [B, k]
        weight = (weight / t).exp()
        scores = torch.zeros(len(sim), num_classes, device=sim.device).scatter_add_(1, bank_labels[idx], weight)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 k: int = KNN_K, t: float = KNN_T) -> float:
    """Top-1 accuracy (%) of the weighted kNN classifier (a tensor, so no host sync)."""
    pred = knn_predict(test_features, train_features, train_labels, num_classes, k, t)
    return (pred == test_labels).float().mean() * 100


def knn_eval(backbone: nn.Module, train: ImageDataset, test: ImageDataset, transform, k: int = KNN_K,
             t: float = KNN_T, amp_dtype=None) -> float:
    """kNN top-1 (%) of a backbone: features of the un-augmented training set are the bank."""
    bank = extract_features(backbone, train.images, transform, amp_dtype=amp_dtype)
    feats = extract_features(backbone, test.images, transform, amp_dtype=amp_dtype)
    return float(knn_accuracy(bank, train.labels, feats, test.labels, train.num_classes, k, t))


def _fit(model: nn.Module, head: nn.Module, params, train: ImageDataset, test: ImageDataset, train_transform,
         test_transform, epochs: int, lr: float, batch_size: int, momentum: float, weight_decay: float,
         frozen: bool, seed: int, progress: bool, desc: str) -> dict:
    """Train `head(model(x))` with SGD + cosine, reporting test top-1 after every epoch."""
    from tqdm.auto import tqdm

    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ValueError(f"{desc}: epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")

    device = train.labels.device
    gen = torch.Generator(device).manual_seed(seed)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    batch_size = min(batch_size, len(train.labels))
    steps = len(train.labels) // batch_size
    history = []
    for epoch in range(1, epochs + 1):
        model.train(not frozen)  # a frozen backbone stays in eval mode: its BN statistics do not move
        head.train()
        total = torch.zeros((), device=device)
        for i, (x, y) in enumerate(tqdm(iterate_batches(train, batch_size, generator=gen), total=steps,
                                        desc=f"{desc} {epoch}/{epochs}", disable=not progress, leave=False)):
            for g in opt.param_groups:
                g["lr"] = warmup_cosine((epoch - 1) * steps + i, epochs * steps, 0, lr)
            x = train_transform(x, generator=gen)
            with torch.set_grad_enabled(not frozen):
                h = model(x)
            loss = F.cross_entropy(head(h.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        history.append({"epoch": epoch, "train_loss": float(total / steps),
                        "test_top1": classifier_accuracy(model, head, test, test_transform)})
    return {"top1": history[-1]["test_top1"], "best_top1": max(h["test_top1"] for h in history), "history": history}


@torch.no_grad()
def classifier_accuracy(model: nn.Module, head: nn.Module, test: ImageDataset, transform) -> float:
    model.eval(), head.eval()
    correct = 0
    for x, y in iterate_batches(test, 1024, shuffle=False, drop_last=False):
        correct += (head(model(transform(x)).float()).argmax(1) == y).sum()
    return float(correct) / len(test.labels) * 100


def linear_probe(backbone: nn.Module, train: ImageDataset, test: ImageDataset, protocol: str = "thesis",
                 mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, seed: int = 0, progress: bool = True,
                 cached: bool = False, **overrides) -> dict:
    """Train a linear classifier on a frozen backbone (eval mode) with one of `PROBES`' protocols.

    `cached=True` extracts the features of the un-augmented images once and trains on them:
    much faster (no backbone pass per epoch), but without the protocol's augmentation, so its
    numbers are labelled as such. `overrides` change a protocol's settings (`epochs=50`: the
    thesis's longer probe). Returns final and best test top-1 (%) and the per-epoch history.
    """
    if protocol not in PROBES:
        raise ValueError(f"unknown linear-probe protocol {protocol!r}; valid: {', '.join(PROBES)}")
    p = {**PROBES[protocol], **overrides}
    backbone = copy.deepcopy(backbone).to(train.device).requires_grad_(False).eval()
    head = nn.Linear(backbone.feature_dim, train.num_classes).to(train.device)
    size = train.images.shape[-1]
    plain = augment.eval_transform(mean, std, size)
    if cached:  # features once; the "model" is then the identity
        train = SimpleNamespace(images=extract_features(backbone, train.images, plain), labels=train.labels)
        test = SimpleNamespace(images=extract_features(backbone, test.images, plain), labels=test.labels)
        backbone, crop, plain = nn.Identity(), (lambda x, generator=None: x), (lambda x: x)
    else:
        crop = augment.linear_eval_transform(mean, std, size=size, flip=p["flip"])
    out = _fit(backbone, head, head.parameters(), train, test, crop, plain, p["epochs"], p["lr"], p["batch_size"],
               p["momentum"], p["weight_decay"], frozen=True, seed=seed, progress=progress,
               desc=f"linear probe ({protocol}{', cached' if cached else ''})")
    return {"protocol": protocol, "cached": cached, "settings": p, **out}


def finetune(backbone: nn.Module, train: ImageDataset, test: ImageDataset, label_fraction: float = 1.0,
             mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, seed: int = 0, progress: bool = True,
             **overrides) -> dict:
    """Fine-tune backbone + a new linear head on `label_fraction` of the labels (thesis table 4.3)."""
    p = {**FINETUNE, **overrides}
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    if label_fraction < 1:
        train = labelled_subset(train, fraction=label_fraction, seed=seed)
    backbone = copy.deepcopy(backbone).to(train.device).requires_grad_(True)
    head = nn.Linear(backbone.feature_dim, train.num_classes).to(train.device)
    size = train.images.shape[-1]
    views = augment.train_views("supervised", mean, std, size)
    out = _fit(backbone, head, [*backbone.parameters(), *head.parameters()], train, test,
               lambda x, generator=None: views(x, generator=generator)[0], augment.eval_transform(mean, std, size),
               p["epochs"], p["lr"], p["batch_size"], p["momentum"], p["weight_decay"], frozen=False, seed=seed,
               progress=progress, desc=f"fine-tune ({label_fraction:.0%} labels)")
    return {"label_fraction": label_fraction, "settings": p, **out}
