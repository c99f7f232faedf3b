"""What the per-epoch kNN monitor of sslnb.train costs as its feature bank grows.

After every epoch sslnb.train embeds the whole (un-augmented) training set as the kNN bank and
the test set, then classifies the test set by a weighted kNN vote (sslnb.evaluate). This times
the three parts separately for banks of --banks images (5k, 20k, 50k by default) and a test set
of --test-images (10k), with a random ResNet-18 of width --width on the device, the same
precision and memory format as sslnb.train. Medians of --repeats after a warm-up. With
--epoch-seconds (a training epoch's time, e.g. from train_speed.py) it also reports the
monitor's cost as a fraction of that epoch. Not timed here: the monitor's projection of the
test features and its collapse statistics (sslnb.train's history `eval_time` has everything).

    python benchmarks/knn_cost.py                              # CPU: width 8, 1 thread
    python benchmarks/knn_cost.py --device cuda --epoch-seconds 20
    python benchmarks/knn_cost.py --banks 500 1000 --test-images 500 --out /tmp/k.json
"""
import argparse

import torch

from sslnb import augment
from sslnb.evaluate import KNN_K, KNN_T, extract_features, knn_accuracy
from sslnb.models import resnet
from sslnb.train import pick_precision, seed_everything

from common import (DEVICES, default_out, describe_machine, device_threads_width, median, print_machine,
                    synthetic_cifar, time_it, to_batch, write_json)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[5000, 20000, 50000], help="bank sizes (images)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--width", type=int, default=None, help="ResNet-18 base width (default 64 on a GPU, 8 on CPU)")
    parser.add_argument("--epoch-seconds", type=float, help="a training epoch's seconds (for the fraction)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help=", ".join(DEVICES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU default 1)")
    parser.add_argument("--out", default=default_out("knn_cost"))
    args = parser.parse_args()

    device, width = device_threads_width(parser, args)
    machine = describe_machine(device)
    amp = pick_precision(device)

    # the backbone as sslnb.train evaluates it: eval mode (extract_features sets it), channels_last on CUDA
    seed_everything(0)
    backbone = resnet("resnet18", width).to(device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    plain = augment.eval_transform()  # un-augmented, normalised: what the monitor feeds the backbone
    # like sslnb.train, the uint8 images already live on the device
    arrays, labels = synthetic_cifar(max(args.banks), seed=0)
    test_arrays, test_labels = synthetic_cifar(args.test_images, seed=1)
    images, labels = to_batch(arrays, device), torch.from_numpy(labels).to(device)
    test_images, test_labels = to_batch(test_arrays, device), torch.from_numpy(test_labels).to(device)

    def features(x):
        return extract_features(backbone, x, plain, amp_dtype=amp)

    # the test set's features do not depend on the bank: timed once
    test_s = time_it(lambda: features(test_images), args.repeats, device)
    test_feats = features(test_images)
    rows = []
    for n in args.banks:
        bank_images, bank_labels = images[:n], labels[:n]
        bank_s = time_it(lambda: features(bank_images), args.repeats, device)
        bank_feats = features(bank_images)
        knn_s = time_it(lambda: knn_accuracy(bank_feats, bank_labels, test_feats, test_labels, 10, KNN_K, KNN_T),
                        args.repeats, device)
        total = median(bank_s) + median(test_s) + median(knn_s)
        rows.append(dict(bank=n, test=args.test_images, bank_features_s=median(bank_s),
                         test_features_s=median(test_s), knn_s=median(knn_s), total_s=total,
                         fraction_of_epoch=total / args.epoch_seconds if args.epoch_seconds else None,
                         bank_features_all_s=bank_s, test_features_all_s=test_s, knn_all_s=knn_s))
        del bank_feats

    print_machine(machine)
    print(f"kNN monitor (k={KNN_K}, t={KNN_T}): random ResNet-18 width {width}, feature dim {backbone.feature_dim}, "
          f"{args.test_images} test images, batch 1024, precision {amp or 'float32'}, torch threads "
          f"{torch.get_num_threads()}, {device}; median of {args.repeats}")
    epoch = f"{'of epoch':>10}" if args.epoch_seconds else ""
    print(f"{'bank':>7}{'bank feats (s)':>16}{'test feats (s)':>16}{'kNN (s)':>10}{'total (s)':>11}{epoch}")
    for r in rows:
        frac = f"{100 * r['fraction_of_epoch']:>9.1f}%" if args.epoch_seconds else ""
        print(f"{r['bank']:>7}{r['bank_features_s']:>16.3f}{r['test_features_s']:>16.3f}{r['knn_s']:>10.3f}"
              f"{r['total_s']:>11.3f}{frac}")
    if args.epoch_seconds:
        print(f"(of epoch: total / --epoch-seconds {args.epoch_seconds:g})")

    write_json(dict(width=width, test_images=args.test_images, banks=args.banks, repeats=args.repeats,
                    epoch_seconds=args.epoch_seconds, knn_k=KNN_K, knn_t=KNN_T, precision=str(amp or "float32"),
                    threads=torch.get_num_threads(), machine=machine, results=rows), args.out)


if __name__ == "__main__":
    main()
