"""The budget estimate counts the FLOPs of the real network: checked against the known cost of
a CIFAR ResNet-18 and the forward/backward ratio; the time scales as its formula says."""
import pytest

from sslnb import budget
from sslnb.methods import build_method
from sslnb.train import default_config


def test_backbone_flops_match_the_known_cifar_resnet18_cost():
    # a CIFAR ResNet-18 (3x3 stem, no max-pool) costs 0.556 G multiply-adds per 32x32 image
    per = budget._per_image("supervised", "resnet18", 64, 32, 10, "{}")
    assert per["backbone_flops"] == pytest.approx(2 * 0.556e9, rel=0.01)
    # a supervised step: forward + backward (about twice the forward) of one view
    assert per["step_flops"] == pytest.approx(3 * per["backbone_flops"], rel=0.02)
    assert per["params"] == pytest.approx(11.17e6, rel=0.01)


def test_meta_and_real_tensors_count_the_same():
    def build():
        return build_method("byol", "resnet18", 8, 10)

    assert budget._count(build, 16, "meta") == pytest.approx(budget._count(build, 16, "cpu"))


def test_a_simclr_epoch_is_about_333_tflop_and_time_follows_the_assumed_throughput():
    cfg = default_config("simclr")
    e = budget.estimate(cfg)
    # two views through backbone + head, forward and backward, 97 steps of 512 images
    assert e["train_tflop_per_epoch"] == pytest.approx(331, rel=0.02)
    t4, a100 = e["gpus"]["Colab T4"], e["gpus"]["Colab A100"]
    ratio = budget.GPUS["Colab A100"]["tflops"] / budget.GPUS["Colab T4"]["tflops"]
    assert t4["minutes_per_epoch"] == pytest.approx(a100["minutes_per_epoch"] * ratio)
    assert t4["hours_total"] == pytest.approx(t4["minutes_per_epoch"] * cfg.epochs / 60)
    longer = budget.estimate(default_config("simclr", epochs=2 * cfg.epochs))
    assert longer["gpus"]["Colab T4"]["hours_total"] == pytest.approx(2 * t4["hours_total"])


def test_moco_at_8_pixels_has_two_images_per_batchnorm_group():
    cfg = default_config("moco", width=8, image_size=8)  # 1x1 feature maps in the last block
    assert budget.estimate(cfg)["train_tflop_per_epoch"] > 0


def test_directpred_falls_back_to_real_tensors_and_the_table_says_estimate(capsys):
    cfg = default_config("directpred", width=8, image_size=16)
    budget.show(cfg)
    out = capsys.readouterr().out
    assert "estimate" in out and "Colab T4" in out and "Colab A100" in out
