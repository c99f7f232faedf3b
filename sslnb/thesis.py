"""The thesis's comparison (ch. 4.4-4.6) as data: its methods, our run names, its numbers.

One table that notebook 17 and the tests share: which runs the comparison reads (the method
notebooks 10-16 make them with `default_config(method, quick=QUICK)` and these names), which
notebook makes each, and the numbers the thesis reports beside which ours are shown.
[0] the thesis (seeds/003): ResNet-18 on CIFAR-10, batch 512, 400 epochs (supervised: 200).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import plots
from .runs import Run, RunError, runs_root


@dataclass(frozen=True)
class Entry:
    """One compared run: a registry method (and label fraction), its notebook and the thesis's numbers."""

    key: str  # our name for the run's role; the run is `<key>_<dataset>`
    method: str  # the registry's method
    label: str  # the name in the thesis's tables
    notebook: str  # the notebook that trains the run
    label_fraction: float = 1.0
    knn_peak: float | None = None  # fig. 4.6: the best kNN top-1 the text gives ("around 90%"), approximate
    linear: float | None = None  # table 4.2: linear evaluation top-1 (supervised: the network's own accuracy)
    in_thesis: bool = True


ENTRIES: dict[str, Entry] = {e.key: e for e in [
    Entry("simclr", "simclr", "SimCLR", "10_simclr.ipynb", in_thesis=False),  # described, not run, by the thesis
    Entry("moco", "moco", "MoCo", "11_moco.ipynb", knn_peak=85.0, linear=82.37),
    Entry("byol", "byol", "BYOL", "12_byol.ipynb", knn_peak=90.0, linear=85.55),
    Entry("simsiam", "simsiam", "SimSiam", "13_simsiam.ipynb", knn_peak=90.0, linear=82.88),
    Entry("barlow_twins", "barlow_twins", "Barlow Twins", "14_barlow_twins.ipynb", knn_peak=80.0, linear=81.97),
    Entry("directpred", "directpred", "DirectPred", "15_directpred.ipynb", knn_peak=90.0, linear=84.43),
    Entry("supervised", "supervised", "ResNet-18 (supervised)", "16_supervised.ipynb", linear=92.34),
    Entry("supervised10", "supervised", "ResNet-18 (supervised, 10% labels)", "16_supervised.ipynb",
          label_fraction=0.1),
]}
SELF_SUPERVISED = ("simclr", "moco", "byol", "simsiam", "barlow_twins", "directpred")
COMPARED = (*SELF_SUPERVISED, "supervised")

# table 4.1: BYOL's linear probe (10 epochs) at each learning rate; the thesis then uses 0.3
PROBE_LR = {0.05: 85.3, 0.1: 85.48, 0.15: 85.48, 0.2: 85.51, 0.25: 85.52, 0.3: 85.55, 0.35: 85.7}
PROBE_LONG_GAIN = 0.5  # sec. 4.5: 50 probe epochs instead of 10 gained "only 0.5%"
# table 4.3: fine-tuning BYOL (70 epochs, lr 0.005) against a supervised ResNet-18 trained from
# scratch, on 10% and 100% of the labels
FINETUNE = {("byol", 0.1): 82.8, ("byol", 1.0): 91.66, ("supervised", 0.1): 65.7, ("supervised", 1.0): 92.34}
SOTA = ("ViT-H/14 (supervised state of the art)", 99.5)  # table 4.2's last row
EPOCH_MINUTES = (1, 3)  # sec. 4.2: "one epoch ... between one and three minutes" on Colab
BUDGET = "ResNet-18, CIFAR-10, batch 512, 400 epochs (supervised 200)"  # the thesis's, for the tables


def config(key: str, quick: bool = False, **overrides):
    """The TrainConfig the method notebooks use for this run: `default_config(method, quick=quick)`
    (with the label fraction of `supervised10`)."""
    from .train import default_config

    e = entry(key)
    if e.label_fraction != 1.0:
        overrides.setdefault("label_fraction", e.label_fraction)
    return default_config(e.method, quick=quick, **overrides)


def entry(key: str) -> Entry:
    if key not in ENTRIES:
        raise ValueError(f"unknown run {key!r}; valid: {', '.join(ENTRIES)}")
    return ENTRIES[key]


def run_name(key: str, dataset: str) -> str:
    """`byol_cifar10`, `supervised10_digits`: the names the method notebooks give their runs."""
    return f"{entry(key).key}_{dataset}"


def load_runs(keys=COMPARED, quick: bool = False, train_missing=(), root=None, progress: bool = True,
              **overrides) -> dict[str, Run]:
    """The finished runs of `keys`, by key, made with the method notebooks' configs and names.

    A run of `train_missing` (keys, or True for all) that is absent or unfinished is trained
    or resumed here (quick mode: small runs, which the earlier notebooks of the same test
    session have usually made already); any other missing run is left out with a message
    naming the notebook that makes it, so the comparison goes on with the runs there are.
    A run made with another config is left out too, with the difference.
    """
    from .train import load_or_train

    runs = {}
    for key in keys:
        cfg = config(key, quick=quick, **overrides)
        name = run_name(key, cfg.dataset)
        path = Path(root or runs_root(quick)) / name
        try:
            if train_missing is True or key in (train_missing or ()):
                runs[key] = load_or_train(cfg, name=name, root=root, quick=quick, progress=progress)
                continue
            run = Run(path)
            if run.config is None:
                print(f"missing: {name} is not in {path.parent}; run notebooks/{entry(key).notebook} first "
                      f"(it trains and saves it). Left out below.")
                continue
            run.check(_asdict(cfg))
            if not run.finished:
                print(f"unfinished: {name} has {max(run.epochs_done, 0)} of {cfg.epochs} epochs; run "
                      f"notebooks/{entry(key).notebook} again (it resumes). Left out below.")
                continue
            print(f"loaded the finished run {path} ({run.epochs_done} epochs)")
            runs[key] = run
        except RunError as err:
            print(f"left out {name}: {err}")
    return runs


def _asdict(cfg) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)


def budget(cfg) -> str:
    """What a run cost, for a table's budget column: `400 ep, resnet18 (w64), batch 512, cifar10`.
    `cfg`: a TrainConfig, a run's config dict or a Run."""
    if isinstance(cfg, Run):
        cfg = cfg.config
    if not isinstance(cfg, dict):
        cfg = _asdict(cfg)
    labels = "" if cfg.get("label_fraction", 1) == 1 else f", {cfg['label_fraction']:.0%} labels"
    size = "" if cfg.get("image_size", 32) == 32 else f" at {cfg['image_size']} px"
    return (f"{cfg['epochs']} ep, {cfg['backbone']} (w{cfg['width']}), batch {cfg['batch_size']}, "
            f"{cfg['dataset']}{size}{labels}")


# -- evaluations of a run, each computed once and kept in the run's evaluations.json ------------

_DATA: dict = {}


def run_data(run: Run, device="cpu"):
    """`(train, test, mean, std)` of the dataset a run trained on, on `device` (loaded once per
    dataset and device); `mean`/`std` are the training set's, which the run normalized with."""
    from .data import load_dataset

    cfg = run.require("dataset", "image_size")
    key = (cfg["dataset"], cfg.get("data_root"), cfg["image_size"], str(device))
    if key not in _DATA:
        train, test = load_dataset(cfg["dataset"], cfg.get("data_root"), cfg["image_size"])
        _DATA[key] = (train.to(device), test.to(device), *train.mean_std())
    return _DATA[key]


def best_epoch(run: Run) -> int:
    """The epoch `backbone_best.pt` holds: the last one with the highest kNN top-1 (epochs >= 1),
    as the loop saves it. Chosen on the test set, as the thesis chose its probed models."""
    rows = [r for r in run.history if r["epoch"] >= 1]
    best = max(r["knn_top1"] for r in rows)
    return [r["epoch"] for r in rows if r["knn_top1"] >= best][-1]


def probe(run: Run, file: str = "backbone.pt", device="cpu", seed: int = 0, progress: bool = False,
          **overrides) -> dict:
    """The thesis's linear evaluation (`evaluate.linear_probe(protocol="thesis")`: 10 epochs, SGD
    lr 0.3, random resized crop only) of a backbone file of the run; `overrides` change its
    settings (`epochs=50`, `lr=0.05`). Returns `top1` (last probe epoch), `best_top1`, `history`."""
    from . import evaluate

    if file == "backbone_best.pt" and best_epoch(run) == run.config["epochs"]:
        file = "backbone.pt"  # the best epoch was the last: the same weights, probed once
    settings = {"evaluation": "linear_probe", "protocol": "thesis", "file": file, "seed": seed,
                **evaluate.PROBES["thesis"], **overrides}

    def compute():
        train, test, mean, std = run_data(run, device)
        r = evaluate.linear_probe(run.load_backbone(file, device), train, test, "thesis", mean, std, seed=seed,
                                  progress=progress, **overrides)
        return {k: r[k] for k in ("top1", "best_top1", "history")}

    return evaluate.load_or_evaluate(run, settings, compute)


def finetune(run: Run, label_fraction: float = 1.0, file: str = "backbone.pt", device="cpu", seed: int = 0,
             progress: bool = False, **overrides) -> dict:
    """The thesis's fine-tuning (`evaluate.finetune`: 70 epochs, lr 0.005) of a backbone file on
    `label_fraction` of the labels (table 4.3). Returns `top1`, `best_top1`, `history`."""
    from . import evaluate

    settings = {"evaluation": "finetune", "file": file, "label_fraction": label_fraction, "seed": seed,
                **evaluate.FINETUNE, **overrides}

    def compute():
        train, test, mean, std = run_data(run, device)
        r = evaluate.finetune(run.load_backbone(file, device), train, test, label_fraction, mean, std, seed=seed,
                              progress=progress, **overrides)
        return {k: r[k] for k in ("top1", "best_top1", "history")}

    return evaluate.load_or_evaluate(run, settings, compute)


def own_accuracy(run: Run, device="cpu") -> float:
    """Test top-1 (%) of a supervised run's network with its own classifier (last epoch): the
    thesis's supervised numbers (tables 4.2 and 4.3) are this, not a probe."""
    from . import augment
    from .analysis import load_method
    from .evaluate import classifier_accuracy, load_or_evaluate

    if run.config.get("method") != "supervised":
        raise ValueError(f"{run.path.name} is a {run.config.get('method')} run; only a supervised run has a classifier")

    def compute():
        _, test, mean, std = run_data(run, device)
        model = load_method(run, device)
        return {"top1": classifier_accuracy(model.backbone, model.classifier, test,
                                            augment.eval_transform(mean, std, run.config["image_size"]))}

    return load_or_evaluate(run, {"evaluation": "own_classifier", "file": "checkpoint.pt"}, compute)["top1"]


def label_curve(run: Run, per_class=(10, 20, 50, 100, 200, 500), seeds=(0, 1, 2), file: str = "backbone.pt",
                device="cpu", **probe_settings) -> dict:
    """`evaluate.label_efficiency` of a backbone file of the run: {N: {"mean", "std", "runs"}}."""
    from . import evaluate

    settings = {"evaluation": "label_efficiency", "file": file, "per_class": list(per_class), "seeds": list(seeds),
                **probe_settings}

    def compute():
        train, test, mean, std = run_data(run, device)
        return evaluate.label_efficiency(run.load_backbone(file, device), train, test, per_class, seeds, mean, std,
                                         **probe_settings)

    return {int(n): v for n, v in evaluate.load_or_evaluate(run, settings, compute).items()}


def spectra(run: Run, device="cpu") -> dict:
    """Normalized covariance spectra (`analysis.covariance_spectrum`) of the last epoch's test-set
    representations (backbone) and embeddings (projector output; the supervised network's are its
    representations): {"representation": [...], "embedding": [...]}."""
    from . import augment
    from .analysis import covariance_spectrum, load_method, representations
    from .evaluate import load_or_evaluate

    def compute():
        _, test, mean, std = run_data(run, device)
        model = load_method(run, device)
        plain = augment.eval_transform(mean, std, run.config["image_size"])
        return {kind: covariance_spectrum(representations(model, test.images, plain, kind)).tolist()
                for kind in ("representation", "embedding")}

    return load_or_evaluate(run, {"evaluation": "spectra", "file": "checkpoint.pt", "split": "test"}, compute)


def run_cost(run: Run) -> dict:
    """What training cost, measured on the machine that ran it (from the history): its device,
    the median seconds and images/s of a training epoch (kNN monitoring excluded) and the
    largest peak memory of an epoch (MiB; None on a CPU or for runs recorded before it was kept)."""
    rows = [r for r in run.history if r["epoch"] >= 1]
    if not rows:
        raise ValueError(f"{run.path} has no trained epoch yet")

    def median(key):
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        return values[len(values) // 2] if values else None

    peaks = [r["peak_memory_mb"] for r in rows if r.get("peak_memory_mb") is not None]
    devices = sorted({r.get("device_name") or "not recorded" for r in rows})
    return {"device": ", ".join(devices), "epoch_s": median("epoch_time"), "eval_s": median("eval_time"),
            "images_per_s": median("images_per_s"), "peak_memory_mb": max(peaks) if peaks else None,
            "epochs": rows[-1]["epoch"]}


def show_table(header: list[str], rows: list[list]) -> None:
    """Display rows under `header` as a markdown table (rendered in Jupyter, printed elsewhere)."""
    plots.show_markdown(plots.markdown_table(header, rows))
