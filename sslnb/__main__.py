"""The command line: `python -m sslnb pretrain ...` and `python -m sslnb evaluate ...`.

A user's mistake (an unknown method or dataset, a missing folder, a corrupt checkpoint, a
batch of one) ends with one line naming what is wrong and what is valid, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .evaluate import PROBES
    from .methods import METHODS
    from .models import BACKBONES
    from .optim import OPTIMIZERS

    quick = os.environ.get("SSLNB_QUICK") == "1"
    p = _Parser(prog="python -m sslnb", description="Self-supervised pretraining and evaluation on CIFAR.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pre = sub.add_parser("pretrain", help="train (or resume) a run")
    pre.add_argument("--method", required=True, choices=list(METHODS), metavar="METHOD",
                     help=f"one of: {', '.join(METHODS)}")
    pre.add_argument("--dataset", choices=list(DATASETS), metavar="DATASET",
                     help=f"one of: {', '.join(DATASETS)} (default: cifar10; digits in quick mode)")
    pre.add_argument("--data-root", help="CIFAR download folder, or a folder with train/<class>/ and test/<class>/")
    pre.add_argument("--backbone", choices=list(BACKBONES), metavar="BACKBONE", help=f"one of: {', '.join(BACKBONES)}")
    pre.add_argument("--width", type=int, help="base channels of the ResNet (64: standard)")
    pre.add_argument("--epochs", type=int)
    pre.add_argument("--batch-size", type=int)
    pre.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default: the method's (LARS for VICReg, else SGD)")
    pre.add_argument("--lr", type=float, help="base learning rate (before any batch-size scaling)")
    pre.add_argument("--lr-batch-scaling", action=argparse.BooleanOptionalAction,
                     help="scale the lr by batch_size / 256 (default: the method's)")
    pre.add_argument("--weight-decay", type=float)
    pre.add_argument("--warmup-epochs", type=int)
    pre.add_argument("--image-size", type=int, help="images are resized to this (default 32)")
    pre.add_argument("--crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     help="random-resized-crop scale of the method's views (default: the method's)")
    pre.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a method hyper-parameter, e.g. queue_size=1024 (MoCo) or use_predictor=false (SimSiam)")
    pre.add_argument("--run-dir", help="the run directory (default: runs/<method>_<dataset>)")
    pre.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    pre.add_argument("--seed", type=int)
    pre.add_argument("--until-epoch", type=int, help="stop after this epoch (resume later)")
    pre.add_argument("--quick", action="store_true", default=quick,
                     help="seconds on a CPU: digits, a tiny backbone, 2 epochs (default when SSLNB_QUICK=1)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser("evaluate", help="evaluate a run's backbone; prints one JSON object")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--protocol", default="knn", choices=["knn", "linear", "finetune"])
    ev.add_argument("--probe", default="thesis", choices=list(PROBES), help="linear-probe settings (thesis or vicreg)")
    ev.add_argument("--weights", default="backbone.pt", help="which backbone file of the run (backbone_best.pt, ...)")
    ev.add_argument("--epochs", type=int, help="override the protocol's epochs")
    ev.add_argument("--cached", action="store_true",
                    help="linear probe on features extracted once, without augmentation (fast)")
    ev.add_argument("--label-fraction", type=float, default=1.0, help="fine-tuning: fraction of the labels")
    ev.add_argument("--data-root", help="override the run's data root")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--no-progress", action="store_true")
    return p


def _options(pairs: list[str]) -> dict:
    """`["queue_size=1024", "use_predictor=false"]` -> {"queue_size": 1024, "use_predictor": False}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null") else value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def pretrain(args) -> dict:
    from .train import default_config, train

    cfg = default_config(args.method, quick=args.quick, dataset=args.dataset, data_root=args.data_root,
                         backbone=args.backbone, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                         optimizer=args.optimizer, lr=args.lr, lr_batch_scaling=args.lr_batch_scaling,
                         weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                         image_size=args.image_size, seed=args.seed,
                         crop_scale=tuple(args.crop_scale) if args.crop_scale else None,
                         method_kwargs=_options(args.option))
    from .runs import runs_root

    run_dir = args.run_dir or runs_root(args.quick) / f"{cfg.method}_{cfg.dataset}"
    run = train(cfg, run_dir, device=args.device, progress=not args.no_progress, until_epoch=args.until_epoch)
    last = run.history[-1]
    return {"run_dir": str(run.path), "epochs_done": last["epoch"], "knn_top1": last["knn_top1"],
            "knn_top1_epoch0": run.history[0]["knn_top1"], "finished": run.finished}


def evaluate(args) -> dict:
    from . import evaluate as ev
    from .augment import eval_transform
    from .data import load_dataset
    from .runs import Run, RunError
    from .train import pick_device

    run = Run(args.run_dir)
    cfg = run.config
    if cfg is None:
        raise RunError(f"{args.run_dir} is not a run directory (no config.json); pretrain first")
    device = pick_device(args.device)
    backbone = run.load_backbone(args.weights, device)
    train, test = load_dataset(cfg["dataset"], args.data_root or cfg["data_root"], cfg["image_size"])
    mean, std = train.mean_std()
    train, test = train.to(device), test.to(device)
    extra = {"epochs": args.epochs} if args.epochs is not None else {}
    out = {"run_dir": str(run.path), "weights": args.weights, "protocol": args.protocol}
    if args.protocol == "knn":
        out.update(k=cfg["knn_k"], t=cfg["knn_t"],
                   top1=ev.knn_eval(backbone, train, test, eval_transform(mean, std, cfg["image_size"]),
                                    cfg["knn_k"], cfg["knn_t"]))
    elif args.protocol == "linear":
        res = ev.linear_probe(backbone, train, test, args.probe, mean, std, progress=not args.no_progress,
                              cached=args.cached, **extra)
        out.update(probe=args.probe, cached=args.cached, top1=res["top1"], best_top1=res["best_top1"],
                   settings=res["settings"])
    else:
        res = ev.finetune(backbone, train, test, args.label_fraction, mean, std, progress=not args.no_progress, **extra)
        out.update(label_fraction=args.label_fraction, top1=res["top1"], best_top1=res["best_top1"],
                   settings=res["settings"])
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .runs import RunError
    from .train import NonFiniteLoss

    try:
        out = pretrain(args) if args.command == "pretrain" else evaluate(args)
    except (ValueError, RunError, OSError) as e:  # OSError: a run dir that is a file, unwritable, ...
        print(f"python -m sslnb {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except NonFiniteLoss as e:
        print(f"python -m sslnb {args.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
