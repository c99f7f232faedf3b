"""Training throughput (images/s over whole epochs): sslnb's loop against a plain PyTorch loop.

For each method and backbone width, in one run, on random CIFAR-sized images:
  (a) sslnb.train.train: the dataset on the device, batched augmentations on the device; its
      history's `images_per_s` (the kNN monitor after each epoch is outside that time and is
      reported separately as `eval_time`);
  (b) a plain loop over the same model, optimizer, schedule, precision and memory format, fed
      by a DataLoader of the torchvision/PIL two-view pipeline with 0, 1 and 2 workers (pinned
      memory and non-blocking copies on CUDA);
  (c) the same plain loop fed views made once before timing and kept on the device: the limit
      where preparing data costs nothing.
On a CPU every contender gets the same cores (--threads, default all): (a) and (c) use them as
torch threads, (b) with W workers gives W of them to its workers and the rest (at least 1) to
its main process (2 workers on 2 cores: 1 + 2 processes, more than cores). Each contender runs
--epochs epochs; the first is a warm-up (cuDNN's search, workers starting, allocator growth)
and is excluded; images/s is the median over the others. The table's ratio is against (b)
with 1 worker. Writes benchmarks/results/train_speed.json.

    python benchmarks/train_speed.py                               # simclr, byol; width 8; all cores
    python benchmarks/train_speed.py --width 8 16 --epochs 3
    python benchmarks/train_speed.py --device cuda --width 64      # 50,000 images per epoch
    python benchmarks/train_speed.py --images 512 --epochs 2 --batch-size 128 --out /tmp/t.json
"""
import argparse
import os
import tempfile

import torch

from sslnb import augment
from sslnb.data import ImageDataset
from sslnb.train import default_config, pick_precision, train

from common import (DEVICES, default_out, describe_machine, make_loader, median, parse_device, plain_loop,
                    print_machine, synthetic_cifar, to_batch, TwoViewDataset, write_json)


def premade_views(method, images, labels, mean, std, batch_size):
    """Two views of every image, made once with sslnb's pipeline on the images' device."""
    views = augment.two_views(method, mean, std)
    x1, x2 = zip(*(views(images[i:i + batch_size]) for i in range(0, len(images), batch_size)))
    return torch.cat(x1), torch.cat(x2), labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["simclr", "byol"], choices=list(augment.METHOD_VIEWS))
    parser.add_argument("--width", type=int, nargs="+", default=[8], help="backbone base width(s), 64 = standard")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=None, help="training images (default 4096 on CPU, 50000 on CUDA)")
    parser.add_argument("--test-images", type=int, default=512, help="test images of (a)'s kNN monitor")
    parser.add_argument("--epochs", type=int, default=2, help="per contender; the first is a warm-up, not counted")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader settings of (b)")
    parser.add_argument("--device", default="auto", help=", ".join(DEVICES))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: the cores each contender gets (default: all); (b) with W workers runs its main "
                             "process on threads - W of them (at least 1)")
    parser.add_argument("--out", default=default_out("train_speed"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is a warm-up and is not counted")

    device = parse_device(parser, args.device)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    n_images = args.images or (50_000 if device.type == "cuda" else 4096)
    if args.batch_size > n_images:
        parser.error(f"--batch-size {args.batch_size} is larger than --images {n_images}")
    steps = n_images // args.batch_size  # every contender drops the last partial batch
    machine = describe_machine(device)

    arrays, labels = synthetic_cifar(n_images, seed=0)
    test_arrays, test_labels = synthetic_cifar(args.test_images, seed=1)
    classes = [str(c) for c in range(10)]
    train_ds = ImageDataset(to_batch(arrays), torch.from_numpy(labels), classes)
    test_ds = ImageDataset(to_batch(test_arrays), torch.from_numpy(test_labels), classes)
    mean, std = train_ds.mean_std()  # what sslnb.train normalises with; the baselines use the same

    rows = []
    for method in args.methods:
        for width in args.width:
            cfg = default_config(method, width=width, batch_size=args.batch_size, epochs=args.epochs,
                                 dataset="cifar10")
            print(f"{method}, width {width}: ", end="", flush=True)

            # (a) sslnb.train, in a throw-away run folder
            print("(a) sslnb.train", end="", flush=True)
            with tempfile.TemporaryDirectory() as run_dir:
                history = train(cfg, run_dir=run_dir, device=device, progress=False, data=(train_ds, test_ds)).history
            timed = [h for h in history if h["epoch"] >= 2]  # epoch 0 is the untrained model, 1 the warm-up
            rows.append(dict(method=method, width=width, pipeline="sslnb.train (data and augmentation on device)",
                             images_per_s=median([h["images_per_s"] for h in timed]),
                             epoch_s=[h["epoch_time"] for h in history[1:]],
                             knn_monitor_s=[h["eval_time"] for h in history[1:]]))

            # (b) plain loop fed by a DataLoader of the torchvision/PIL pipeline
            dataset = TwoViewDataset(arrays, labels, method, mean, std)
            for workers in args.workers:
                print(f", (b) {workers} workers", end="", flush=True)
                # equal cores: the workers take theirs from the main process's threads (on a CPU)
                main_threads = max(1, threads - workers) if device.type == "cpu" else threads
                torch.set_num_threads(main_threads)
                loader = make_loader(dataset, args.batch_size, workers, device)
                seconds, _ = plain_loop(cfg, device, lambda: iter(loader), steps)
                del loader  # stops its persistent workers before the next setting starts its own
                torch.set_num_threads(threads)
                ips = median([steps * args.batch_size / s for s in seconds[1:]])
                rows.append(dict(method=method, width=width, workers=workers, main_threads=main_threads,
                                 pipeline=f"plain loop, DataLoader {workers} workers, {main_threads} thread(s)",
                                 images_per_s=ips, epoch_s=seconds))

            # (c) plain loop fed views made before the clock starts; slices of them cost nothing
            print(", (c) pre-made views", flush=True)
            x1, x2, y = premade_views(method, train_ds.images.to(device), train_ds.labels.to(device), mean, std,
                                      args.batch_size)
            if device.type == "cuda":
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
            b = args.batch_size
            seconds, _ = plain_loop(cfg, device, lambda: ((x1[i:i + b], x2[i:i + b], y[i:i + b])
                                                       for i in range(0, steps * b, b)), steps)
            del x1, x2, y
            rows.append(dict(method=method, width=width, pipeline="plain loop, pre-made views on device",
                             images_per_s=median([steps * b / s for s in seconds[1:]]), epoch_s=seconds))

    # ratios against (b) with 1 worker of the same method and width, measured in this run
    for r in rows:
        ref = next((q for q in rows if q["method"] == r["method"] and q["width"] == r["width"]
                    and q.get("workers") == 1), None)
        r["ratio_to_loader_1_worker"] = r["images_per_s"] / ref["images_per_s"] if ref else None

    print()
    print_machine(machine)
    print(f"{n_images} random 32x32 images per epoch, batch {args.batch_size} ({steps} steps), {args.epochs} epochs "
          f"per contender, first excluded; {threads} cores per contender (DataLoader workers: 1 thread each); "
          f"precision {pick_precision(device) or 'float32'}; {device}")
    print(f"{'method':<9}{'width':>6}  {'pipeline':<56}{'img/s':>9}{'vs (b) 1 worker':>17}")
    for r in rows:
        ratio = f"{r['ratio_to_loader_1_worker']:.2f}x" if r["ratio_to_loader_1_worker"] else "n/a"
        print(f"{r['method']:<9}{r['width']:>6}  {r['pipeline']:<56}{r['images_per_s']:>9.0f}{ratio:>17}")
    for r in rows:
        if "knn_monitor_s" in r:
            print(f"{r['method']} width {r['width']}: sslnb.train's kNN monitor took "
                  f"{median(r['knn_monitor_s'][1:]):.2f} s per epoch (bank {n_images}, test {args.test_images} "
                  "images), not in its img/s")

    write_json(dict(methods=args.methods, widths=args.width, batch_size=args.batch_size, images=n_images,
                    test_images=args.test_images, epochs=args.epochs, steps_per_epoch=steps, workers=args.workers,
                    threads=threads, precision=str(pick_precision(device) or "float32"),
                    machine=machine, results=rows), args.out)


if __name__ == "__main__":
    main()
