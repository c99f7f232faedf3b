"""Matplotlib helpers: every figure of the notebooks is drawn from data or a run's history.

Each function takes an optional `ax` (or returns a new figure) so notebooks can compose panels.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from .optim import warmup_cosine


def to_numpy_image(x: torch.Tensor, mean=None, std=None) -> np.ndarray:
    """A `[3,H,W]` uint8 image, or a normalized float one given its `mean`/`std`, as `[H,W,3]` in [0,1]."""
    x = x.detach().float().cpu()
    if mean is not None:
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    elif x.max() > 1.5:
        x = x / 255
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def image_grid(images, titles=None, ncols: int = 8, mean=None, std=None, size: float = 1.2, suptitle=None):
    """Show a batch of images `[N,3,H,W]` (uint8, or normalized with `mean`/`std`) in a grid."""
    n = len(images)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * (1.25 if titles else 1)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_numpy_image(images[i], mean, std), interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def class_grid(ds, per_class: int = 8, seed: int = 0, size: float = 1.0):
    """`per_class` random images of every class, one row per class, labelled on the left."""
    g = torch.Generator().manual_seed(seed)
    labels = ds.labels.cpu()
    rows = min(ds.num_classes, 20)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * size, rows * size), squeeze=False)
    for c in range(rows):
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)[:per_class]]
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(idx):
                ax.imshow(to_numpy_image(ds.images[idx[j]]), interpolation="nearest")
        axes[c, 0].set_ylabel(ds.classes[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def named_rows(rows: dict, size: float = 1.1, mean=None, std=None):
    """One row per named batch `[B,3,H,W]` (float in [0,1], or normalized given `mean`/`std`)."""
    ncols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * size + 2.2, len(rows) * size), squeeze=False)
    for ax_row, (name, batch) in zip(axes, rows.items()):
        for j, ax in enumerate(ax_row):
            ax.set_xticks([]), ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(batch):
                ax.imshow(to_numpy_image(batch[j], mean, std), interpolation="nearest")
        ax_row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def lr_schedules(configs: dict, dataset_size: int = 50_000, ax=None):
    """The learning rate over training for each named TrainConfig (its warm-up, cosine and end value)."""
    ax = ax or plt.subplots(figsize=(6.5, 3.5))[1]
    for label, cfg in configs.items():
        base = cfg.lr * cfg.batch_size / 256 if cfg.lr_batch_scaling else cfg.lr
        steps_per_epoch = dataset_size // cfg.batch_size
        total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
        steps = np.arange(total + 1)
        lrs = [warmup_cosine(s, total, warm, base, cfg.final_lr) for s in steps]
        ax.plot(steps / steps_per_epoch, lrs,
                label=f"{label}: {cfg.optimizer.upper()}, peak {base:g}, end {cfg.final_lr:g}, {cfg.epochs} epochs")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedules (per step)")
    ax.legend(fontsize=8)
    return ax


def curves(runs: dict, key: str, ax=None, ylabel: str | None = None, reference: dict | None = None, title=None):
    """One history field (`knn_top1`, `loss`, `embedding_std`, ...) over epochs for each named run.

    `reference` draws the seeds' numbers as horizontal dashed lines: {"thesis BYOL": 85.55}.
    """
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for label, run in runs.items():
        epochs, values = run.column(key)
        ax.plot(epochs, values, marker="o" if len(epochs) < 15 else None, ms=3, label=label)
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", lw=1, color="gray")
        ax.annotate(label, (ax.get_xlim()[0], value), fontsize=7, color="gray", va="bottom")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel or key)
    if title:
        ax.set_title(title)
    if runs:
        ax.legend(fontsize=8)
    return ax


def run_summary(run, title: str | None = None):
    """Four panels of one run: every loss term, kNN top-1, embedding std x sqrt(d) and the lr."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    history = run.history
    terms = [k for k in history[-1] if k not in ("epoch", "lr", "knn_top1", "embedding_std", "embedding_rank",
                                                  "epoch_time", "images_per_s", "eval_time", "accuracy")]
    for k in terms:
        epochs, values = run.column(k)
        axes[0].plot(epochs, values, marker="o" if len(epochs) < 15 else None, ms=3, label=k)
    axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)", title="loss terms")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    curves({"kNN": run}, "knn_top1", axes[1], "kNN top-1 on the test set (%)", title="kNN (k=200, t=0.1)")
    curves({"std": run}, "embedding_std", axes[2], "std x sqrt(d) of normalized embeddings",
           title="collapse (1 healthy, 0 collapsed)")
    curves({"lr": run}, "lr", axes[3], "learning rate (end of epoch)", title="learning rate")
    for ax in axes[1:]:
        ax.get_legend().remove()
    fig.suptitle(title or str(run.path.name))
    fig.tight_layout()
    return fig
