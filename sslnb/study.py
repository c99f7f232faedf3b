"""The VICReg study's runs (seed 000_643f35a9ac52a32a): their names and configurations, shared by
notebooks 01-03, and the numbers the study reports.

[0] VICReg, 2022, arXiv:2105.04906; the study: ResNet-34 pretrained with VICReg on CIFAR-10 and on
CIFAR-100 for 100 epochs (sec. 3.2), probed after 50 and 100 epochs (sec. 3.3).
"""
from __future__ import annotations

from .train import TrainConfig, default_config

# run name -> (the study's label, its dataset); quick mode has no CIFAR: digits runs with different
# seeds stand in for the two datasets
RUNS = {"01_vicreg_cifar10": ("CIFAR-10", "cifar10"), "01_vicreg_cifar100": ("CIFAR-100", "cifar100")}
LINEAR_TOP1 = {"01_vicreg_cifar10": 76.67, "01_vicreg_cifar100": 51.22}  # sec. 3.3.1, ResNet-34, 100 epochs
IMAGENET_RESNET50_TOP1 = {"cifar10": 84.67, "cifar100": 66.75}  # sec. 3.4, the official ResNet-50


def configs(quick: bool = False) -> dict[str, TrainConfig]:
    """The study's two pretraining runs, with backbone snapshots halfway and at the end (the study
    probes after 50 and 100 epochs): the registry's settings, or its quick ones on digits."""
    epochs = default_config("vicreg", quick=quick).epochs
    return {name: default_config("vicreg", quick=quick, dataset="digits" if quick else dataset,
                                 seed=i if quick else 0, snapshot_epochs=(epochs // 2, epochs))
            for i, (name, (_, dataset)) in enumerate(RUNS.items())}


def labels(quick: bool = False) -> dict[str, str]:
    """Figure labels of the two runs; quick mode says they are digits stand-ins."""
    return {name: label + (" stand-in: digits, quick mode" if quick else "") for name, (label, _) in RUNS.items()}
