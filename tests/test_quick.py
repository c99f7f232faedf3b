"""Quick mode (SPEC section 4): a small experiment on the bundled `digits`, not a stub.

The registry layers each method's quick settings (`MethodSpec.quick_train`, config overrides,
and `MethodSpec.quick`, method kwargs) over the shared `sslnb.train.QUICK`. These tests check
the layering and the invariants that keep quick runs valid and fast; whether a method learns in
quick mode is asserted by its notebook where it held for seeds 0, 1 and 2 (the numbers are in
the comments of `sslnb.methods.METHODS`).
"""
import dataclasses

import pytest
import torch

from sslnb import train as T
from sslnb.methods import METHODS, MoCo, build_method, check_options

DIGITS_TRAIN = 1437  # digits' stratified training split (sslnb.data._load_digits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quick_config_is_a_valid_digits_run(method):
    spec = METHODS[method]
    cfg = T.default_config(method, quick=True)
    T.validate(cfg)  # options in range, batch accepted by the method (MoCo's queue and split BN)
    assert cfg.dataset == "digits" and cfg.data_root is None and cfg.snapshot_epochs == ()
    assert cfg.backbone == "resnet18" and cfg.width <= 8 and cfg.image_size in (8, 16, 32)
    assert cfg.epochs <= 10 and (cfg.image_size == 8 or cfg.epochs <= 4)  # seconds, not minutes
    assert 0 <= cfg.warmup_epochs < cfg.epochs and cfg.batch_size <= DIGITS_TRAIN // 4
    fields = {f.name for f in dataclasses.fields(T.TrainConfig)}
    assert set(spec.quick_train) <= fields - {"method", "dataset", "data_root", "seed"}
    check_options(method, spec.quick)
    # the quick settings never leak into the full configuration
    full = T.default_config(method)
    assert full.dataset == "cifar10" and full.method_kwargs == {}
    assert {k: getattr(full, k) for k in spec.train} == spec.train


def test_quick_layers_registry_then_quick_then_method_then_overrides(monkeypatch):
    spec = METHODS["byol"]
    monkeypatch.setitem(METHODS, "byol", dataclasses.replace(
        spec, quick_train={"epochs": 7, "lr": 0.5}, quick={"ema": 0.95, "pred_hidden": 32}))
    cfg = T.default_config("byol", quick=True)
    assert (cfg.dataset, cfg.width, cfg.epochs, cfg.lr) == ("digits", T.QUICK["width"], 7, 0.5)
    assert cfg.method_kwargs == {"ema": 0.95, "pred_hidden": 32}
    assert cfg.momentum == spec.train["momentum"]  # neither QUICK nor quick_train sets it
    cfg = T.default_config("byol", quick=True, lr=0.1, epochs=None, method_kwargs={"ema": 0.9})
    assert (cfg.epochs, cfg.lr) == (7, 0.1)  # None leaves the quick value
    assert cfg.method_kwargs == {"ema": 0.9, "pred_hidden": 32}
    assert T.default_config("byol").epochs == spec.train["epochs"]


def test_quick_moco_queue_fits_digits():
    """The queue holds whole steps of keys (both views') and at most a quarter of the training
    set, so a key does not meet a stale copy of itself among its negatives."""
    cfg = T.default_config("moco", quick=True)
    opts = {k: v for k, v in cfg.method_kwargs.items()}
    queue = opts["queue_size"]
    assert queue <= DIGITS_TRAIN // 4 and queue % (2 * cfg.batch_size) == 0
    MoCo.check_batch(cfg.batch_size, opts)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quick_models_are_small(method):
    """Quick runs take seconds because the heads shrink with the width-8 backbone: the seeds'
    4096-wide heads would cost more than the backbone itself."""
    cfg = T.default_config(method, quick=True)
    model = build_method(method, cfg.backbone, cfg.width, 10, **cfg.method_kwargs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert trainable < 2 * backbone, f"{method}: heads of {trainable - backbone} parameters"


def test_quick_simclr_run_learns(tmp_path):
    """A regression guard for the quick settings, with the cheapest self-supervised method that
    beat the untrained backbone clearly on all three seeds (seed 1 measured 56.3% -> 68.2%; about
    10 s on one idle core)."""
    from sslnb.data import load_dataset

    cfg = T.default_config("simclr", quick=True, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = T.train(cfg, tmp_path / "run", device="cpu", progress=False,
                      data=load_dataset("digits", image_size=cfg.image_size))
    finally:
        torch.set_num_threads(threads)
    first, last = run.history[0]["knn_top1"], run.history[-1]["knn_top1"]
    assert last >= first + 5, f"kNN {first:.1f} -> {last:.1f}"
    assert run.history[-1]["embedding_std"] > 0.5  # and not by collapsing
