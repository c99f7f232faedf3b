"""Datasets as uint8 tensors that live on the training device, and a device-side batch iterator.

Colab gives a GPU two vCPUs: a DataLoader with PIL augmentations cannot keep a GPU busy on
32x32 images. CIFAR-10 is 150 MB as uint8, so we keep the whole dataset on the device,
shuffle with a device permutation, and augment whole batches there (see `sslnb.augment`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "digits", "imagefolder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def default_root() -> Path:
    """`$SSLNB_DATA`, else the project's `data/` folder (the working directory's outside a checkout)."""
    from .runs import project_dir

    return Path(os.environ.get("SSLNB_DATA") or project_dir() / "data")


@dataclass
class ImageDataset:
    """Images `[N,3,H,W]` uint8, labels `[N]` int64 and class names, on any device."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N,3,H,W], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be [N={len(self.images)}], got {list(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> "ImageDataset":
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        indices = indices.to(self.images.device)
        return ImageDataset(self.images[indices], self.labels[indices], self.classes)

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0,1] (for normalization); a channel that never
        changes gets std 1/255 instead of 0, so normalizing it cannot divide by zero."""
        x = self.images.float().div_(255).transpose(0, 1).reshape(3, -1)
        return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1 / 255).tolist())


# -- sources ------------------------------------------------------------------------------

def load_dataset(name: str, root: str | os.PathLike | None = None, image_size: int = 32,
                 download: bool = True) -> tuple[ImageDataset, ImageDataset]:
    """Return `(train, test)` for one of `DATASETS` (on the CPU; move them with `.to`).

    `root` is where CIFAR downloads (default: the project's `data/`); for `imagefolder` it
    is the folder holding `train/<class>/*` and `test/<class>/*`.
    """
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, Path(root or default_root()), download)
    if name == "digits":
        return _load_digits(image_size)
    if name == "imagefolder":
        if root is None:
            raise ValueError("dataset 'imagefolder' needs a root: a folder with train/<class>/ and test/<class>/")
        return _load_image_folder(Path(root), image_size)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


def _load_cifar(name: str, root: Path, download: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        try:
            ds = cls(root=str(root), train=train, download=download)
        except (RuntimeError, OSError) as e:  # not found or corrupted; offline (URLError is an OSError)
            raise ValueError(f"{name} is not in {root} and could not be downloaded ({e}); "
                             "pass --data-root to a folder that holds it, or use 'digits' offline") from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N,32,32,3] -> [N,3,32,32]
        splits.append(ImageDataset(images, torch.tensor(ds.targets), list(ds.classes)))
    return splits[0], splits[1]


def _load_digits(image_size: int = 32, test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's bundled 8x8 digits (1,797 images), upscaled to RGB: works offline.

    A stratified, seeded split gives 1,438 training and 359 test images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0)[:, None]  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    g = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every class goes to test
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    classes = [str(c) for c in range(10)]
    return (ImageDataset(images[~test_mask], labels[~test_mask], classes),
            ImageDataset(images[test_mask], labels[test_mask], classes))


def _load_image_folder(root: Path, image_size: int):
    """A user's own images: `root/train/<class>/*` and `root/test/<class>/*`, resized to a square."""
    from PIL import Image

    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise ValueError(f"image folder {root} has no {' or '.join(m + '/' for m in missing)}; "
                         "expected train/<class>/* and test/<class>/*")
    files = {split: {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                     for d in (root / split).iterdir() if d.is_dir()} for split in ("train", "test")}
    classes = _check_classes(root, files["train"], files["test"])
    splits = []
    for split in ("train", "test"):
        images, labels = [], []
        for c, name in enumerate(classes):
            for path in files[split].get(name, []):
                try:
                    with Image.open(path) as im:
                        im = im.convert("RGB")
                        if im.size != (image_size, image_size):
                            im = im.resize((image_size, image_size), Image.BILINEAR)
                        images.append(np.asarray(im))
                except OSError as e:  # PIL's UnidentifiedImageError is an OSError
                    raise ValueError(f"cannot read image {path} ({type(e).__name__}); remove or replace it") from None
                labels.append(c)
        if not images:
            raise ValueError(f"{root / split} holds no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        splits.append(ImageDataset(x, torch.tensor(labels), classes))
    return splits[0], splits[1]


def _check_classes(root: Path, train: dict, test: dict) -> list[str]:
    """The classes of an image folder (`{class: [files]}` per split), refusing what makes
    evaluation meaningless and warning, with the folders named, about what is merely unusual."""
    names = lambda cs: ", ".join(f"{s}/{c}" for s, c in cs)  # noqa: E731
    untrained = sorted(c for c in test if test[c] and not train.get(c))
    if untrained:  # kNN and the probes could never predict them: accuracy would be meaningless
        raise ValueError(f"{names(('test', c) for c in untrained)} in {root} has no training images "
                         f"(no {names(('train', c) for c in untrained)} images); every test class needs "
                         "training images")
    empty = sorted({(s, c) for s, split in (("train", train), ("test", test)) for c in split
                    if not split[c] and not train.get(c)})
    if empty:
        warnings.warn(f"{names(empty)} in {root} is empty (no {', '.join(IMAGE_EXTENSIONS)} images); "
                      "that class is left out", stacklevel=3)
    classes = sorted(c for c in train if train[c])
    if not classes:
        raise ValueError(f"{root / 'train'} holds no images in class folders; expected train/<class>/* with "
                         f"extensions {', '.join(IMAGE_EXTENSIONS)}")
    if len(classes) < 2:
        raise ValueError(f"image folder {root} has one class ({classes[0]}); classification needs at least two "
                         "class folders, or every accuracy is 100%")
    untested = [c for c in classes if not test.get(c)]
    if untested:
        warnings.warn(f"{names(('train', c) for c in untested)} in {root} has no test images "
                      f"(no {names(('test', c) for c in untested)} images): that class trains but is never scored",
                      stacklevel=3)
    return classes


# -- labelled subsets and batches ---------------------------------------------------------

def labelled_subset(ds: ImageDataset, fraction: float | None = None, per_class: int | None = None,
                    seed: int = 0) -> ImageDataset:
    """A stratified, seeded subset: `fraction` of each class (e.g. 0.1) or `per_class` images."""
    return ds.subset(labelled_indices(ds.labels, ds.num_classes, fraction, per_class, seed))


def labelled_indices(labels: torch.Tensor, num_classes: int, fraction: float | None = None,
                     per_class: int | None = None, seed: int = 0) -> torch.Tensor:
    """The sorted indices `labelled_subset` keeps (also for features cached in the same order)."""
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction (0 < f <= 1) or per_class (an int >= 1)")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    keep = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().squeeze(1)
        n = max(1, round(len(idx) * fraction)) if fraction is not None else per_class
        keep.append(idx[torch.randperm(len(idx), generator=g)[: min(n, len(idx))]])
    return torch.cat(keep).sort().values


def iterate_batches(ds: ImageDataset, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                    generator: torch.Generator | None = None):
    """Yield `(images, labels)` batches indexed on the dataset's device: no workers, no copies.

    The permutation is drawn on the device (pass a generator on that device for
    reproducibility), so a GPU epoch never waits for the host.
    """
    n, device = len(ds.labels), ds.labels.device  # any object with .images and .labels
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if drop_last and batch_size > n:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n} images)")
    order = torch.randperm(n, device=device, generator=generator) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield ds.images[idx], ds.labels[idx]


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def even_batches(ds: ImageDataset, batch_size: int, generator: torch.Generator | None = None):
    """Yield shuffled `(images, labels)` batches that cover every image once: ceil(n / batch_size)
    batches of near-equal size (at most `batch_size`). For the probes and fine-tuning, where
    dropping the last partial batch would leave images out of every epoch on a small training
    set (1,438 digits at batch 512 would lose 414), and a last batch of one image would upset
    a training-mode BatchNorm."""
    n = len(ds.labels)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, device=ds.labels.device, generator=generator)
    for idx in order.tensor_split(-(-n // batch_size)):
        yield ds.images[idx], ds.labels[idx]


def even_batch_size(n: int, batch_size: int) -> int:
    """The largest batch `even_batches` yields for `n` images: what a probe reports it used."""
    steps = -(-n // batch_size)
    return -(-n // steps)
