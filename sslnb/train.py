"""One training loop for every method.

The whole dataset sits on the device; each step draws a batch by a device permutation,
augments it there into two views, runs the method under mixed precision and steps the
optimizer. On CUDA the host never waits for the device inside an epoch (the progress bar
shows a loss copied asynchronously), except for DirectPred's eigendecomposition, which that
method needs at every step. On a CPU shared with busy processes the loop uses only the cores
they leave free (sslnb.cpu). After each epoch the run records the mean of every loss term, the learning
rate, kNN top-1 on the test set, collapse statistics and throughput, then writes an atomic
checkpoint from which the next epoch can start in another process. Under torchrun the same
loop runs in every process, each on its shard of the data (sslnb.distributed).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import augment, distributed
from .analysis import collapse_stats
from .cpu import SharedCpuThreads
from .data import DATASETS, ImageDataset, iterate_batches, labelled_subset, load_dataset
from .evaluate import KNN_K, KNN_T, extract_features, knn_accuracy
from .methods import METHODS, build_method, check_options
from .models import BACKBONES
from .optim import OPTIMIZERS, build_optimizer, set_lr
from .runs import Run, RunError, runs_root


@dataclass
class TrainConfig:
    """Everything that defines a run. `default_config` fills it with a method's seed settings."""

    method: str
    dataset: str = "cifar10"
    data_root: str | None = None  # CIFAR download folder, or the image folder
    image_size: int = 32
    backbone: str = "resnet18"
    width: int = 64  # base channels: 64 is the standard ResNet
    epochs: int = 400
    batch_size: int = 512
    optimizer: str = "sgd"
    lr: float = 0.06
    lr_batch_scaling: bool = False  # lr = lr * batch_size / 256 (only where a source says so)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    final_lr: float = 0.0  # absolute value the cosine ends at
    label_fraction: float = 1.0  # supervised baseline on a labelled subset (thesis table 4.3)
    crop_scale: tuple | None = None  # None: the method's pipeline; else its random-crop scale
    method_kwargs: dict = field(default_factory=dict)
    snapshot_epochs: tuple = ()  # extra backbone snapshots (the study probes epochs 50 and 100)
    knn_k: int = KNN_K
    knn_t: float = KNN_T
    seed: int = 0


# Quick mode (SPEC sec. 4): a small experiment on the bundled digits, seconds on one CPU core,
# offline; its numbers are never results. The shared base below, then each method's own
# `MethodSpec.quick_train` / `quick` (sslnb.methods). Chosen on digits (seeds 0, 1, 2): the
# 8x8 digits at their own 8 px (16 or 32 px only interpolate them and cost 4x or 16x per step),
# a crop of at least half the image (an 8% crop of an 8 px digit is two pixels), and 10 epochs
# (~220 steps, about 1 s per epoch on one core): the untrained backbone already scores 52-57%
# kNN at 8 px, and short runs first fall, then climb (2 epochs ended below epoch 0).
QUICK = dict(dataset="digits", data_root=None, backbone="resnet18", width=8, image_size=8, crop_scale=(0.5, 1.0),
             epochs=10, batch_size=64, warmup_epochs=0, snapshot_epochs=())


def default_config(method: str, quick: bool = False, **overrides) -> TrainConfig:
    """A method's configuration, in layers: the registry's settings (the seeds'), then in quick
    mode the shared `QUICK` and the method's own `quick_train` and `quick` method kwargs, then
    `overrides` (None leaves a value as it is)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    spec = METHODS[method]
    values = {**spec.train, **({**QUICK, **spec.quick_train} if quick else {})}
    kwargs = {**(spec.quick if quick else {}), **overrides.pop("method_kwargs", {})}
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(method=method, method_kwargs=kwargs, **values)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(cfg: TrainConfig) -> None:
    """Reject a config a run cannot start from, with a message naming what is valid."""
    checks = [
        (cfg.method in METHODS, f"unknown method {cfg.method!r}; valid: {', '.join(METHODS)}"),
        (cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}; valid: {', '.join(DATASETS)}"),
        (cfg.backbone in BACKBONES, f"unknown backbone {cfg.backbone!r}; valid: {', '.join(BACKBONES)}"),
        (cfg.optimizer in OPTIMIZERS, f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"),
        (cfg.batch_size >= 2, f"batch_size must be at least 2 (BatchNorm and the losses use batch statistics), "
                              f"got {cfg.batch_size}"),
        (cfg.epochs >= 1, f"epochs must be at least 1, got {cfg.epochs}"),
        (cfg.width >= 1, f"width must be at least 1 (64 is the standard ResNet), got {cfg.width}"),
        (0 < cfg.label_fraction <= 1, f"label_fraction must be in (0, 1], got {cfg.label_fraction}"),
        (0 <= cfg.warmup_epochs <= cfg.epochs, f"warmup_epochs (--warmup-epochs) must be in [0, epochs={cfg.epochs}], "
                                               f"got {cfg.warmup_epochs}"),
        (cfg.knn_k >= 1 and cfg.knn_t > 0, f"knn_k must be >= 1 and knn_t > 0, got {cfg.knn_k}, {cfg.knn_t}"),
        (cfg.crop_scale is None or 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
         f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {cfg.crop_scale}"),
        (cfg.image_size >= 8, f"image_size must be at least 8, got {cfg.image_size}"),
        # numbers a run cannot learn with are refused before anything is written (issue 8)
        (_finite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}"),
        (_finite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"weight_decay must be a finite number >= 0, got {cfg.weight_decay}"),
        (_finite(cfg.momentum) and 0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}"),
        (_finite(cfg.final_lr) and cfg.final_lr >= 0, f"final_lr must be a finite number >= 0, got {cfg.final_lr}"),
        (cfg.data_root is None or cfg.dataset not in ("digits",),
         f"data_root (--data-root) does not apply to dataset {cfg.dataset!r}, which is bundled with scikit-learn; "
         "it is the download folder of cifar10/cifar100 or the folder of an imagefolder dataset"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_options(cfg.method, cfg.method_kwargs)
    METHODS[cfg.method].cls.check_batch(cfg.batch_size, cfg.method_kwargs)


# -- device, precision, seeds ---------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; or the device named."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but this machine has no CUDA GPU; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available; use --device cpu or auto")
    return device


def pick_precision(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs with native bf16 (Ampere and newer), fp16 on older ones (T4), none on CPU/MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (every device); optionally make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def train_step(model, optimizer, scaler, views, labels, amp_dtype, forward=None) -> dict:
    """One optimizer step on a batch's views; returns the loss terms (tensors, not synced).
    `forward` is what runs the batch (DistributedDataParallel's wrapper under torchrun), `model`
    the method itself, whose `after_step` moves its momentum encoders."""
    with torch.autocast(views[0].device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        terms = (forward or model)(*views, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    model.after_step()
    return terms


def _rng_states(gen: torch.Generator, device: torch.device) -> dict:
    states = {"device": device.type, "generator": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def _set_rng_states(states: dict, gen: torch.Generator, device: torch.device, seed: int, epoch: int) -> None:
    """Restore every random stream; on another kind of device the streams restart from the seed
    (a run may move from a CPU to a GPU, or between Colab GPUs: it resumes, just not bitwise)."""
    torch.set_rng_state(states["torch"])
    if states.get("device", device.type) != device.type:
        print(f"resuming on {device.type} a run checkpointed on {states['device']}: random streams restart "
              "from the seed, so later epochs will not match an uninterrupted run bitwise")
        gen.manual_seed(seed + epoch)
        torch.manual_seed(seed + epoch)
        return
    gen.set_state(states["generator"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
    if "mps" in states:
        torch.mps.set_rng_state(states["mps"])


def _plain(value):
    """A callback's value as plain JSON-able Python (floats, ints, lists, strings)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy arrays or scalars
        return _plain(value.tolist())
    raise ValueError(f"a callback returned {type(value).__name__}; return numbers, lists, strings or tensors")


# -- the loop ---------------------------------------------------------------------------------

@dataclass
class EpochEnd:
    """What a callback sees after each epoch (and after epoch 0, the untrained model: a copy
    whose BatchNorm statistics were measured on the data, see `untrained_as_evaluated`)."""

    epoch: int
    model: torch.nn.Module
    record: dict
    train: ImageDataset
    test: ImageDataset
    transform: object  # uint8 batch -> normalized float batch, no augmentation
    device: torch.device


def peak_memory_mb(device: torch.device, reset: bool = False) -> float | None:
    """Memory the run holds on its device, in MiB: on CUDA the peak allocated by tensors since the
    last reset (the loop resets it as each epoch starts), on MPS what the driver holds now (MPS
    keeps no peak), None on a CPU. Reads allocator counters only: no wait for the device."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return None


def device_name(device: torch.device) -> str:
    """The machine a run was measured on, for its history: `NVIDIA A100-SXM4-40GB`, `mps`, `cpu (2 threads)`."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type


class _LossForDisplay:
    """The progress bar's loss without a host sync on CUDA: each display starts an asynchronous
    copy of the current loss and shows the one started at the previous display (half a second
    ago), if the GPU has finished it; elsewhere (CPU, MPS) the loss is simply read."""

    def __init__(self, device: torch.device):
        self.cuda, self.pending = device.type == "cuda", None

    def swap(self, loss: torch.Tensor) -> float | None:
        if not self.cuda:
            return float(loss)
        ready = self.pending is not None and self.pending[1].query()  # query() never waits
        shown = float(self.pending[0]) if ready else None
        if self.pending is None or ready:
            copy = loss.detach().to("cpu", non_blocking=True)  # into pinned memory, queued after the step
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(loss.device))  # the loss's GPU, not the current one
            self.pending = (copy, done)
        return shown


class NonFiniteLoss(RuntimeError):
    pass


@torch.no_grad()
def _evaluate(model, train: ImageDataset, test: ImageDataset, transform, cfg: TrainConfig, amp_dtype) -> dict:
    """kNN top-1 on the test set and collapse statistics of the test embeddings."""
    bank = extract_features(model.backbone, train.images, transform, amp_dtype=amp_dtype)
    feats = extract_features(model.backbone, test.images, transform, amp_dtype=amp_dtype)
    knn = knn_accuracy(bank, train.labels, feats, test.labels, train.num_classes, cfg.knn_k, cfg.knn_t)
    was_training = model.training
    model.eval()
    z = model.project(feats)
    model.train(was_training)
    stats = collapse_stats(z)
    return {"knn_top1": float(knn), "embedding_std": stats["std"], "embedding_rank": stats["rank"]}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a notebook's interrupt) during training; the message says how to resume."""


@torch.no_grad()
def untrained_as_evaluated(model: torch.nn.Module, images: torch.Tensor, transform, amp_dtype=None,
                           batch_size: int = 1024) -> torch.nn.Module:
    """A copy of the untrained `model` whose BatchNorm running statistics are measured on `images`
    (one pass, exact averages), in eval mode; weights untouched, `model` itself unchanged.

    Every trained epoch is evaluated with running statistics gathered from the data; a fresh
    network still has BN's initial ones (mean 0, variance 1), which make every BN layer an
    identity and the network an unnormalised one. Epoch 0 is evaluated like the other epochs,
    so a curve's first step shows what training did, not what measuring the statistics did
    (on digits the initial statistics score 10-25 points higher kNN, on CIFAR-10 6 points).
    """
    net = copy.deepcopy(model)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass, not an EMA
        bn.num_splits = 1  # MoCo's split BN: whole-batch statistics (its eval mode is a plain BN anyway)
    net.train()
    device = next(net.parameters()).device
    for start in range(0, len(images) - 1, batch_size):  # BatchNorm needs two samples: skip a last single one
        x = transform(images[start:start + batch_size].to(device))
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            net.project(net.backbone(x))
    return net.eval()


def train(cfg: TrainConfig, run_dir=None, device: str | torch.device = "auto", callbacks=(), progress: bool = True,
          until_epoch: int | None = None, data: tuple[ImageDataset, ImageDataset] | None = None,
          compile_model: bool = False) -> Run:
    """Train (or resume) the run in `run_dir` and return it.

    `until_epoch` stops after that epoch (the schedule still spans `cfg.epochs`): a run can be
    trained in pieces. `callbacks` are called as `cb(EpochEnd)` after every epoch and may
    return a dict of extra fields for the history. `data` skips loading `(train, test)`.
    `compile_model` runs the training step's forward through `torch.compile` (every batch has
    the same shape, so it compiles once; worth it on a GPU for long runs, minutes to compile).
    Ctrl-C raises `Interrupted` saying where the run stopped; every checkpoint is written
    atomically, so the last one always loads and the same call resumes from it.
    """
    run_dir = run_dir or runs_root() / f"{cfg.method}_{cfg.dataset}"
    try:
        return _train(cfg, run_dir, device, callbacks, progress, until_epoch, data, compile_model)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted {_where_stopped(Run(run_dir), cfg, 'the same command (or cell)')}") from None
    except RuntimeError as e:  # under torchrun: another process ended, and a collective failed or torchrun stopped us
        if not (isinstance(e, distributed.ProcessLost) or
                distributed.launched().distributed and distributed.is_collective_failure(e)):
            raise
        distributed.ignore_sigterm()  # torchrun's SIGTERM follows: it must not cut the message short
        why = str(e) if isinstance(e, distributed.ProcessLost) else \
            f"another process of the run ended ({distributed.short_reason(e)})"
        raise distributed.ProcessLost(f"{why}; {_where_stopped(Run(run_dir), cfg, 'the same torchrun command')}"
                                      ) from None


def _where_stopped(run: Run, cfg: TrainConfig, resume: str) -> str:
    """Where a stopped run can resume from, for a one-line message."""
    try:  # the checkpoint, not history.jsonl: a stop may fall between writing the two
        done = (run.load() or {"history": [{"epoch": 0}]})["history"][-1]["epoch"]
    except (RunError, KeyError, IndexError, TypeError):
        done = 0
    if done < 1:
        return f"before epoch 1 finished: nothing was saved in {run.path} yet; {resume} starts the run again"
    return (f"in epoch {min(done + 1, cfg.epochs)}: the run stopped after epoch {done} of {cfg.epochs} (its "
            f"checkpoint is in {run.path}); {resume} resumes it")


def _train(cfg: TrainConfig, run_dir, device: str | torch.device = "auto", callbacks=(), progress: bool = True,
           until_epoch: int | None = None, data: tuple[ImageDataset, ImageDataset] | None = None,
           compile_model: bool = False) -> Run:
    """`train` without the Ctrl-C message (the arguments are `train`'s)."""
    from tqdm.auto import tqdm

    validate(cfg)
    if until_epoch is not None and until_epoch < 0:
        raise ValueError(f"until_epoch (--until-epoch) must be >= 0 (0: only the untrained epoch 0), got {until_epoch}")
    device = pick_device(device) if not isinstance(device, torch.device) else device
    ctx = distributed.launched()  # several processes only under torchrun (sslnb.distributed)
    device = distributed.process_device(device, ctx)
    world, local_batch = ctx.world_size, cfg.batch_size // ctx.world_size  # batch_size is the global batch
    if ctx.distributed:
        _check_distributed_batch(cfg, world)
    run = Run(run_dir or runs_root() / f"{cfg.method}_{cfg.dataset}")
    run.check(dataclasses.asdict(cfg))
    ctx = distributed.process_context(device)  # joins torchrun's process group; touches nothing in one process
    if ctx.distributed:  # every process must see rank 0's run folder (several machines: shared storage)
        seen = distributed.gather_objects((run.finished, run.epochs_done, (run.path / "checkpoint.pt").exists()), ctx)
        if len(set(seen)) > 1:
            raise RunError(f"the processes see different contents in {run.path} (finished, epochs, checkpoint per "
                           f"rank: {seen}); with several machines the run folder must be on storage they all share "
                           "(--run-dir on a network file system)")
    if run.finished:
        if ctx.main:
            print(f"{run.path} is already finished ({run.epochs_done} epochs): nothing to train")
        return run
    progress, callbacks = progress and ctx.main, callbacks if ctx.main else ()  # rank 0 talks and evaluates
    amp_dtype = pick_precision(device)
    channels_last = device.type == "cuda"
    seed_everything(cfg.seed)  # the same in every process: the same initial model

    # data on the device; the supervised baseline may see only a fraction of the labels. Under torchrun
    # each machine's first process loads (and downloads CIFAR, if needed) before the others read it.
    if ctx.distributed and ctx.local_rank != 0:
        distributed.barrier(ctx)
    train_ds, test_ds = data or load_dataset(cfg.dataset, cfg.data_root, cfg.image_size)
    if ctx.distributed and ctx.local_rank == 0:
        distributed.barrier(ctx)
    n_fit = (len(labelled_subset(train_ds, fraction=cfg.label_fraction, seed=cfg.seed)) if cfg.label_fraction < 1
             else len(train_ds))
    if cfg.batch_size > n_fit:  # checked before writing, like everything that can be
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n_fit} images); "
                         f"valid: 2 to {n_fit}")
    if ctx.main:
        run.prepare({**dataclasses.asdict(cfg), "world_size": world})  # only now: a failed load leaves no run
    distributed.barrier(ctx)
    mean, std = train_ds.mean_std()
    if ctx.distributed:  # each process trains on its shard; rank 0 alone keeps the whole set for the kNN bank
        fit_ds = labelled_subset(train_ds, fraction=cfg.label_fraction, seed=cfg.seed) if cfg.label_fraction < 1 \
            else train_ds
        fit_ds = fit_ds.subset(torch.arange(ctx.rank, len(fit_ds) // world * world, world)).to(device)
        bank_ds, test_ds = (train_ds.to(device), test_ds.to(device)) if ctx.main else (None, None)
        if ctx.main:
            print(f"{world} processes x {local_batch} images = a global batch of {cfg.batch_size} "
                  f"(lr {cfg.lr:g}{' x batch/256' if cfg.lr_batch_scaling else ''} is the global batch's); "
                  f"{len(fit_ds)} training images per process")
    else:
        bank_ds = train_ds.to(device)
        fit_ds = labelled_subset(bank_ds, fraction=cfg.label_fraction, seed=cfg.seed) if cfg.label_fraction < 1 \
            else bank_ds
        test_ds = test_ds.to(device)
    views = augment.train_views(cfg.method, mean, std, cfg.image_size, cfg.crop_scale)
    plain = augment.eval_transform(mean, std, cfg.image_size)

    model = build_method(cfg.method, cfg.backbone, cfg.width, train_ds.num_classes, **cfg.method_kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.lr * cfg.batch_size / 256 if cfg.lr_batch_scaling else cfg.lr
    fp16 = amp_dtype == torch.float16  # a loss scaler, and optimizers that take its inf check on the device
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, base_lr, cfg.momentum, cfg.weight_decay, fused=fp16)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    # batch order and augmentations: the run's seed in one process; its own stream in each of several
    gen = torch.Generator(device).manual_seed(distributed.rank_seed(cfg.seed, ctx.rank))
    steps = len(fit_ds) // local_batch  # every shard has the same size, so every process the same steps
    total_steps, warmup_steps = cfg.epochs * steps, cfg.warmup_epochs * steps

    def end_of_epoch(epoch: int, record: dict, evaluated: torch.nn.Module = model) -> dict:
        end = EpochEnd(epoch, evaluated, record, bank_ds, test_ds, plain, device)
        for cb in callbacks:
            record.update(_plain(cb(end) or {}))
        return record

    # starts measuring what other processes take of the CPU; not with --compile, whose CPU kernels fix their threads
    cpu_threads = SharedCpuThreads(device, enabled=not compile_model)

    # resume, or start with epoch 0: the untrained backbone
    ckpt = run.load(map_location="cpu")  # RNG states must stay CPU tensors; weights are copied to the device
    if ckpt is not None:
        saved_world = (run.config or {}).get("world_size", 1)
        if saved_world != world:
            raise RunError(f"{run.path} was trained by {saved_world} process(es) and this launch has {world}: "
                           f"resume it with {saved_world} (each process's random streams and batch-norm statistics "
                           f"belong to the run), or start a new run folder")
        if ctx.main:
            print(f"resuming {run.path} after epoch {ckpt['history'][-1]['epoch']} of {cfg.epochs}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:  # absent when the run began without fp16
            scaler.load_state_dict(ckpt["scaler"])
        history = ckpt["history"]
        rng = ckpt["rng_ranks"][ctx.rank] if ctx.distributed else ckpt["rng"]
        _set_rng_states(rng, gen, device, distributed.rank_seed(cfg.seed, ctx.rank), history[-1]["epoch"])
    else:
        history = [{"epoch": 0}]
        if ctx.main:
            # epoch 0: the untrained network, its BN statistics measured on the data like every later epoch's;
            # `knn_top1_init_bn` keeps the score with BN's initial statistics (an unnormalised random network)
            untrained = untrained_as_evaluated(model, bank_ds.images, plain, amp_dtype)
            record = {"epoch": 0, "lr": 0.0, **_evaluate(untrained, bank_ds, test_ds, plain, cfg, amp_dtype),
                      "knn_top1_init_bn": _evaluate(model, bank_ds, test_ds, plain, cfg, amp_dtype)["knn_top1"]}
            history = [end_of_epoch(0, record, untrained)]
            del untrained
            run.write_history(history)
    forward = model
    if ctx.distributed:  # after epoch 0 was evaluated by rank 0 alone: a synchronised BN there would wait for the rest
        forward = distributed.wrap(model, device, METHODS[cfg.method].cls.sync_batchnorm)
    if compile_model:  # the weights stay `model`'s: checkpoints and evaluation never see the compiled wrapper
        forward = torch.compile(forward)
    shown_loss = _LossForDisplay(device)
    start = history[-1]["epoch"] + 1
    last = cfg.epochs if until_epoch is None else min(cfg.epochs, until_epoch)

    try:
        for epoch in range(start, last + 1):
            peak_memory_mb(device, reset=True)  # each epoch's record holds its own peak
            model.train()
            sums: dict[str, torch.Tensor] = {}
            tic, shown = time.perf_counter(), 0.0
            bar = tqdm(iterate_batches(fit_ds, local_batch, generator=gen), total=steps,
                       desc=f"{cfg.method} epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
            for i, (images, labels) in enumerate(bar):
                lr = set_lr(optimizer, (epoch - 1) * steps + i, total_steps, warmup_steps, base_lr, cfg.final_lr)
                cpu_threads.update()  # a CPU shared with busy processes: only the free cores
                x = views(images, generator=gen)
                if channels_last:
                    x = [v.contiguous(memory_format=torch.channels_last) for v in x]
                terms = train_step(model, optimizer, scaler, x, labels, amp_dtype, forward)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                if progress and time.perf_counter() - shown > 0.5:  # twice a second, without waiting for a GPU
                    loss = shown_loss.swap(terms["loss"])
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}")
                    shown = time.perf_counter()
            bar.close()
            if ctx.distributed:  # the mean over every process's batches: what one process on the global batch reports
                sums = {k: distributed.mean_over_processes(v) for k, v in sums.items()}
            means = {k: float(v / steps) for k, v in sums.items()}  # one sync per epoch
            seconds = time.perf_counter() - tic
            if not math.isfinite(means["loss"]):
                kept = (f"keeps its last good checkpoint (epoch {epoch - 1}) in {run.path}"
                        if (run.path / "checkpoint.pt").exists() else
                        f"no epoch finished, so no checkpoint was written (a corrected command may reuse {run.path})")
                raise NonFiniteLoss(f"{cfg.method}: the loss became {means['loss']} in epoch {epoch}; the run stops "
                                    f"and {kept}; lower the lr (it was {base_lr:g}) or check the data")
            rng = _rng_states(gen, device)
            rng_ranks = distributed.gather_objects(rng, ctx) if ctx.distributed else None
            if ctx.main:  # rank 0: evaluate, record, then snapshots and the checkpoint
                tic_eval = time.perf_counter()
                record = {"epoch": epoch, **means, "lr": lr,
                          **_evaluate(model, bank_ds, test_ds, plain, cfg, amp_dtype)}
                record.update(epoch_time=seconds, images_per_s=steps * cfg.batch_size / seconds,
                              eval_time=time.perf_counter() - tic_eval,
                              peak_memory_mb=peak_memory_mb(device), device_name=device_name(device))  # measured cost
                history.append(end_of_epoch(epoch, record))

                # snapshots first, then the checkpoint that says they exist
                if epoch in cfg.snapshot_epochs:
                    run.save(model.backbone.state_dict(), f"backbone_epoch{epoch:03d}.pt")
                if record["knn_top1"] >= max(h["knn_top1"] for h in history[1:]):
                    run.save(model.backbone.state_dict(), "backbone_best.pt")
                if epoch == cfg.epochs:
                    run.save(model.backbone.state_dict(), "backbone.pt")
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                        "rng": rng, "history": history}
                if rng_ranks is not None:
                    ckpt["rng_ranks"] = rng_ranks  # every process's streams: a resumed run goes on as if never stopped
                run.save(ckpt)
                run.write_history(history)
            distributed.barrier(ctx)  # the others wait for rank 0's evaluation and checkpoint
    finally:
        cpu_threads.restore()
    return run


def _check_distributed_batch(cfg: TrainConfig, world: int) -> None:
    """The global batch must split evenly into the processes, and each share must suit the method."""
    if cfg.batch_size % world or cfg.batch_size // world < 2:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch and must split into {world} processes of "
                         f"at least 2 images each; valid: a multiple of {world}, at least {2 * world}")
    try:
        METHODS[cfg.method].cls.check_batch(cfg.batch_size // world, cfg.method_kwargs)
    except ValueError as e:
        raise ValueError(f"with {world} processes each trains on batch_size / {world} = {cfg.batch_size // world} "
                         f"images: {e}") from None


def load_or_train(cfg: TrainConfig, name: str | None = None, root=None, quick: bool = False, **kwargs) -> Run:
    """The notebooks' training cell: load a finished run with this config, resume a partial one,
    otherwise train. A run with a different config under the same name is refused."""
    path = Path(root or runs_root(quick)) / (name or f"{cfg.method}_{cfg.dataset}")
    run = Run(path)
    if run.config is not None and run.check(dataclasses.asdict(cfg)) and run.finished:  # raises if it differs
        print(f"loaded the finished run {path} ({run.epochs_done} epochs)")
        return run
    return train(cfg, path, **kwargs)  # says when it resumes


__all__ = ["TrainConfig", "default_config", "validate", "train", "load_or_train", "pick_device", "pick_precision",
           "seed_everything", "EpochEnd", "NonFiniteLoss", "Interrupted", "RunError"]
