"""How much faster are sslnb's batched augmentations than torchvision/PIL image by image?

Times producing the TWO views of CIFAR-sized images for the thesis (BYOL) and the VICReg
pipelines, all in one run:
  (a) ours: `sslnb.augment.two_views(method)` on a uint8 batch on the device, with --threads
      torch threads, and again with 2 threads on a CPU with >= 2 cores;
  (b) the same settings as torchvision/PIL transforms (`augment.torchvision_reference`) applied
      image by image to uint8 HWC arrays in the main process and stacked into a batch (what a
      DataLoader's collate does), on a batch of --batch images;
  (c) that torchvision/PIL pipeline behind a `torch.utils.data.DataLoader` with 0, 1 and 2
      workers (batch --batch, persistent workers, whole passes over --loader-images images after
      an untimed warm-up pass, each batch copied to the device).
Reports medians over --repeats and the ratios, and writes benchmarks/results/augment_speed.json.

    python benchmarks/augment_speed.py                   # 1 CPU thread, batch 512
    python benchmarks/augment_speed.py --malloc-tuned    # glibc keeps freed blocks (see below)
    python benchmarks/augment_speed.py --device cuda     # (a) on the GPU, (b) and (c) on the CPU
    python benchmarks/augment_speed.py --batch 128 --loader-images 1024 --repeats 3 --out /tmp/a.json

--malloc-tuned raises glibc's mmap and trim thresholds first. By default every tensor of
>= 128 KiB that is freed goes back to the OS, so the next one page-faults again: on some
machines (VMs) that costs more than the arithmetic of (a). PIL's small images never hit it.
"""
import argparse
import ctypes
import os
import resource

import torch
from PIL import Image

from sslnb import augment

from common import (DEVICES, default_out, describe_machine, loader_pass, make_loader, median, parse_device,
                    print_machine, synthetic_cifar, time_it, to_batch, TwoViewDataset, write_json)

PIPELINES = {"thesis (byol)": "byol", "vicreg": "vicreg"}


def tune_malloc() -> bool:
    """Keep freed large blocks in the process (glibc only): M_TRIM_THRESHOLD=-1,
    M_MMAP_THRESHOLD=-3."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 * 2**20) and libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for ours (and the main process)")
    parser.add_argument("--device", default="cpu", help=f"device of ours: {', '.join(DEVICES)} (default cpu)")
    parser.add_argument("--batch", type=int, default=512, help="images per batch, also the DataLoader's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader settings to time")
    parser.add_argument("--loader-images", type=int, default=4096, help="images per timed DataLoader pass")
    parser.add_argument("--malloc-tuned", action="store_true")
    parser.add_argument("--out", default=default_out("augment_speed"))
    args = parser.parse_args()
    if args.loader_images < args.batch:
        parser.error(f"--loader-images ({args.loader_images}) must be at least --batch ({args.batch})")

    malloc_tuned = tune_malloc() if args.malloc_tuned else False  # first: workers forked later inherit it
    torch.set_num_threads(args.threads)
    device = parse_device(parser, args.device)
    machine = describe_machine(device)
    arrays, labels = synthetic_cifar(max(args.batch, args.loader_images))
    batch = to_batch(arrays[:args.batch], device)
    # ours again with 2 threads where 2 cores exist (a GPU does not use them: no second row there)
    second = device.type == "cpu" and os.cpu_count() >= 2 and args.threads != 2
    thread_settings = [args.threads] + ([2] if second else [])

    rows, speed_rows = [], []
    for label, method in PIPELINES.items():
        # (a) ours; the first call's page faults (fresh heap) are not the steady state
        views = augment.two_views(method)
        views(batch)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ours = time_it(lambda: views(batch), args.repeats, device)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.repeats + 1)
        ours_by_threads = {args.threads: ours}
        for threads in thread_settings[1:]:
            torch.set_num_threads(threads)
            ours_by_threads[threads] = time_it(lambda: views(batch), args.repeats, device)
        torch.set_num_threads(args.threads)  # the baselines' main process runs as set

        # (b) torchvision/PIL image by image in this process, the views stacked as collate would
        references = [augment.torchvision_reference(c) for c in augment.METHOD_VIEWS[method]]

        def reference_batch():
            outs = [[ref(Image.fromarray(a)) for ref in references] for a in arrays[:args.batch]]
            return [torch.stack(view) for view in zip(*outs)]

        theirs = time_it(reference_batch, args.repeats)
        a, b = median(ours), median(theirs)
        rows.append(dict(pipeline=label, method=method, batched_s=a, torchvision_s=b,
                         ratio=b / a, batched_all_s=ours, torchvision_all_s=theirs,
                         batched_page_faults=faults))

        # (c) the same pipeline behind a DataLoader; the warm-up pass starts the persistent workers
        dataset = TwoViewDataset(arrays[:args.loader_images], labels[:args.loader_images], method)
        loaders = {}
        for workers in args.workers:
            loader = make_loader(dataset, args.batch, workers, device)
            passes = time_it(lambda: loader_pass(loader, device), args.repeats, device)
            n = (args.loader_images // args.batch) * args.batch  # drop_last
            loaders[workers] = dict(images_per_pass=n, pass_s=passes, images_per_s=n / median(passes))
            del loader  # shuts its workers down before the next setting starts its own
        ours_ips = {t: args.batch / median(ts) for t, ts in ours_by_threads.items()}
        for t, ips in ours_ips.items():
            speed_rows.append(dict(pipeline=label, method=method, what=f"ours, {t} thread{'s' * (t > 1)}",
                                   images_per_s=ips, call_s=ours_by_threads[t]))
        speed_rows.append(dict(pipeline=label, method=method, what="torchvision/PIL, main process, image by image",
                               images_per_s=args.batch / b, call_s=theirs))
        for workers, r in loaders.items():
            speed_rows.append(dict(pipeline=label, method=method, what=f"torchvision/PIL, DataLoader {workers} workers",
                                   workers=workers, images_per_s=r["images_per_s"], pass_s=r["pass_s"],
                                   images_per_pass=r["images_per_pass"],
                                   ours_ratio={f"{t} threads": ips / r["images_per_s"] for t, ips in ours_ips.items()}))

    print_machine(machine)
    print(f"two views of {args.batch} 32x32 images; batched on {device}, torchvision/PIL on "
          f"the CPU; torch threads {args.threads}; malloc tuned: {malloc_tuned}; "
          f"median of {args.repeats}")
    print(f"{'pipeline':<15}{'batched (ms)':>14}{'torchvision (ms)':>18}{'ratio':>8}"
          f"{'page faults/call':>18}")
    for r in rows:
        print(f"{r['pipeline']:<15}{1e3 * r['batched_s']:>14.1f}"
              f"{1e3 * r['torchvision_s']:>18.1f}{r['ratio']:>7.1f}x{r['batched_page_faults']:>18.0f}")

    print()
    print(f"images/s (two views each); DataLoader: batch {args.batch}, passes over {args.loader_images} images "
          f"after a warm-up pass, views copied to {device}; ours / DataLoader at each thread count of ours")
    header = "".join(f"{f'ours {t} thr / row':>18}" for t in thread_settings)
    print(f"{'pipeline':<15}{'what':<48}{'images/s':>10}{header}")
    for r in speed_rows:
        ratios = "".join(f"{r['ours_ratio'][f'{t} threads']:>17.1f}x" for t in thread_settings
                         if "ours_ratio" in r)
        print(f"{r['pipeline']:<15}{r['what']:<48}{r['images_per_s']:>10.0f}{ratios}")

    write_json(dict(batch=args.batch, repeats=args.repeats, threads=args.threads, ours_threads=thread_settings,
                    device=str(device), malloc_tuned=malloc_tuned, loader_images=args.loader_images,
                    workers=args.workers, machine=machine, results=rows, images_per_s=speed_rows), args.out)


if __name__ == "__main__":
    main()
