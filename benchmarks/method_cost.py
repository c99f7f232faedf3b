"""What one training step of each method costs: time, peak memory and achieved FLOP/s.

Each method of `sslnb.methods.METHODS` at the registry's settings (`default_config(method)`:
its backbone and heads, its optimizer), with the backbone width from --width and the batch
from --batch-size. One step is what sslnb.train does per batch: the method's augmentations on
the device, forward and backward under the same precision and memory format, optimizer step,
`after_step()` (EMA targets). Timed over --repeats blocks of --steps steps after one untimed
block; the median block gives the time per step (a GPU is synchronised per block, not per step).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` from building the model to the last step
(tensors only, not the CUDA context or the allocator's cache); on a CPU the process's peak RSS
increase over its RSS at the method's start (`resource.getrusage`, the peak reset through
/proc/self/clear_refs), which includes allocator overhead and may miss memory the allocator
reused from an earlier method. FLOPs per step are `sslnb.budget`'s count (torch's
FlopCounterMode, forward and backward of the model, at batch 16, scaled to the batch; neither
the augmentations nor the optimizer are counted).

    python benchmarks/method_cost.py                       # every method; CPU: width 8, batch 64
    python benchmarks/method_cost.py --device cuda         # width 64, each method's own batch
    python benchmarks/method_cost.py --methods byol vicreg --width 16 --batch-size 128
    python benchmarks/method_cost.py --steps 2 --repeats 2 --out /tmp/m.json
"""
import argparse
import ctypes
import gc
import resource

import torch

from sslnb import augment, budget
from sslnb.methods import METHODS
from sslnb.train import default_config, pick_precision, seed_everything, validate

from common import (DEVICES, build_like_train, default_out, describe_machine, device_threads_width, median,
                    print_machine, synthetic_cifar, time_it, to_batch, write_json)


def _rss_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_rss_peak() -> bool:
    """Start a fresh peak-RSS measurement: give freed heap memory back to the OS (glibc's
    malloc_trim), then reset the kernel's high-water mark (Linux >= 4.0: writing 5 to
    clear_refs), so ru_maxrss reads this method's peak and not an earlier method's."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def flops_per_step(cfg) -> float | None:
    """Model FLOPs of one training step at cfg's batch, from sslnb.budget (None if it cannot count)."""
    try:  # a one-step "dataset" of batch_size images, no test set: the epoch's training FLOPs are one step's
        return budget.estimate(cfg, dataset_size=(cfg.batch_size, 0))["train_tflop_per_epoch"] * 1e12
    except Exception as e:  # noqa: BLE001 - a counting failure must not stop the timings
        print(f"  ({cfg.method}: no FLOP count: {type(e).__name__}: {e})")
        return None


def measure(cfg, device, images, labels, steps: int, repeats: int) -> dict:
    """Median seconds per training step and peak memory of cfg's method on `images`."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_rss_peak() if device.type == "cpu" else None
    rss_start = _rss_peak_kib()

    seed_everything(cfg.seed)
    model, optimizer, scaler, amp_dtype, _ = build_like_train(cfg, device)  # constant lr: a schedule costs nothing
    views = augment.train_views(cfg.method, size=cfg.image_size, crop_scale=cfg.crop_scale)  # CIFAR's mean/std
    gen = torch.Generator(device).manual_seed(cfg.seed)
    channels_last = device.type == "cuda"
    model.train()

    def step():
        x = views(images, generator=gen)
        if channels_last:
            x = [v.contiguous(memory_format=torch.channels_last) for v in x]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(*x, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.after_step()

    def block():
        for _ in range(steps):
            step()

    times = time_it(block, repeats, device)
    if device.type == "cuda":
        memory = dict(peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                      memory_kind="torch.cuda.max_memory_allocated (tensors)")
    elif device.type == "cpu":
        kind = ("peak RSS increase over the method's start (ru_maxrss, peak reset)" if rss_reset else
                "peak RSS increase over the process's earlier peak (ru_maxrss; could not reset it: 0 = not above)")
        memory = dict(peak_memory_mib=(_rss_peak_kib() - rss_start) / 1024, memory_kind=kind)
    else:
        memory = dict(peak_memory_mib=torch.mps.driver_allocated_memory() / 2**20,
                      memory_kind="torch.mps.driver_allocated_memory after the last step (MPS keeps no peak)")
    del model, optimizer, scaler
    return dict(step_s=median(times) / steps, block_s=times, **memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--width", type=int, default=None, help="backbone base width (default 64 on a GPU, 8 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: each method's registry batch on a GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks (after one untimed block)")
    parser.add_argument("--device", default="auto", help=", ".join(DEVICES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    parser.add_argument("--out", default=default_out("method_cost"))
    args = parser.parse_args()

    device, width = device_threads_width(parser, args)
    on_cpu = device.type == "cpu"
    machine = describe_machine(device)
    amp = pick_precision(device)

    rows = []
    for method in args.methods:
        batch = args.batch_size or (64 if on_cpu else METHODS[method].train["batch_size"])
        cfg = default_config(method, width=width, batch_size=batch, dataset="cifar10")
        try:
            validate(cfg)  # e.g. MoCo's queue must be a multiple of the keys per step
        except ValueError as e:
            print(f"{method}: skipped: {e}")
            rows.append(dict(method=method, batch_size=batch, skipped=str(e)))
            continue
        print(f"{method} ({cfg.backbone}, width {width}, batch {batch})", flush=True)
        arrays, labels = synthetic_cifar(batch, seed=0)
        images, labels = to_batch(arrays, device), torch.from_numpy(labels).to(device)
        flops = flops_per_step(cfg)
        m = measure(cfg, device, images, labels, args.steps, args.repeats)
        rows.append(dict(method=method, backbone=cfg.backbone, width=width, batch_size=batch,
                         method_kwargs=cfg.method_kwargs, optimizer=cfg.optimizer, **m,
                         images_per_s=batch / m["step_s"], flops_per_step=flops,
                         achieved_tflops=flops / m["step_s"] / 1e12 if flops else None))

    print()
    print_machine(machine)
    kind = next((r["memory_kind"] for r in rows if "memory_kind" in r), "")
    print(f"one training step (augment + forward + backward + step + after_step), median of {args.repeats} blocks of "
          f"{args.steps} steps; precision {amp or 'float32'}; torch threads {torch.get_num_threads()}; {device}")
    print(f"memory: {kind}; FLOPs: sslnb.budget's count of the model (no augmentation, no optimizer)")
    print(f"{'method':<14}{'backbone':<10}{'batch':>6}{'ms/step':>10}{'img/s':>9}{'peak MiB':>10}"
          f"{'GFLOP/step':>12}{'TFLOP/s':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:<14}skipped: {r['skipped']}")
            continue
        gflop = f"{r['flops_per_step'] / 1e9:.1f}" if r["flops_per_step"] else "n/a"
        tflops = f"{r['achieved_tflops']:.3g}" if r["achieved_tflops"] else "n/a"
        print(f"{r['method']:<14}{r['backbone']:<10}{r['batch_size']:>6}{1e3 * r['step_s']:>10.1f}"
              f"{r['images_per_s']:>9.0f}{r['peak_memory_mib']:>10.0f}{gflop:>12}{tflops:>9}")

    write_json(dict(width=width, steps=args.steps, repeats=args.repeats, precision=str(amp or "float32"),
                    threads=torch.get_num_threads(), machine=machine, results=rows), args.out)


if __name__ == "__main__":
    main()
