"""Shared plumbing of the benchmark scripts in this folder.

Every script measures its contenders side by side in ONE run (timings on a shared or virtual
machine move by 10-20% between runs, so only numbers from the same run are compared), takes
the median of several repeats after a warm-up, and writes a JSON file that says what machine,
code and command produced it. This module holds what they share:

    describe_machine(device)    versions, platform, cores, load, threads, GPU name, git commit
    time_it(fn, repeats, dev)   seconds of each call after a warm-up, synchronised on a GPU
    median(xs)
    write_json(result, path)    benchmarks/results/<name>.json by default (git-ignored)
    synthetic_cifar(n)          random CIFAR-sized uint8 images (HWC, as CIFAR stores them) + labels
    TwoViewDataset, make_loader the torchvision/PIL two-view pipeline behind a DataLoader
    build_like_train(cfg, dev)  model, optimizer, scaler, precision as sslnb.train builds them
    plain_loop(cfg, dev, ...)   the plain PyTorch training loop a DataLoader would feed
    parse_device, device_threads_width, print_machine, loader_pass, to_batch: small helpers

The scripts import it as `common` (they are run as `python benchmarks/<script>.py`, which puts
this folder on sys.path).
"""
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

from sslnb import augment
from sslnb.methods import build_method
from sslnb.optim import build_optimizer, set_lr
from sslnb.train import pick_device, pick_precision, seed_everything  # the same choices as sslnb.train

RESULTS = Path(__file__).parent / "results"
DEVICES = ("auto", "cpu", "cuda", "mps")  # cuda:N also works: pick_device checks it


def parse_device(parser, name: str) -> torch.device:
    """--device as sslnb.train picks it (auto: cuda, then mps, then cpu); a bad one is a usage error."""
    try:
        return pick_device(name)
    except ValueError as e:
        parser.error(str(e))


def device_threads_width(parser, args) -> tuple[torch.device, int]:
    """The device from --device, torch threads from --threads (on a CPU 1 unless given: the
    per-thread numbers), and the backbone width from --width (8 on a CPU, 64 elsewhere)."""
    device = parse_device(parser, args.device)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    return device, args.width or (8 if device.type == "cpu" else 64)


def default_out(name: str) -> Path:
    return RESULTS / f"{name}.json"


# -- timing --------------------------------------------------------------------------------

def synchronize(device) -> None:
    """Wait for the device's queued work: GPU kernels run asynchronously, so a timer read
    without this measures how fast Python queued them, not how fast they ran."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_it(fn, repeats: int, device=None, warmup: int = 1) -> list:
    """Wall-clock seconds of `repeats` calls of fn(), after `warmup` untimed calls (first-call
    costs: allocations, lazy imports, cuDNN's algorithm search, DataLoader workers starting).
    With a device, every timed call starts and ends with that device idle."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device is not None:
            synchronize(device)
        start = time.perf_counter()
        fn()
        if device is not None:
            synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return statistics.median(xs)


# -- what the numbers were measured on -------------------------------------------------------

def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def describe_machine(device=None) -> dict:
    """Everything a reader needs to judge a timing: versions, machine, load, threads, device,
    code version and the command. `git_dirty` says the working tree differed from the commit
    (then the commit alone does not name the code that ran)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        git_commit=_git("rev-parse", "--short", "HEAD"),
        git_dirty=bool(status) if status is not None else None,
        python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
        numpy=np.__version__, pillow=PIL.__version__,
        platform=platform.platform(), machine=platform.machine(), processor=platform.processor() or None,
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # 1, 5, 15 min
        torch_threads=torch.get_num_threads(),
        env={k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_",
                                        "MALLOC_TRIM_THRESHOLD_", "CUDA_VISIBLE_DEVICES") if k in os.environ},
        device=str(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    device_capability=list(torch.cuda.get_device_capability(device)),
                    device_memory_gib=round(props.total_memory / 2**30, 1))
    elif device.type == "mps":
        info.update(device_name="Apple MPS")
    else:
        info.update(device_name=f"cpu ({torch.get_num_threads()} torch threads)")
    return info


def print_machine(info: dict) -> None:
    load = ", ".join(f"{x:.2f}" for x in info["load_average"]) if info["load_average"] else "n/a"
    dirty = " (+ uncommitted changes)" if info["git_dirty"] else ""
    print(f"{info['device_name']} | {info['cpu_count']} CPUs, load {load} | torch {info['torch']}, "
          f"torchvision {info['torchvision']}, python {info['python']} | commit {info['git_commit']}{dirty} | "
          f"{info['date']}")
    busy = info["load_average"] and info["load_average"][0] > 0.5
    if busy:  # a thread that must wait for a core held by another process slows every parallel op
        print(f"note: 1-minute load average {info['load_average'][0]:.2f} at the start: other work ran in the last "
              "minute; if it still runs, timings that use more threads or workers than idle cores are unreliable")


def write_json(result: dict, path) -> None:
    """Write `result` as indented JSON, creating the folder; the load average at the end of the
    run is added, so a reader sees whether something else ran meanwhile."""
    result = {**result, "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


# -- the model as sslnb.train builds it -------------------------------------------------------

def build_like_train(cfg, device):
    """Model, optimizer, loss scaler, autocast dtype and base lr for the TrainConfig `cfg`, built
    as sslnb.train builds them, so a hand-written loop does the same arithmetic per step:
    autocast bf16 (Ampere and newer) or fp16 with a GradScaler and the fused SGD on CUDA, float32
    on CPU/MPS; channels_last on CUDA."""
    device = torch.device(device)
    amp_dtype = pick_precision(device)
    model = build_method(cfg.method, cfg.backbone, cfg.width, 10, **cfg.method_kwargs).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.lr * cfg.batch_size / 256 if cfg.lr_batch_scaling else cfg.lr
    fp16 = amp_dtype == torch.float16
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, base_lr, cfg.momentum, cfg.weight_decay,
                                fused=fp16)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return model, optimizer, scaler, amp_dtype, base_lr


def plain_loop(cfg, device, batches, steps: int) -> list:
    """Train cfg's model for cfg.epochs epochs on `batches()` (a fresh iterator of (x1, x2, labels)
    per epoch) with the plain PyTorch steps, the lr schedule of sslnb.train; returns each epoch's
    seconds and the trained model."""
    seed_everything(cfg.seed)  # same init and cudnn.benchmark setting as sslnb.train
    model, optimizer, scaler, amp_dtype, base_lr = build_like_train(cfg, device)
    channels_last = device.type == "cuda"
    seconds = []
    for epoch in range(cfg.epochs):
        model.train()
        total = torch.zeros((), device=device)
        tic = time.perf_counter()
        for i, (x1, x2, labels) in enumerate(batches()):
            # copies from pinned memory return at once and overlap with the GPU's work (no-ops on CPU)
            x1, x2, labels = (t.to(device, non_blocking=True) for t in (x1, x2, labels))
            if channels_last:
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            set_lr(optimizer, epoch * steps + i, cfg.epochs * steps, cfg.warmup_epochs * steps, base_lr, cfg.final_lr)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = model(x1, x2, labels)["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            model.after_step()
            total += loss.detach()  # kept on the device: no host sync inside the epoch, as sslnb.train
        float(total)  # one host sync per epoch: the epoch's work has finished when the clock stops
        seconds.append(time.perf_counter() - tic)
    return seconds, model



# -- data -------------------------------------------------------------------------------------

def synthetic_cifar(n: int, num_classes: int = 10, seed: int = 0) -> tuple:
    """n random 32x32 RGB uint8 images [n, 32, 32, 3] (HWC, as CIFAR stores them) and labels [n]
    (int64), as numpy arrays. Noise, not photographs: every augmentation here costs the same
    whatever the pixels are (no decoding, no data-dependent branches), and nothing is downloaded."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n, dtype=np.int64)
    return images, labels


def to_batch(images: np.ndarray, device="cpu") -> torch.Tensor:
    """HWC uint8 numpy images -> a contiguous uint8 [N, 3, H, W] tensor on `device` (sslnb's layout)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)


class TwoViewDataset(torch.utils.data.Dataset):
    """The torchvision/PIL baseline: image i as a PIL image through each of a method's two view
    pipelines (`augment.torchvision_reference`, the same settings as `augment.two_views`),
    returning (view1, view2, label) float tensors, as a DataLoader-based training script would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, method: str,
                 mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD):
        self.images, self.labels = images, labels
        self.transforms = [augment.torchvision_reference(c, mean, std) for c in augment.METHOD_VIEWS[method]]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        return (*(t(image) for t in self.transforms), int(self.labels[i]))


def make_loader(dataset, batch_size: int, workers: int, device) -> torch.utils.data.DataLoader:
    """A training DataLoader: shuffled, last partial batch dropped (as sslnb.train's epochs),
    persistent workers (started once, in the warm-up pass, not in every timed pass), pinned
    memory on CUDA so the copies to the GPU can be asynchronous. Workers run 1 torch thread
    each (the DataLoader sets that)."""
    device = torch.device(device)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda")


def loader_pass(loader, device) -> int:
    """One whole pass over `loader`, each batch's views copied to `device` (where a training step
    would need them); returns the number of images."""
    device = torch.device(device)
    n = 0
    for *views, _ in loader:
        views = [v.to(device, non_blocking=True) for v in views]
        n += len(views[0])
    return n
