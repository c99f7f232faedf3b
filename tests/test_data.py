import numpy as np
import pytest
import torch
from PIL import Image

from sslnb.data import ImageDataset, iterate_batches, labelled_subset, load_dataset, num_batches


def test_digits_is_offline_rgb_32px_and_stratified(digits):
    train, test = digits
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert (len(train), len(test)) == (1438, 359)  # as the README and the docstring say
    assert train.labels.dtype == torch.int64 and train.classes == [str(i) for i in range(10)]
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # gray digits in three channels
    frac = test.labels.bincount() / (train.labels.bincount() + test.labels.bincount())
    assert ((frac - 0.2).abs() < 0.02).all()
    assert train.images.max() > 200 and train.images.min() == 0
    again, _ = load_dataset("digits")
    assert torch.equal(again.images, train.images)  # the split is seeded


def _make_folder(root, sizes=(40, 28)):
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    for split, n in (("train", 4), ("test", 2)):
        for c, rgb in colours.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (sizes[i % 2], sizes[i % 2]), rgb).save(root / split / c / f"{i}.png")
    (root / "train" / "red" / "notes.txt").write_text("not an image")


def test_image_folder_resizes_and_labels_by_folder(tmp_path):
    _make_folder(tmp_path)
    train, test = load_dataset("imagefolder", tmp_path)
    assert train.classes == ["blue", "red"] and len(train) == 8 and len(test) == 4
    assert train.images.shape == (8, 3, 32, 32)
    red = train.images[train.labels == 1].float().mean((0, 2, 3))
    assert red[0] > 200 and red[2] < 40
    small, _ = load_dataset("imagefolder", tmp_path, image_size=16)
    assert small.images.shape[-1] == 16


def test_bad_datasets_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'; valid: cifar10, cifar100, digits, imagefolder"):
        load_dataset("cifar11")
    with pytest.raises(ValueError, match="has no train/ or test/"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="holds no images"), pytest.warns(UserWarning, match="train/a .* is empty"):
        load_dataset("imagefolder", tmp_path)
    with pytest.raises(ValueError, match="could not be downloaded"):
        load_dataset("cifar10", tmp_path / "nothing", download=False)
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), ["a"])


def test_labelled_subsets_are_stratified_and_seeded(digits):
    train, _ = digits
    tenth = labelled_subset(train, fraction=0.1, seed=1)
    counts, full = tenth.labels.bincount(), train.labels.bincount()
    assert ((counts - full * 0.1).abs() <= 1).all()
    assert torch.equal(labelled_subset(train, fraction=0.1, seed=1).images, tenth.images)
    assert not torch.equal(labelled_subset(train, fraction=0.1, seed=2).images, tenth.images)
    five = labelled_subset(train, per_class=5)
    assert five.labels.bincount().tolist() == [5] * 10
    with pytest.raises(ValueError, match="exactly one"):
        labelled_subset(train)
    with pytest.raises(ValueError, match="fraction"):
        labelled_subset(train, fraction=1.5)


def test_batches_cover_an_epoch_once_and_follow_the_generator():
    ds = ImageDataset(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous(),
                      torch.arange(10), [str(i) for i in range(10)])
    seen = torch.cat([y for _, y in iterate_batches(ds, 3, drop_last=False)])
    assert sorted(seen.tolist()) == list(range(10))
    batches = list(iterate_batches(ds, 3, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == num_batches(10, 3) == 3 and all(len(y) == 3 for _, y in batches)
    for x, y in batches:
        assert torch.equal(x[:, 0, 0, 0].long(), y)  # images and labels stay paired
    again = list(iterate_batches(ds, 3, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    in_order = torch.cat([y for _, y in iterate_batches(ds, 4, shuffle=False, drop_last=False)])
    assert in_order.tolist() == list(range(10))
    with pytest.raises(ValueError, match="larger than the dataset"):
        next(iterate_batches(ds, 11))


def test_even_batches_cover_every_image_once_in_near_equal_batches():
    from sslnb.data import even_batch_size, even_batches

    ds = ImageDataset(torch.zeros(1438, 3, 2, 2, dtype=torch.uint8), torch.arange(1438), ["a"])
    sizes = [len(y) for _, y in even_batches(ds, 512, generator=torch.Generator().manual_seed(0))]
    assert sizes == [480, 479, 479] and even_batch_size(1438, 512) == 480  # drop_last would lose 414
    seen = torch.cat([y for _, y in even_batches(ds, 100)])
    assert sorted(seen.tolist()) == list(range(1438))
    assert even_batch_size(144, 512) == 144
    assert [len(y) for _, y in even_batches(ds.subset(torch.arange(5)), 4)] == [3, 2]


def test_a_constant_channel_normalizes_without_dividing_by_zero():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = torch.arange(4, dtype=torch.uint8).view(4, 1, 1) * 60
    mean, std = ImageDataset(images, torch.zeros(4), ["a"]).mean_std()
    assert std[1] == std[2] == pytest.approx(1 / 255) and std[0] > 0.1
