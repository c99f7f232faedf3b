"""No accuracy cost: a short run on real images learns as much with sslnb's batched pipeline as
with the torchvision/PIL pipeline behind a DataLoader.

For each seed, the same method, model, optimizer and lr schedule are trained on an image folder
(e.g. 5,000 / 1,000 real CIFAR-10 images in train/<class>/ and test/<class>/) twice:
  (a) sslnb.train: the data on the device, the batched augmentations;
  (b) the plain loop of benchmarks/common.py fed by a DataLoader of the same settings as
      torchvision/PIL transforms, image by image;
then both backbones are scored by the same weighted kNN on the test images (sslnb.evaluate).
The seeds give the noise: the two pipelines agree when their means differ by less than the
spread between seeds. Writes benchmarks/results/pipeline_parity.json.

    python benchmarks/pipeline_parity.py --data-root DIR
    python benchmarks/pipeline_parity.py --data-root DIR --method byol --epochs 8 --seeds 0 1 2
"""
import argparse
import statistics
import tempfile

import torch

from sslnb.augment import eval_transform
from sslnb.data import load_dataset
from sslnb.evaluate import knn_eval
from sslnb.train import default_config, train

from common import (TwoViewDataset, default_out, describe_machine, make_loader, parse_device, plain_loop,
                    print_machine, write_json)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", required=True, help="an image folder: train/<class>/*, test/<class>/*")
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of (b)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=default_out("pipeline_parity"))
    args = parser.parse_args()
    device = parse_device(parser, args.device)
    machine = describe_machine(device)

    train_ds, test_ds = load_dataset("imagefolder", args.data_root, 32)
    mean, std = train_ds.mean_std()
    plain = eval_transform(mean, std, 32)
    arrays = train_ds.images.permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, as a PIL pipeline reads them
    labels = train_ds.labels.numpy()
    steps = len(train_ds) // args.batch_size

    rows = []
    for seed in args.seeds:
        cfg = default_config(args.method, dataset="imagefolder", data_root=args.data_root, width=args.width,
                             epochs=args.epochs, batch_size=args.batch_size, seed=seed)
        with tempfile.TemporaryDirectory() as run_dir:
            history = train(cfg, run_dir, device=device, progress=False, data=(train_ds, test_ds)).history
        batched = history[-1]["knn_top1"]

        loader = make_loader(TwoViewDataset(arrays, labels, args.method, mean, std), args.batch_size, args.workers,
                             device)
        _, model = plain_loop(cfg, device, lambda: iter(loader), steps)
        del loader
        pil = knn_eval(model.backbone, train_ds.to(device), test_ds.to(device), plain, cfg.knn_k, cfg.knn_t)
        rows.append(dict(seed=seed, untrained=history[0]["knn_top1"], batched=batched, torchvision_pil=float(pil)))
        print(f"seed {seed}: kNN untrained {history[0]['knn_top1']:.2f}, batched {batched:.2f}, "
              f"torchvision/PIL {pil:.2f}", flush=True)

    def mean_sd(key):
        xs = [r[key] for r in rows]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))

    summary = {key: mean_sd(key) for key in ("untrained", "batched", "torchvision_pil")}
    print()
    print_machine(machine)
    print(f"{args.method}, ResNet-18 width {args.width}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{len(train_ds)} training / {len(test_ds)} test images from {args.data_root}; kNN top-1 (%) on the test "
          f"images, seeds {args.seeds}")
    print(f"{'seed':>5}{'untrained':>11}{'batched':>9}{'torchvision/PIL':>17}")
    for r in rows:
        print(f"{r['seed']:>5}{r['untrained']:>11.2f}{r['batched']:>9.2f}{r['torchvision_pil']:>17.2f}")
    print("mean +- sd between seeds: " + ", ".join(f"{k} {m:.2f} +- {s:.2f}" for k, (m, s) in summary.items()))
    write_json(dict(method=args.method, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                    seeds=args.seeds, data_root=str(args.data_root), train_images=len(train_ds),
                    test_images=len(test_ds), machine=machine, results=rows,
                    summary={k: {"mean": m, "sd": s} for k, (m, s) in summary.items()}), args.out)


if __name__ == "__main__":
    main()
