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
from .data import ImageDataset, even_batch_size, even_batches, iterate_batches, labelled_indices, labelled_subset
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
    # every image in every epoch: ceil(n / batch) near-equal batches (dropping the last partial batch
    # would leave 414 of digits' 1,438 images out at batch 512); the batch reported is the one used
    batch_size = even_batch_size(len(train.labels), batch_size)
    steps = -(-len(train.labels) // batch_size)
    history = []
    for epoch in range(1, epochs + 1):
        model.train(not frozen)  # a frozen backbone stays in eval mode: its BN statistics do not move
        head.train()
        total = torch.zeros((), device=device)
        correct, seen = torch.zeros((), device=device), 0  # train top-1 on the augmented batches, no host sync
        for i, (x, y) in enumerate(tqdm(even_batches(train, batch_size, generator=gen), total=steps,
                                        desc=f"{desc} {epoch}/{epochs}", disable=not progress, leave=False)):
            for g in opt.param_groups:
                g["lr"] = warmup_cosine((epoch - 1) * steps + i, epochs * steps, 0, lr)
            x = train_transform(x, generator=gen)
            with torch.set_grad_enabled(not frozen):
                h = model(x)
            logits = head(h.float())
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        history.append({"epoch": epoch, "train_loss": float(total / steps),
                        "train_top1": float(correct / max(seen, 1) * 100),  # VICReg study fig. 5
                        "test_top1": classifier_accuracy(model, head, test, test_transform)})
    return {"top1": history[-1]["test_top1"], "best_top1": max(h["test_top1"] for h in history), "history": history,
            "batch_size": batch_size}


@torch.no_grad()
def classifier_accuracy(model: nn.Module, head: nn.Module, test: ImageDataset, transform) -> float:
    model.eval(), head.eval()
    correct = 0
    for x, y in iterate_batches(test, 1024, shuffle=False, drop_last=False):
        correct += (head(model(transform(x)).float()).argmax(1) == y).sum()
    return float(correct) / len(test.labels) * 100


def linear_probe(backbone: nn.Module, train: ImageDataset, test: ImageDataset, protocol: str = "thesis",
                 mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, seed: int = 0, progress: bool = True,
                 cached: bool = False, size: int | None = None, **overrides) -> dict:
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
    size = size or train.images.shape[-1]  # `size`: resample to it (an ImageNet backbone on CIFAR: 224)
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
    return {"protocol": protocol, "cached": cached, "settings": {**p, "batch_size": out.pop("batch_size")}, **out}


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
    return {"label_fraction": label_fraction, "settings": {**p, "batch_size": out.pop("batch_size")}, **out}


# -- the thesis's comparison (notebook 17): stored evaluations, accuracy against labels per class --

def load_or_evaluate(run, settings: dict, compute) -> dict:
    """`compute()` once per run and `settings`: its JSON result is kept in the run's
    `evaluations.json` under the settings, so a figure or table that reads it again costs
    nothing. Any change of settings (protocol, epochs, backbone file, seed) computes anew;
    delete the file to recompute after changing the evaluation code."""
    import json

    from .runs import _atomic_write

    key = json.dumps(settings, sort_keys=True)
    path = run.path / "evaluations.json"
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if key not in stored:
        stored[key] = json.loads(json.dumps(compute()))  # plain JSON (tuples -> lists), as it will read back
        text = json.dumps(stored, indent=1)
        _atomic_write(path, lambda f: f.write(text.encode()))
    return stored[key]


def probe_on_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                      num_classes: int, steps: int = 300, lr: float = 0.3, momentum: float = 0.9,
                      weight_decay: float = 0.0, batch_size: int = 1024, seed: int = 0) -> float:
    """Test top-1 (%) of a linear classifier trained on cached features: SGD with momentum and a
    cosine schedule for a fixed number of `steps` (10 epochs of 10 labelled images would be 10
    steps), on batches of at most `batch_size` (all of a small labelled set at once). The
    thesis's probe settings (lr 0.3, momentum 0.9, sec. 4.5) without its augmentation."""
    device = train_x.device
    gen = torch.Generator(device).manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n, b = len(train_y), min(batch_size, len(train_y))
    order = torch.randperm(n, device=device, generator=gen)
    start = 0
    for step in range(steps):
        if start + b > n:
            order, start = torch.randperm(n, device=device, generator=gen), 0
        idx = order[start:start + b]
        start += b
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, 0, lr)
        loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(test_x).argmax(1) == test_y).float().mean() * 100)


def label_efficiency(backbone: nn.Module, train: ImageDataset, test: ImageDataset, per_class=(10, 20, 50, 100, 200, 500),
                     seeds=(0, 1, 2), mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, **probe) -> dict:
    """Test top-1 (%) of a linear probe trained on N labelled images per class, for each N in
    `per_class`: mean and std over `seeds` (each draws other images). Features of the frozen
    backbone (eval mode, no augmentation) are extracted once and standardized with the mean and
    std of all training images' features, which uses no labels. `probe`: `probe_on_features` settings.
    Returns {N: {"mean", "std", "runs"}}; an N above the smallest class size uses that whole class.
    """
    plain = augment.eval_transform(mean, std, train.images.shape[-1])
    backbone = backbone.to(train.device)
    train_x = extract_features(backbone, train.images, plain)
    test_x = extract_features(backbone, test.images, plain)
    mu, sigma = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mu) / sigma, (test_x - mu) / sigma
    out = {}
    for n in per_class:
        accs = []
        for seed in seeds:
            idx = labelled_indices(train.labels, train.num_classes, per_class=n, seed=seed).to(train.device)
            accs.append(probe_on_features(train_x[idx], train.labels[idx], test_x, test.labels, train.num_classes,
                                          seed=seed, **probe))
        t = torch.tensor(accs)
        out[n] = {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "runs": accs}
    return out
