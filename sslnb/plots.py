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
                                                  "epoch_time", "images_per_s", "eval_time", "accuracy",
                                                  "peak_memory_mb", "device_name")]
    for k in terms:
        epochs, values = run.column(k)
        axes[0].plot(epochs, values, marker="o" if len(epochs) < 15 else None, ms=3, label=k)
    axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)", title="loss terms")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    curves({"kNN": run}, "knn_top1", axes[1], "kNN top-1 on the test set (%)", title="kNN (k=200, t=0.1)")
    curves({"std": run}, "embedding_std", axes[2], "std x sqrt(d) of normalized embeddings",
           title="collapse (1 healthy, 0 collapsed)")
    for ax in axes[1:3]:
        ax.get_legend().remove()
    lr_schedule_of_run(run, axes[3])
    fig.suptitle(title or str(run.path.name))
    fig.tight_layout()
    return fig


# -- the VICReg study's figures (fig. 3 loss breakdown, fig. 4 t-SNE, fig. 5/6 probes; issue 10) ----

VICREG_TERMS = (("invariance", "inv_weight", 25.0), ("variance", "var_weight", 25.0), ("covariance", "cov_weight", 1.0))


def _class_colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "nipy_spectral")
    return [cmap(i if n <= 20 else i / max(n - 1, 1)) for i in range(n)]


def embedding_scatter(points, labels, classes, ax=None, title: str | None = None, size: float = 4.0,
                      legend: bool = True):
    """Points [N, 2] or [N, 3] (a t-SNE) coloured by class, with a legend of the class names.

    A 3-D scatter needs a 3-D axis: without `ax` the right kind is made. Labels index `classes`.
    """
    points = np.asarray(points)
    labels = np.asarray(torch.as_tensor(labels).cpu())
    dims = points.shape[1]
    if dims not in (2, 3):
        raise ValueError(f"points must be [N, 2] or [N, 3], got {list(points.shape)}")
    if ax is None:
        fig = plt.figure(figsize=(size + 1.6, size))
        ax = fig.add_subplot(projection="3d" if dims == 3 else None)
    present = np.unique(labels)
    colors = _class_colors(len(classes))
    for c in present:
        m = labels == c
        ax.scatter(*points[m].T, s=4 if len(points) > 2000 else 8, color=colors[c], label=classes[c], alpha=0.8,
                   linewidths=0)
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    if dims == 3:
        ax.set_zlabel("t-SNE 3")
    ax.set_xticks([]), ax.set_yticks([])
    if dims == 3:
        ax.set_zticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  ncol=1 if len(present) <= 20 else 2, frameon=False)
    return ax


def scatter_grid(panels: dict, classes, ncols: int = 2, size: float = 4.2, suptitle: str | None = None):
    """Several `embedding_scatter` panels, {title: (points, labels)}, 2-D or 3-D each, and one
    legend of the classes for the whole figure, on its right."""
    n = len(panels)
    nrows = -(-n // ncols)
    fig = plt.figure(figsize=(ncols * size + 2.0, nrows * size))
    for i, (title, (points, labels)) in enumerate(panels.items()):
        dims = np.asarray(points).shape[1]
        ax = fig.add_subplot(nrows, ncols, i + 1, projection="3d" if dims == 3 else None)
        embedding_scatter(points, labels, classes, ax=ax, title=title, legend=False)
    handles, names = ax.get_legend_handles_labels()
    right = 1 - 2.0 / fig.get_figwidth()  # room for the legend
    fig.legend(handles, names, loc="center left", bbox_to_anchor=(right, 0.5), fontsize=7, markerscale=2.5,
               frameon=False, ncol=1 if len(names) <= 20 else 2)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout(rect=(0, 0, right, 1))
    return fig


def vicreg_loss_breakdown(runs: dict, log: bool = True, suptitle: str | None = None):
    """The VICReg study's figure 3: invariance, variance, covariance and the total per epoch, one
    column per run (dataset); top row weighted by the run's lambda, mu, nu (they add up to the
    total), bottom row unweighted (the terms as the loss computes them). [0] VICReg, 2022,
    arXiv:2105.04906; study sec. 3.2.2.
    """
    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 7), squeeze=False)
    for col, (label, run) in enumerate(runs.items()):
        kwargs = (run.config or {}).get("method_kwargs", {})
        for row, weighted in enumerate((True, False)):
            ax = axes[row, col]
            for (term, key, default), color in zip(VICREG_TERMS, ("C0", "C1", "C2")):
                epochs, values = run.column(term)
                w = kwargs.get(key, default) if weighted else 1.0
                name = f"{w:g} x {term}" if weighted else term
                ax.plot(epochs, [w * v for v in values], color=color, marker="o" if len(epochs) < 15 else None,
                        ms=3, label=name)
            epochs, values = run.column("loss")
            ax.plot(epochs, values, color="k", lw=2, marker="o" if len(epochs) < 15 else None, ms=3,
                    label="total (weighted sum)")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("pretraining epoch")
            ax.set_ylabel(("weighted" if weighted else "unweighted") + " loss (epoch mean)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{label}: {'weighted' if weighted else 'unweighted'} terms", fontsize=10)
            ax.legend(fontsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def probe_curves(results: dict, references: dict | None = None, reference_label: str = "study",
                 suptitle: str | None = None):
    """Linear-probe train and test top-1 per epoch, one panel per result ({label: the dict
    `sslnb.evaluate.linear_probe` returns}); `references` ({label: value}) draws the seed's final
    top-1 as a dashed line. The VICReg study's figures 5 and 6."""
    fig, axes = plt.subplots(len(results), 1, figsize=(7, 3.2 * len(results)), squeeze=False)
    for ax, (label, result) in zip(axes[:, 0], results.items()):
        history = result["history"]
        epochs = [h["epoch"] for h in history]
        marker = "o" if len(epochs) < 15 else None
        if all("train_top1" in h for h in history):
            ax.plot(epochs, [h["train_top1"] for h in history], marker=marker, ms=3,
                    label="train (cached features)" if result.get("cached") else "train (augmented batches)")
        ax.plot(epochs, [h["test_top1"] for h in history], marker=marker, ms=3, label="test")
        if references and label in references:
            ax.axhline(references[label], ls="--", lw=1, color="gray",
                       label=f"{reference_label}: {references[label]:.2f}%")
        ax.set_xlabel("linear-probe epoch")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        protocol = f" (probe: {result['protocol']}{', cached features' if result.get('cached') else ''})" \
            if "protocol" in result else ""
        ax.set_title(label + protocol, fontsize=10)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# -- collapse: the linear BYOL model and the thesis's sec. 4.7 figures (issue 11) --------------

_STABLE, _UNSTABLE = "tab:red", "tab:green"  # the thesis's fig. 3.2 colours


def reduced_dynamics(tau: float, sigma2: float, eta: float, p_max: float | None = None, ax=None, title=None):
    """dp/dt = p (tau p - (1 + sigma2) p^2 - eta) against p, fixed points marked (thesis fig. 3.2):
    stable filled red, unstable hollow green."""
    from .analysis import linear_byol_fixed_points
    from .linear_byol import reduced_rhs

    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    points = linear_byol_fixed_points(tau, sigma2, eta)
    p_max = p_max or 1.4 * max(abs(tau) / (1 + sigma2), 0.1)
    p = np.linspace(-0.15 * p_max, p_max, 400)
    ax.plot(p, reduced_rhs(p, tau, sigma2, eta), color="black", lw=1.5)
    ax.axhline(0, color="gray", lw=0.8)
    for q, stable in points:
        ax.plot([q], [0], "o", ms=9, color=_STABLE if stable else _UNSTABLE, mfc=_STABLE if stable else "white",
                mew=2, zorder=3)
    ax.plot([], [], "o", color=_STABLE, label="stable")
    ax.plot([], [], "o", color=_UNSTABLE, mfc="white", mew=2, label="not stable")
    ax.set(xlabel="predictor eigenvalue p", ylabel="dp/dt", title=title or f"eta={eta:g}, tau={tau:g}, sigma^2={sigma2:g}")
    ax.legend(fontsize=8)
    return ax


def eigen_trajectories(t, values, ax=None, ylabel="p(t)", title=None, fixed_points=None):
    """Curves `values` [T, n] over time `t` [T] (one per starting point), stable fixed points dashed."""
    ax = ax or plt.subplots(figsize=(5, 3.5))[1]
    ax.plot(t, values, lw=1.2)
    for q, stable in fixed_points or []:
        ax.axhline(q, ls="--", lw=1, color=_STABLE if stable else _UNSTABLE)
    ax.set(xlabel="time t (steps x lr)", ylabel=ylabel, title=title or "")
    return ax


def linear_byol_runs(results: dict, keys=("w_norm", "asymmetry", "commutator", "invariant"), log=True):
    """Panels over time of `sslnb.linear_byol.simulate` results, one curve per named run."""
    labels = {"w_norm": "||W||_F (0 = collapsed)", "asymmetry": "asymmetry ||W_p - W_p^T|| / ||W_p||",
              "commutator": "||[F, W_p]|| / (||F|| ||W_p||)", "invariant": "||F - W_p W_p^T / alpha_p||_F",
              "alignment": "mean eigenspace alignment", "loss": "loss"}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, r in results.items():
            y = np.asarray(r[key], dtype=float)
            ax.plot(r["t"], np.maximum(y, 1e-12) if log else y, label=label)
        if log:
            ax.set_yscale("log")
        ax.set(xlabel="time t (steps x lr)", ylabel=labels.get(key, key), title=key)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def eigen_analysis(run, title=None, max_curves: int = 8):
    """Thesis fig. 4.8 from a run recorded with `sslnb.analysis.byol_eigen_callback`: F's sorted
    eigenvalues, the predictor's (symmetric part), the eigenspace alignment per eigenvector of F
    (each a curve per epoch, darker = later) and the predictor's asymmetry over epochs."""
    rows = [h for h in run.history if "eig_F" in h]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    shown = rows if len(rows) <= max_curves else [rows[round(i)] for i in np.linspace(0, len(rows) - 1, max_curves)]
    cmap = plt.get_cmap("viridis")
    for k, h in enumerate(shown):
        c = cmap(k / max(1, len(shown) - 1))
        label = f"epoch {h['epoch']}"
        f = np.asarray(h["eig_F"])
        axes[0].plot(np.arange(1, len(f) + 1), np.maximum(f / max(f[0], 1e-30), 1e-12), color=c, label=label)
        axes[1].plot(np.arange(1, len(f) + 1), h["eig_pred"], color=c, label=label)
        axes[2].plot(np.arange(1, len(f) + 1), h["alignment"], color=c, label=label)
    axes[0].set(yscale="log", xlabel="index j (sorted)", ylabel="s_j / s_1", title="eigenvalues of F (normalized)")
    axes[1].set(xlabel="index j (sorted)", ylabel="eigenvalue", title="predictor eigenvalues (symmetric part)")
    axes[2].set(xlabel="eigenvector j of F (sorted)", ylabel="|u_j^T W_p u_j| / ||W_p u_j||", ylim=(0, 1.05),
                title="eigenspace alignment")
    axes[3].plot([h["epoch"] for h in rows], [h["asymmetry"] for h in rows], marker="o", ms=3)
    axes[3].set(xlabel="epoch", ylabel="||W_p - W_p^T|| / ||W_p||", title="predictor asymmetry (eq. 4.1)")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].legend(fontsize=7)
    fig.suptitle(title or str(run.path.name))
    fig.tight_layout()
    return fig


def compare_runs(runs: dict, keys=("loss", "embedding_std", "knn_top1"), title=None, reference: dict | None = None):
    """Side-by-side panels of history fields for named runs (collapse experiments): the training
    loss, std x sqrt(d) of the normalized embeddings and kNN top-1, by default."""
    labels = {"loss": "training loss (epoch mean)", "embedding_std": "std x sqrt(d) (1 healthy, 0 collapsed)",
              "knn_top1": "kNN top-1 on the test set (%)", "embedding_rank": "effective rank of the embeddings"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        curves(runs, key, ax, labels.get(key, key), reference=(reference or {}).get(key), title=key)
    fig.suptitle(title or "")
    fig.tight_layout()
    return fig


# -- the thesis's comparison (fig. 4.6) and beyond it: labels per class, spectra (notebook 17) ----

def knn_comparison(runs: dict, peaks: dict | None = None, ax=None, title: str | None = None):
    """kNN top-1 over epochs of every named run on one plot (thesis fig. 4.6), each from epoch 0.

    `peaks` {label: value} marks the best accuracy the thesis gives for a method ("around 90%")
    with a triangle of the run's colour at the right edge (side by side where methods share a
    value) and one label per value: "thesis ~90: BYOL, SimSiam".
    """
    from matplotlib.transforms import blended_transform_factory

    ax = ax or plt.subplots(figsize=(8, 4.5))[1]
    colors = {}
    for label, run in runs.items():
        epochs, values = run.column("knn_top1")
        (line,) = ax.plot(epochs, values, marker="o" if len(epochs) < 15 else None, ms=3, label=label)
        colors[label] = line.get_color()
    edge = blended_transform_factory(ax.transAxes, ax.transData)  # x in axes fraction, y in %
    groups: dict[float, list[str]] = {}
    for label, value in (peaks or {}).items():
        groups.setdefault(value, []).append(label)
    for value, labels in groups.items():
        for i, label in enumerate(labels):
            ax.plot([0.985 - 0.03 * i], [value], marker="<", ms=7, ls="none", color=colors.get(label, "gray"),
                    transform=edge, clip_on=False)
        ax.annotate(f"thesis ~{value:g}: {', '.join(labels)}", (1.0, value), xycoords=edge, xytext=(6, 0),
                    textcoords="offset points", fontsize=7, color="dimgray", va="center")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("kNN top-1 on the test set (%)")
    ax.set_title(title or "kNN accuracy during training (k=200, t=0.1)")
    if runs:
        ax.legend(fontsize=8, loc="lower right")
    return ax


def label_efficiency(results: dict, ax=None, title: str | None = None):
    """Test top-1 against labelled images per class (log scale) for each named result of
    `evaluate.label_efficiency` ({N: {"mean", "std"}}), with the std over label draws as error bars."""
    ax = ax or plt.subplots(figsize=(6.5, 4))[1]
    for label, res in results.items():
        ns = sorted(int(n) for n in res)  # keys are strings once stored as JSON
        means = [res.get(n, res.get(str(n)))["mean"] for n in ns]
        stds = [res.get(n, res.get(str(n)))["std"] for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", ms=3, capsize=2, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("linear probe top-1 on the test set (%)")
    ax.set_title(title or "Accuracy against labels (linear probe on frozen features)")
    if results:
        ax.legend(fontsize=8)
    return ax


def spectra(values: dict, ax=None, title: str | None = None, ylabel: str = "singular value / largest (log scale)"):
    """Sorted spectra (from `analysis.covariance_spectrum`) of named embeddings on a log scale:
    a curve that drops by orders of magnitude marks directions the embeddings do not use."""
    ax = ax or plt.subplots(figsize=(6.5, 4))[1]
    for label, s in values.items():
        s = np.asarray(s, dtype=float)
        ax.plot(np.arange(1, len(s) + 1), np.clip(s, 1e-12, None), label=f"{label} (d={len(s)})")
    ax.set_yscale("log")
    ax.set_xlabel("index of the singular value (sorted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Spectrum of the embeddings' covariance")
    if values:
        ax.legend(fontsize=8)
    return ax


# -- the lr panel of `run_summary` (issue 8) ---------------------------------------------------

def lr_schedule_of_run(run, ax=None):
    """A run's learning rate over training: its schedule drawn at 100 points per epoch (warm-up,
    cosine, end value, from the run's config), and as dots the value the loop recorded at the
    last step of each epoch. Drawing only those dots from epoch 0 (which trains nothing) would
    turn a cosine without warm-up into a triangle."""
    ax = ax or plt.subplots(figsize=(4, 3.4))[1]
    cfg = run.config or {}
    if "lr" in cfg and "epochs" in cfg:
        base = cfg["lr"] * cfg.get("batch_size", 256) / 256 if cfg.get("lr_batch_scaling") else cfg["lr"]
        per_epoch = 100
        total, warm = cfg["epochs"] * per_epoch, cfg.get("warmup_epochs", 0) * per_epoch
        steps = np.arange(total + 1)
        ax.plot(steps / per_epoch, [warmup_cosine(t, total, warm, base, cfg.get("final_lr", 0.0)) for t in steps],
                label="schedule (per step)")
    rows = [(e, v) for e, v in zip(*run.column("lr")) if e >= 1]
    if rows:
        ax.plot(*zip(*rows), "o", ms=3, label="last step of each epoch")
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax.legend(fontsize=8)
    return ax


def linear_byol_explorer(eta: float, alpha_p: float, sigma2: float, tau: float, beta: float,
                         p0=(0.02, 0.1, 0.3, 0.6, 1.0), s0: float = 0.5, t_end: float = 100.0):
    """The linear BYOL model at one setting (the notebook's sliders): dp/dt of the reduced dynamics
    with its fixed points, and the full eigenvalue equations (p, s, tau) integrated from `p0` and `s0`."""
    from .analysis import linear_byol_fixed_points
    from .linear_byol import integrate_eigen

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    reduced_dynamics(tau, sigma2, eta, p_max=1.2 * max(max(p0), tau / (1 + sigma2)), ax=axes[0],
                     title=f"reduced dynamics (s = p^2/alpha_p), tau={tau:g}")
    r = integrate_eigen(np.asarray(p0, dtype=float), s0, tau, alpha_p, sigma2, eta, beta, t_end, 2000)
    points = linear_byol_fixed_points(tau, sigma2, eta)
    eigen_trajectories(r["t"], r["p"], axes[1], "predictor eigenvalue p_j(t)", "p_j(t), full equations",
                       fixed_points=points)
    eigen_trajectories(r["t"], r["s"], axes[2], "eigenvalue s_j(t) of F", "s_j(t), full equations")
    for ax in axes[1:]:
        ax.legend([f"p0={p:g}" for p in p0], fontsize=7)
    fig.suptitle(f"eta={eta:g}, alpha_p={alpha_p:g}, sigma^2={sigma2:g}, tau0={tau:g}, beta={beta:g}, s0={s0:g}")
    fig.tight_layout()
    return fig


def markdown_table(header: list[str], rows: list[list]) -> str:
    """Rows (lists of cells) under `header` as a markdown table; floats with 2 decimals, None as a dash."""
    def cell(v):
        return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def show_markdown(text: str) -> None:
    """Render markdown in Jupyter; print it elsewhere (scripts, tests)."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display

        if get_ipython() is not None:
            display(Markdown(text))
            return
    except ImportError:
        pass
    print(text)


def table(rows: list[dict], title: str | None = None) -> str:
    """A list of dicts (one per row, same keys) as a markdown table, displayed in Jupyter (printed
    elsewhere) and returned."""
    columns = list(rows[0]) if rows else []
    text = markdown_table(columns, [[r.get(c) for c in columns] for r in rows])
    text = f"**{title}**\n\n{text}" if title else text
    show_markdown(text)
    return text


def accuracy_by_size(results: dict, references: dict | None = None, reference_label: str = "study",
                     title: str | None = None, ax=None):
    """Test top-1 against the input size, one line per label ({label: {size: top-1}}): how far a
    32x32 image must be upsampled for an ImageNet backbone (study sec. 3.4 upsamples to 224)."""
    ax = ax or plt.subplots(figsize=(6.5, 3.6))[1]
    for i, (label, by_size) in enumerate(results.items()):
        sizes = sorted(by_size)
        ax.plot(sizes, [by_size[s] for s in sizes], marker="o", color=f"C{i}", label=label)
        if references and label in references:
            ax.axhline(references[label], ls="--", lw=1, color=f"C{i}",
                       label=f"{reference_label} ({label}): {references[label]:.2f}%")
    ax.set_xlabel("input size (pixels per side)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "Linear probe accuracy against the upsampled size")
    ax.legend(fontsize=8)
    return ax
