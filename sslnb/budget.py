"""What a run will cost before you start it: estimated time on Colab's GPUs and GPU memory.

Notebooks call `show(cfg)` before each full-setting training cell. Nothing here is measured
on a GPU: the FLOPs of one training step are counted exactly (torch's FlopCounterMode on a
small batch of the run's real network, forward and backward, targets and keys included), and
turned into time with an assumed sustained throughput per GPU (`GPUS`), which is a guess for
this workload (small 32x32 images keep a GPU far below its peak). Every number it prints says
"estimate"; measured timings, where we have them, are in the README.
"""
from __future__ import annotations

import functools
import json

import torch

# Sustained TFLOP/s assumed for ResNet training on 32x32 images under autocast (fp16 on a T4,
# bf16 on an L4 and an A100): about 12-15% of each card's dense tensor peak (65, 121, 312), as
# small convolutions, BatchNorm and ReLU are bound by memory traffic. An assumption, not a
# measurement: with it, a thesis BYOL epoch on a T4 comes to about a minute, in line with the
# thesis's "between one and three minutes" per epoch on Colab (sec. 4.2).
GPUS = {
    "Colab T4": dict(tflops=8.0, memory_gb=15.0),
    "Colab L4": dict(tflops=15.0, memory_gb=22.5),
    "Colab A100": dict(tflops=40.0, memory_gb=40.0),
}
DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "digits": (1_438, 359)}
_PROBE_BATCH = 16  # two images in each of MoCo's 8 BatchNorm groups (one fails at 1x1 feature maps)


@functools.lru_cache(maxsize=32)
def _per_image(method: str, backbone: str, width: int, image_size: int, num_classes: int, kwargs_json: str) -> dict:
    """FLOPs of one training step and of one backbone forward, and saved activations, per image."""
    from .methods import build_method

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(kwargs_json).items()}

    def build():
        return build_method(method, backbone, width, num_classes, **kwargs)

    try:  # shapes only (meta tensors): no arithmetic, so it takes about a second
        return _count(build, image_size, "meta")
    except RuntimeError:  # an op without a meta kernel (DirectPred's eigh): count on real CPU tensors
        return _count(build, image_size, "cpu")


def _count(build, image_size: int, device: str) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device):
        model = build().train()
        x = torch.randn(_PROBE_BATCH, 3, image_size, image_size)
        y = torch.zeros(_PROBE_BATCH, dtype=torch.long)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with FlopCounterMode(display=False) as step:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*([x] * model.num_views), y)
        out["loss"].backward()
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model.backbone.eval()(x)
    params = sum(p.numel() for p in model.parameters())
    return {"step_flops": step.get_total_flops() / _PROBE_BATCH, "backbone_flops": fwd.get_total_flops() / _PROBE_BATCH,
            "activation_bytes": sum(saved) / _PROBE_BATCH, "params": params}


def estimate(cfg, dataset_size: tuple[int, int] | None = None) -> dict:
    """Estimated cost of the run `cfg` (a `TrainConfig`): FLOPs per epoch and, per GPU in `GPUS`,
    minutes per epoch, hours in all and GPU memory in GB. `dataset_size` is (train, test)
    images, by default the dataset's (CIFAR: 50,000 / 10,000; image folders: CIFAR's)."""
    n_train, n_test = dataset_size or DATASET_SIZES.get(cfg.dataset, (50_000, 10_000))
    num_classes = 100 if cfg.dataset == "cifar100" else 10
    kw = json.dumps(cfg.method_kwargs, sort_keys=True)
    per = _per_image(cfg.method, cfg.backbone, cfg.width, cfg.image_size, num_classes, kw)
    n_fit = int(n_train * cfg.label_fraction)
    train_flops = per["step_flops"] * (n_fit // cfg.batch_size) * cfg.batch_size
    knn_flops = per["backbone_flops"] * (n_train + n_test)  # the per-epoch kNN monitor
    # memory: fp32 weights, gradients and momentum (x3 for a target network's copy, roughly),
    # activations at half size under autocast, the uint8 dataset and ~0.5 GB of CUDA context
    weights = 4 * per["params"] * 3
    activations = 0.5 * per["activation_bytes"] * cfg.batch_size
    data = (n_train + n_test) * 3 * cfg.image_size ** 2
    memory_gb = (weights + activations + data) / 1e9 + 0.5
    rows = {}
    for gpu, spec in GPUS.items():
        epoch_s = (train_flops + knn_flops) / (spec["tflops"] * 1e12)
        rows[gpu] = {"minutes_per_epoch": epoch_s / 60, "hours_total": epoch_s * cfg.epochs / 3600,
                     "memory_gb": memory_gb, "fits": memory_gb < spec["memory_gb"]}
    return {"train_tflop_per_epoch": train_flops / 1e12, "knn_tflop_per_epoch": knn_flops / 1e12,
            "epochs": cfg.epochs, "gpus": rows}


def table(cfg, dataset_size=None) -> str:
    """`estimate(cfg)` as a small markdown table, every number labelled an estimate."""
    e = estimate(cfg, dataset_size)
    lines = [f"**Budget (estimate, not measured)**: {cfg.method}, {cfg.backbone} (width {cfg.width}), "
             f"{cfg.dataset}, batch {cfg.batch_size}, {cfg.epochs} epochs; {e['train_tflop_per_epoch']:.0f} TFLOP "
             f"of training + {e['knn_tflop_per_epoch']:.0f} TFLOP of kNN monitoring per epoch (counted).", "",
             "| GPU | assumed TFLOP/s | per epoch (estimate) | whole run (estimate) | GPU memory (estimate) |",
             "|---|---|---|---|---|"]
    for gpu, row in e["gpus"].items():
        fits = "" if row["fits"] else f" (more than its {GPUS[gpu]['memory_gb']:g} GB)"
        lines.append(f"| {gpu} | {GPUS[gpu]['tflops']:g} | {_duration(row['minutes_per_epoch'] * 60)} | "
                     f"{_duration(row['hours_total'] * 3600)} | {row['memory_gb']:.1f} GB{fits} |")
    return "\n".join(lines)


def show(cfg, dataset_size=None) -> None:
    """Display `table(cfg)` (rendered markdown in Jupyter, plain text elsewhere)."""
    from .plots import show_markdown

    show_markdown(table(cfg, dataset_size))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

