"""How much faster are sslnb's batched augmentations than torchvision/PIL image by image?

Times producing the TWO views of a batch of CIFAR-sized images for the thesis and the
VICReg pipelines: (a) `sslnb.augment.two_views(method)` on a uint8 batch on the device,
(b) the same settings as torchvision/PIL transforms applied image by image to uint8 HWC
arrays and stacked into a batch, as a DataLoader worker would do. Reports medians over
repeats and the ratio (b)/(a); writes benchmarks/results/augment_speed.json.

    python benchmarks/augment_speed.py                  # 1 CPU thread, batch 512
    python benchmarks/augment_speed.py --device cuda    # (a) on the GPU, (b) on the CPU

--malloc-tuned raises glibc's mmap and trim thresholds first. By default every tensor of
>= 128 KiB that is freed goes back to the OS, so the next one page-faults again: on some
machines (VMs) that costs more than the arithmetic of (a). PIL's small images never hit it.
"""
import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from sslnb import augment

PIPELINES = {"thesis (byol)": "byol", "vicreg": "vicreg"}


def tune_malloc() -> bool:
    """Keep freed large blocks in the process (glibc only): M_TRIM_THRESHOLD=-1,
    M_MMAP_THRESHOLD=-3."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 * 2**20) and libc.mallopt(-1, 2**30))
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_it(fn, repeats: int, device=None) -> list:
    fn()  # warm-up: allocations, lazy imports, kernel selection
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="device of the batched pipeline")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--malloc-tuned", action="store_true")
    parser.add_argument("--out", default=Path(__file__).parent / "results" / "augment_speed.json")
    args = parser.parse_args()

    malloc_tuned = tune_malloc() if args.malloc_tuned else False
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)  # as CIFAR stores it
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(device)

    rows = []
    for label, method in PIPELINES.items():
        views = augment.two_views(method)
        views(batch)  # the first call's faults (fresh heap) are not the steady state
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ours = time_it(lambda: views(batch), args.repeats, device)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (args.repeats + 1)
        references = [augment.torchvision_reference(c) for c in augment.METHOD_VIEWS[method]]

        def reference_batch():
            outs = [[ref(Image.fromarray(a)) for ref in references] for a in arrays]
            return [torch.stack(view) for view in zip(*outs)]  # the DataLoader's collate

        theirs = time_it(reference_batch, args.repeats)
        a, b = statistics.median(ours), statistics.median(theirs)
        rows.append(dict(pipeline=label, method=method, batched_s=a, torchvision_s=b,
                         ratio=b / a, batched_all_s=ours, torchvision_all_s=theirs,
                         batched_page_faults=faults))

    print(f"two views of {args.batch} 32x32 images; batched on {device}, torchvision/PIL on "
          f"the CPU; torch threads {args.threads}; malloc tuned: {malloc_tuned}; "
          f"median of {args.repeats}")
    print(f"{'pipeline':<15}{'batched (ms)':>14}{'torchvision (ms)':>18}{'ratio':>8}"
          f"{'page faults/call':>18}")
    for r in rows:
        print(f"{r['pipeline']:<15}{1e3 * r['batched_s']:>14.1f}"
              f"{1e3 * r['torchvision_s']:>18.1f}{r['ratio']:>7.1f}x{r['batched_page_faults']:>18.0f}")

    result = dict(batch=args.batch, repeats=args.repeats, threads=args.threads,
                  device=str(device), malloc_tuned=malloc_tuned, results=rows,
                  torch=torch.__version__, torchvision=torchvision.__version__,
                  python=platform.python_version(), machine=platform.machine(),
                  cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                  command=" ".join(sys.argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
