"""The command line: `python -m sslnb pretrain ...` and `python -m sslnb evaluate ...`.

A user's mistake (an unknown method or dataset, a missing folder, a corrupt checkpoint, a
batch of one, an option out of its range, a loss that became NaN) ends with one line naming
what is wrong and what is valid, and exit status 2; it is checked before anything is written,
so the corrected command runs in the same folder. Ctrl-C ends with one line saying where the
run stopped (exit status 130): the same command resumes it. stdout holds only the JSON result;
messages ("resuming ...", warnings) go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _method_defaults(quick: bool) -> str:
    """One line per method with the settings `pretrain` uses when an option is not given."""
    from .methods import METHODS
    from .train import default_config

    lines = [f"defaults per method{' in quick mode (SSLNB_QUICK=1 or --quick)' if quick else ''} "
             "(every option above overrides its one):"]
    for name in METHODS:
        c = default_config(name, quick=quick)
        lr = f"lr {c.lr:g}" + (" x batch/256" if c.lr_batch_scaling else "")
        warm = f", {c.warmup_epochs} warm-up epochs" if c.warmup_epochs else ""
        lines.append(f"  {name:<13} {c.dataset}, {c.backbone} width {c.width}, {c.epochs} epochs, "
                     f"batch {c.batch_size}, "
                     f"{c.optimizer} {lr}{warm}, weight decay {c.weight_decay:g}, seed {c.seed}")
    if not quick:
        lines.append("quick mode (--quick): digits, a width-8 ResNet-18 and a few epochs, seconds on a CPU")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .evaluate import PROBES
    from .methods import METHODS
    from .models import BACKBONES
    from .optim import OPTIMIZERS

    quick = os.environ.get("SSLNB_QUICK") == "1"
    p = _Parser(prog="python -m sslnb", description="Self-supervised pretraining and evaluation on CIFAR.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    method_default = "default: the method's, listed below"
    pre = sub.add_parser("pretrain", help="train (or resume) a run", epilog=_method_defaults(quick),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pre.add_argument("--method", required=True, choices=list(METHODS), metavar="METHOD",
                     help=f"one of: {', '.join(METHODS)}")
    pre.add_argument("--dataset", choices=list(DATASETS), metavar="DATASET",
                     help=f"one of: {', '.join(DATASETS)} (default: cifar10; digits in quick mode)")
    pre.add_argument("--data-root", help="CIFAR download folder, or a folder with train/<class>/ and test/<class>/ "
                                         "(not for digits, which is bundled)")
    pre.add_argument("--backbone", choices=list(BACKBONES), metavar="BACKBONE",
                     help=f"one of: {', '.join(BACKBONES)} ({method_default})")
    pre.add_argument("--width", type=int, help="base channels of the ResNet (64: standard; 8 in quick mode)")
    pre.add_argument("--epochs", type=int, help=method_default)
    pre.add_argument("--batch-size", type=int,
                     help=f"{method_default}; under torchrun the global batch, split over the processes")
    pre.add_argument("--optimizer", choices=list(OPTIMIZERS), help="default: the method's (LARS for VICReg, else SGD)")
    pre.add_argument("--lr", type=float, help=f"base learning rate, before any batch-size scaling ({method_default})")
    pre.add_argument("--lr-batch-scaling", action=argparse.BooleanOptionalAction,
                     help="scale the lr by batch_size / 256 (default: the method's)")
    pre.add_argument("--weight-decay", type=float, help=method_default)
    pre.add_argument("--warmup-epochs", type=int, help=method_default)
    pre.add_argument("--image-size", type=int, help="images are resized to this (default 32)")
    pre.add_argument("--crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     help="random-resized-crop scale of the method's views (default: the method's)")
    pre.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="a method hyper-parameter, e.g. queue_size=1024 (MoCo) or use_predictor=false (SimSiam); "
                          "repeat for several; an unknown KEY lists the method's options")
    pre.add_argument("--run-dir", help="the run directory (default: runs/<method>_<dataset>)")
    pre.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    pre.add_argument("--seed", type=int, help="default: 0")
    pre.add_argument("--until-epoch", type=int, help="stop after this epoch (resume later with the same command)")
    pre.add_argument("--quick", action="store_true", default=quick,
                     help="seconds on a CPU: digits, a tiny backbone, a few epochs (default when SSLNB_QUICK=1)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--compile", action="store_true",
                     help="torch.compile the training step (for a GPU's long run; compiling takes minutes; its gain is not "
                          "measured here)")

    ev = sub.add_parser("evaluate", help="evaluate a run's backbone; prints one JSON object")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--protocol", default="knn", choices=["knn", "linear", "finetune"])
    ev.add_argument("--probe", choices=list(PROBES),
                    help="--protocol linear: the probe's settings, thesis or vicreg (default: thesis)")
    ev.add_argument("--weights", default="backbone.pt", help="which backbone file of the run (backbone_best.pt, ...)")
    ev.add_argument("--epochs", type=int, help="--protocol linear or finetune: override the protocol's epochs")
    ev.add_argument("--cached", action="store_true",
                    help="--protocol linear: train on features extracted once, without augmentation (fast)")
    ev.add_argument("--label-fraction", type=float,
                    help="--protocol finetune: fraction of the labels (default: 1)")
    ev.add_argument("--data-root", help="override the run's data root")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--no-progress", action="store_true")
    return p


def _value(text: str):
    """A value as people write it: 0.2, .2, 1e-3, true, False, none, [512, 128], 512,128, or a word."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = float(text)  # .2, 5., nan, inf
        except ValueError:  # 512,128 or (512, 128): a tuple of numbers, else the word itself
            parts = [p.strip() for p in text.strip("()[]").split(",")]
            values = [_value(p) for p in parts] if len(parts) > 1 and all(parts) else []
            return tuple(values) if values and not any(isinstance(v, str) for v in values) else text
    return tuple(value) if isinstance(value, list) else value


def _options(pairs: list[str]) -> dict:
    """`["queue_size=1024", "use_predictor=false"]` -> {"queue_size": 1024, "use_predictor": False}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--option expects KEY=VALUE (e.g. --option temperature=0.2), got {pair!r}")
        out[key] = _value(value)
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
    run = train(cfg, run_dir, device=args.device, progress=not args.no_progress, until_epoch=args.until_epoch,
                compile_model=args.compile)
    last = run.history[-1]
    return {"run_dir": str(run.path), "epochs_done": last["epoch"], "knn_top1": _pct(last["knn_top1"]),
            "knn_top1_epoch0": _pct(run.history[0]["knn_top1"]), "finished": run.finished}


def _pct(x):
    """An accuracy in % as printed: two decimals (a test set of 10,000 images resolves 0.01%)."""
    return round(x, 2) if isinstance(x, float) and math.isfinite(x) else x


# which protocol each evaluate option belongs to: another protocol would ignore it silently
_PROTOCOL_OPTIONS = {"probe": ("linear",), "cached": ("linear",), "label_fraction": ("finetune",),
                     "epochs": ("linear", "finetune")}


def _check_protocol_options(args) -> None:
    for name, protocols in _PROTOCOL_OPTIONS.items():
        if getattr(args, name) not in (None, False) and args.protocol not in protocols:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to --protocol {' or '.join(protocols)}, not {args.protocol}; "
                             f"drop it or choose that protocol")


def evaluate(args) -> dict:
    from . import evaluate as ev
    from .augment import eval_transform
    from .data import load_dataset
    from .runs import Run, RunError
    from .train import pick_device

    _check_protocol_options(args)
    run = Run(args.run_dir)
    cfg = run.require("dataset", "data_root", "image_size", "backbone", "width", "knn_k", "knn_t")
    if args.data_root and cfg["dataset"] == "digits":
        raise ValueError("--data-root does not apply to a digits run (digits is bundled with scikit-learn); drop it")
    device = pick_device(args.device)
    backbone = run.load_backbone(args.weights, device)
    try:
        train, test = load_dataset(cfg["dataset"], args.data_root or cfg["data_root"], cfg["image_size"])
    except ValueError as e:
        if args.data_root or cfg["dataset"] == "digits":
            raise
        raise ValueError(f"{e}; if the run's data moved, pass its new folder: evaluate --data-root PATH") from None
    mean, std = train.mean_std()
    train, test = train.to(device), test.to(device)
    extra = {"epochs": args.epochs} if args.epochs is not None else {}
    out = {"run_dir": str(run.path), "weights": args.weights, "protocol": args.protocol}
    if args.protocol == "knn":
        out.update(k=cfg["knn_k"], t=cfg["knn_t"],
                   top1=_pct(ev.knn_eval(backbone, train, test, eval_transform(mean, std, cfg["image_size"]),
                                         cfg["knn_k"], cfg["knn_t"])))
    elif args.protocol == "linear":
        probe = args.probe or "thesis"
        res = ev.linear_probe(backbone, train, test, probe, mean, std, progress=not args.no_progress,
                              cached=args.cached, **extra)
        out.update(probe=probe, cached=args.cached, top1=_pct(res["top1"]), best_top1=_pct(res["best_top1"]),
                   settings=res["settings"])
    else:
        fraction = 1.0 if args.label_fraction is None else args.label_fraction
        res = ev.finetune(backbone, train, test, fraction, mean, std, progress=not args.no_progress, **extra)
        out.update(label_fraction=fraction, top1=_pct(res["top1"]), best_top1=_pct(res["best_top1"]),
                   settings=res["settings"])
    return out


def main(argv=None) -> int:
    """Run one command; stdout gets only its JSON result, every message goes to stderr. Under
    torchrun every process runs this; rank 0 prints the result, each names itself in messages."""
    args = _parser().parse_args(argv)
    from .distributed import ProcessLost, ignore_sigterm, launched
    from .runs import RunError
    from .train import NonFiniteLoss

    prog = f"python -m sslnb {args.command}"
    try:
        ctx = launched()
    except ValueError as e:  # torchrun's variables, set by hand and wrong
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    prog += f" (process {ctx.rank} of {ctx.world_size})" if ctx.distributed else ""
    stdout, show = sys.stdout, warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(f"{prog}: warning: {message}", file=sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # "resuming ...", progress notes: not the JSON
            out = pretrain(args) if args.command == "pretrain" else evaluate(args)
    except (ValueError, RunError, OSError, NonFiniteLoss, ProcessLost) as e:  # OSError: a full disk...
        ignore_sigterm()  # under torchrun: say why, then go; the SIGTERM that follows changes nothing
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: where the run stopped and how to resume, in one line
        ignore_sigterm()
        print(f"{prog}: {' '.join(str(e).split()) or 'interrupted; the same command starts again'}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show
    if ctx.main:
        print(json.dumps(out), file=stdout)
    return 0


def _exit(status: int) -> None:
    """Exit; a process of a torchrun launch leaves the process group and skips the interpreter's
    teardown, where gloo's threads may still hold tensors whose destructors need the GIL (about
    one exit in 30 aborted there with SIGABRT; pytorch/pytorch#179291): its work is on disk."""
    from .distributed import finish, launched

    try:
        several = launched().distributed
    except ValueError:  # already reported by main
        several = False
    if several:
        with contextlib.suppress(Exception):
            finish()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    _exit(main())
