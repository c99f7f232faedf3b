"""The VICReg study's package parts (issue 10): the official ImageNet ResNet-50 loader, the
ImageNet transform, train accuracy in the linear probe, t-SNE and the study's figures."""
import urllib.error

import matplotlib
import numpy as np
import pytest
import torch
import torchvision

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sslnb import analysis, augment, evaluate, models, plots, train  # noqa: E402
from sslnb.data import ImageDataset  # noqa: E402


class Payload:
    """An arbitrary object: unpickling it would run code, so weights_only refuses it."""


# -- sslnb.models.vicreg_resnet50 ----------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_resnet50():
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-default BN statistics, so a load that skipped buffers would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_vicreg_resnet50_loads_a_local_torchvision_state_dict(tmp_path, reference_resnet50, monkeypatch):
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load runs downloaded code"))
    path = tmp_path / "resnet50.pth"
    torch.save(reference_resnet50.state_dict(), path)  # with its fc: ignored
    net = models.vicreg_resnet50(path).eval()
    assert isinstance(net, torchvision.models.ResNet) and isinstance(net.fc, torch.nn.Identity)
    assert net.feature_dim == 2048
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = net(x)
        reference_resnet50.fc, fc = torch.nn.Identity(), reference_resnet50.fc
        expected = reference_resnet50(x)
        reference_resnet50.fc = fc
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected)
    # a DataParallel-style "module." prefix and a str path work too
    torch.save({"module." + k: v for k, v in reference_resnet50.state_dict().items()}, path)
    torch.testing.assert_close(models.vicreg_resnet50(str(path)).eval()(x).detach(), expected)


def test_vicreg_resnet50_random_stand_in():
    net = models.vicreg_resnet50("random")
    assert isinstance(net.fc, torch.nn.Identity) and net(torch.randn(2, 3, 32, 32)).shape == (2, 2048)


def test_vicreg_resnet50_refuses_bad_files_with_the_path(tmp_path, reference_resnet50):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match=r"nope\.pth does not exist.*resnet50"):
        models.vicreg_resnet50(missing)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=r"corrupt\.pth is corrupt.*expected a torchvision resnet50"):
        models.vicreg_resnet50(corrupt)
    truncated = tmp_path / "truncated.pth"
    torch.save(reference_resnet50.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with pytest.raises(ValueError, match=r"truncated\.pth is corrupt"):
        models.vicreg_resnet50(truncated)
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ValueError, match=r"resnet18\.pth does not match a ResNet-50.*(wrong shapes|missing)"):
        models.vicreg_resnet50(other)
    partial = tmp_path / "partial.pth"
    state = reference_resnet50.state_dict()
    state.pop("layer4.2.bn3.weight")
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"partial\.pth .*1 missing keys \(layer4\.2\.bn3\.weight"):
        models.vicreg_resnet50(partial)
    not_a_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ValueError, match=r"tensor\.pth holds a Tensor"):
        models.vicreg_resnet50(not_a_dict)
    pickled = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload()}, pickled)  # weights_only refuses it
    with pytest.raises(ValueError, match=r"pickled\.pth is corrupt or not a weights-only"):
        models.vicreg_resnet50(pickled)


def test_vicreg_resnet50_downloads_into_the_data_folder_weights_only(tmp_path, reference_resnet50, monkeypatch):
    monkeypatch.setenv("SSLNB_DATA", str(tmp_path))
    calls = []

    def fake_download(url, model_dir=None, map_location=None, progress=True, check_hash=False, file_name=None,
                      weights_only=False):
        calls.append(dict(url=url, model_dir=model_dir, file_name=file_name, weights_only=weights_only))
        torch.save(reference_resnet50.state_dict(), f"{model_dir}/{file_name}")
        return torch.load(f"{model_dir}/{file_name}", weights_only=weights_only)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load runs downloaded code"))
    net = models.vicreg_resnet50()
    assert calls == [dict(url="https://dl.fbaipublicfiles.com/vicreg/resnet50.pth", model_dir=str(tmp_path / "vicreg"),
                          file_name="resnet50.pth", weights_only=True)]
    torch.testing.assert_close(net.conv1.weight, reference_resnet50.conv1.weight)
    models.vicreg_resnet50()  # the second call finds the file: no download
    assert len(calls) == 1


def test_vicreg_resnet50_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLNB_DATA", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match=r"could not download https://dl\.fbaipublicfiles\.com/vicreg/resnet50\.pth"
                                         r".*resnet50\.pth.*weights='random'"):
        models.vicreg_resnet50()


# -- ImageNet transform and the linear probe ------------------------------------------------------

def test_imagenet_transform_upsamples_and_normalizes():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = augment.imagenet_transform(96)(images)
    assert out.shape == (4, 3, 96, 96)
    x = torch.nn.functional.interpolate(images.float() / 255, size=96, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(augment.IMAGENET_MEAN)[:, None, None], torch.tensor(augment.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, (x - mean) / std, atol=1e-4, rtol=0)
    crops = augment.imagenet_transform(64, train=True)(images, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (4, 3, 64, 64) and not torch.allclose(crops[:, :, :32, :32], out[:, :, :32, :32])


def small_dataset(n=96, classes=3, size=16, seed=0):
    """Classes separable by their mean colour, so a probe learns in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=torch.float)[labels]
    images = (base[:, :, None, None] + 30 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255)
    return ImageDataset(images.to(torch.uint8), labels, ["r", "g", "b"])


class MeanColour(torch.nn.Module):
    """A backbone whose features are the mean colour: the three classes are linearly separable."""

    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * x.mean((2, 3))


@pytest.mark.parametrize("cached", [False, True])
def test_linear_probe_reports_train_and_test_accuracy_per_epoch(cached):
    train_set, test_set = small_dataset(seed=0), small_dataset(48, seed=1)
    out = evaluate.linear_probe(MeanColour(), train_set, test_set, "vicreg", cached=cached, progress=False, epochs=3,
                                lr=0.5, batch_size=32)
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    for h in out["history"]:
        assert 0 <= h["train_top1"] <= 100 and 0 <= h["test_top1"] <= 100
    assert out["history"][0]["train_top1"] < out["history"][-1]["train_top1"]
    assert out["history"][-1]["train_top1"] > 80  # three colours: far above chance (33%)


def test_linear_probe_resamples_to_a_size():
    train_set, test_set = small_dataset(32), small_dataset(16, seed=1)
    seen = []
    backbone = models.resnet("resnet18", width=4)
    backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    evaluate.linear_probe(backbone, train_set, test_set, "vicreg", cached=True, progress=False, epochs=1,
                          size=40, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD)
    # the hook is on the original (the probe deep-copies the backbone, hooks included)
    assert seen and set(seen) == {40}


# -- t-SNE and representations of a run -----------------------------------------------------------

def test_tsne_shapes_and_separation():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    x = torch.randn(120, 16, generator=g) + 8 * torch.nn.functional.one_hot(labels, 16).float()
    for dims in (2, 3):
        y = analysis.tsne(x, dims=dims, perplexity=20, seed=0)
        assert y.shape == (120, dims) and np.isfinite(y).all()
        # each class stays together: every point's nearest neighbour has its class
        d = ((y[:, None] - y[None]) ** 2).sum(-1) + np.eye(120) * 1e9
        assert (labels.numpy()[d.argmin(1)] == labels.numpy()).mean() > 0.95
    np.testing.assert_allclose(analysis.tsne(x, seed=1), analysis.tsne(x, seed=1))  # seeded
    assert analysis.tsne(x[:10], perplexity=30).shape == (10, 2)  # perplexity capped below N/3
    with pytest.raises(ValueError, match="dims"):
        analysis.tsne(x, dims=4)


def test_load_method_and_representations_of_a_run(tmp_path):
    cfg = train.default_config("vicreg", quick=True, epochs=1, batch_size=32, backbone="resnet18", width=4,
                               image_size=16, method_kwargs=dict(proj_dims=(64, 64, 64)))
    data = small_dataset(64, size=16), small_dataset(24, size=16, seed=1)
    run = train.train(cfg, tmp_path / "run", progress=False, data=data)
    model = analysis.load_method(run)
    ckpt = run.load()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["model"][k])
    untrained = analysis.load_method(run, untrained=True)
    assert not torch.equal(untrained.backbone.conv1.weight, model.backbone.conv1.weight)
    again = analysis.load_method(run, untrained=True)
    torch.testing.assert_close(again.backbone.conv1.weight, untrained.backbone.conv1.weight)  # same seed
    plain = augment.eval_transform(size=16)
    rep = analysis.representations(model, data[1].images, plain, "representation")
    emb = analysis.representations(model, data[1].images, plain, "embedding")
    assert rep.shape == (24, 32) and emb.shape == (24, 64)
    with torch.no_grad():
        torch.testing.assert_close(emb, model.project(model.backbone(plain(data[1].images))))
    with pytest.raises(ValueError, match="representation"):
        analysis.representations(model, data[1].images, plain, "logits")


# -- the figures ------------------------------------------------------------------------------

class FakeRun:
    def __init__(self, history, kwargs=None):
        self.history, self.config = history, {"method_kwargs": kwargs or {}}

    def column(self, key):
        rows = [(r["epoch"], r[key]) for r in self.history if r.get(key) is not None]
        return [e for e, _ in rows], [v for _, v in rows]


def test_vicreg_loss_breakdown_draws_weighted_and_unweighted_terms():
    history = [{"epoch": 0}] + [{"epoch": e, "invariance": 0.1 / e, "variance": 0.5, "covariance": 2.0 / e,
                                 "loss": 25 * 0.1 / e + 25 * 0.5 + 2.0 / e} for e in (1, 2, 3)]
    fig = plots.vicreg_loss_breakdown({"CIFAR-10": FakeRun(history), "CIFAR-100": FakeRun(history, {"inv_weight": 5.0})})
    axes = fig.axes
    assert len(axes) == 4
    top = {line.get_label(): list(line.get_ydata()) for line in axes[0].lines}
    assert top["25 x invariance"] == pytest.approx([2.5, 1.25, 2.5 / 3])
    # weighted terms add up to the total
    total = np.sum([top[k] for k in ("25 x invariance", "25 x variance", "1 x covariance")], axis=0)
    np.testing.assert_allclose(total, top["total (weighted sum)"])
    assert "5 x invariance" in {line.get_label() for line in axes[1].lines}  # the run's own weights
    bottom = {line.get_label(): list(line.get_ydata()) for line in axes[2].lines}
    assert bottom["covariance"] == pytest.approx([2.0, 1.0, 2 / 3])
    plt.close(fig)


def test_probe_curves_and_scatter_plots():
    result = {"history": [{"epoch": e, "train_top1": 50 + e, "test_top1": 40 + e} for e in (1, 2, 3)]}
    fig = plots.probe_curves({"CIFAR-10": result}, references={"CIFAR-10": 76.67})
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["train (augmented batches)", "test", "study: 76.67%"]
    plt.close(fig)
    classes = [f"class {i}" for i in range(12)]
    labels = torch.arange(60) % 12
    fig = plots.scatter_grid({"2-D": (np.random.rand(60, 2), labels), "3-D": (np.random.rand(60, 3), labels)},
                             classes)
    assert fig.axes[1].name == "3d" and fig.axes[0].name == "rectilinear"
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 12  # one legend for the figure
    plt.close(fig)
    ax = plots.embedding_scatter(np.random.rand(60, 3), labels, classes, title="t")
    assert ax.name == "3d"
    plt.close("all")


def test_neighbour_agreement_and_closest_class_pairs():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    points = torch.tensor([[0.0, 0], [0, 1], [10, 0], [10, 1], [20, 0], [20, 1]])
    assert analysis.neighbour_agreement(points, labels) == 100.0
    assert analysis.neighbour_agreement(points, torch.tensor([0, 1, 0, 1, 0, 1])) == 0.0
    features = torch.tensor([[1.0, 0, 0], [1, 0.1, 0], [0.9, 0.3, 0], [1, 0.2, 0.1], [0, 0, 1], [0, 0.1, 1]])
    pairs = analysis.closest_class_pairs(features, labels, ["car", "truck", "frog"], top=1)
    assert pairs[0][:2] == ("car", "truck") and pairs[0][2] > 0.9


def test_table_formats_rows(capsys):
    text = plots.table([{"backbone": "ResNet-34", "CIFAR-10": 76.67, "CIFAR-100": None}], title="t")
    assert "| backbone | CIFAR-10 | CIFAR-100 |" in text and "| ResNet-34 | 76.67 | — |" in text


def test_accuracy_by_size_plots_one_line_per_dataset():
    ax = plots.accuracy_by_size({"CIFAR-10": {224: 80.0, 64: 70.0, 128: 78.0}}, references={"CIFAR-10": 84.67})
    line = ax.lines[0]
    assert list(line.get_xdata()) == [64, 128, 224] and list(line.get_ydata()) == [70.0, 78.0, 80.0]
    assert ax.lines[1].get_label() == "study (CIFAR-10): 84.67%"
    plt.close("all")


def test_the_study_runs_have_its_settings_and_quick_stand_ins():
    from sslnb import study

    full = study.configs()
    assert [c.dataset for c in full.values()] == ["cifar10", "cifar100"]
    for c in full.values():  # sec. 3.2.1 and 3.3: ResNet-34, batch 128, 100 epochs, probed after 50 and 100
        assert (c.backbone, c.batch_size, c.epochs, tuple(c.snapshot_epochs), c.optimizer) == \
            ("resnet34", 128, 100, (50, 100), "lars")
    quick = study.configs(quick=True)
    assert [(c.dataset, c.seed) for c in quick.values()] == [("digits", 0), ("digits", 1)]
    assert all("quick mode" in label for label in study.labels(quick=True).values())
