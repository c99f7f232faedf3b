"""The VICReg pipeline's Gaussian blur against PIL's ImageFilter.GaussianBlur, which the VICReg
code applies (sigma ~ U(0.1, 2.0), no kernel size). [0] VICReg, 2022, arXiv:2105.04906"""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sslnb import augment as A

SIGMAS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.2, 1.25, 1.4, 1.6, 1.8, 1.95, 2.0]


def pil_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(sigma)))).astype(np.float64)


def ours(image: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(image).float()[None, None].expand(1, 3, *image.shape) / 255
    out = A.gaussian_blur(x, 1.0, None, (sigma, sigma), torch.Generator().manual_seed(0))
    return out[0, 0].double().numpy() * 255


def spread(profile: np.ndarray) -> float:
    """Standard deviation (px) of a 1-D intensity profile around its centre of mass."""
    x = np.arange(len(profile))
    w = profile / profile.sum()
    mean = (w * x).sum()
    return math.sqrt((w * (x - mean) ** 2).sum())


def within_rounding(out: np.ndarray, ref: np.ndarray) -> bool:
    """PIL rounds to uint8 after each of its 6 box passes (3 per axis), we do not: a pixel can
    be up to ~3 grey levels off, about one on average (measured on random images: mean 1.0 at
    sigma 0.1, where PIL's rounding undoes most of its tiny blur, 0.3 at sigma >= 1.3)."""
    error = np.abs(out - ref)
    return error.max() < 3.5 and error.mean() < 1.2


def delta(size=33, value=255, row=16, col=16):
    image = np.zeros((size, size), np.uint8)
    image[row, col] = value
    return image


@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_pil_on_a_delta_image(sigma):
    assert within_rounding(ours(delta(), sigma), pil_blur(delta(), sigma))
    line = np.zeros((9, 33), np.uint8)
    line[:, 16] = 255  # a vertical line: the horizontal profile is the 1-D kernel times 255
    ref, out = pil_blur(line, sigma)[4], ours(line, sigma)[4]
    assert np.abs(out - ref).max() < 1.5
    assert spread(out) == pytest.approx(sigma, abs=0.01)  # the variance is exactly sigma²
    if sigma >= 0.25:  # below, PIL's rounding to uint8 leaves the line (almost) unblurred
        assert spread(out) == pytest.approx(spread(ref), abs=0.03)


def test_blur_spreads_a_point_like_pil_across_the_range():
    """The old 3-tap kernel spread a point 0.80 px at sigma = 2 against PIL's 2.03 px."""
    line = np.zeros((9, 33), np.uint8)
    line[:, 16] = 255
    spreads = [(spread(ours(line, s)[4]), spread(pil_blur(line, s)[4])) for s in np.linspace(0.3, 2, 18)]
    for mine, ref in spreads:
        assert abs(mine - ref) < 0.06, (mine, ref)  # PIL's rounding trims the faint tails
    x = torch.from_numpy(line).float()[None, None].expand(1, 3, 9, 33) / 255
    three_taps = A.gaussian_blur(x, 1.0, 3, (2.0, 2.0), torch.Generator().manual_seed(0))[0, 0, 4].double().numpy()
    assert spread(three_taps) < 0.5 * spreads[-1][1]  # 0.80 px against 2.03 px


@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_blur_repeats_the_edge_pixel_like_pil(sigma):
    """PIL repeats the edge pixel at each of its three passes (at sigma = 2 a point on the
    edge keeps 111/255 there; one replicate-padded 13-tap kernel would keep 152/255)."""
    for image in (delta(row=16, col=0), delta(row=0, col=0), delta(row=31, col=32)):
        assert within_rounding(ours(image, sigma), pil_blur(image, sigma))


def test_blur_matches_pil_on_random_images():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    for sigma in (0.1, 0.3, 0.7, 1.0, 1.3, 2.0):
        out, ref = ours(image, sigma), pil_blur(image, sigma)
        assert within_rounding(out, ref)
        # the blur's strength: how far it moves pixels from the input (5 to 64 grey levels)
        if sigma >= 0.2:
            assert np.abs(out - image).mean() == pytest.approx(np.abs(ref - image).mean(), rel=0.02)
    # the 3-tap Gaussian the pipeline used before is far from PIL at sigma = 2
    x = torch.from_numpy(image).float()[None, None].expand(1, 3, 32, 32) / 255
    old = A.gaussian_blur(x, 1.0, 3, (2.0, 2.0), torch.Generator().manual_seed(0))[0, 0].double().numpy() * 255
    assert not within_rounding(old, pil_blur(image, 2.0))


def three_passes(box: torch.Tensor) -> torch.Tensor:
    """[n, 3m-2] the kernel of three passes of boxes [n, m] away from the edges."""
    n, m = box.shape
    k = torch.nn.functional.conv1d(box[None], box[:, None], padding=m - 1, groups=n)
    return torch.nn.functional.conv1d(k, box[:, None], padding=m - 1, groups=n)[0]


def test_pil_boxes_make_a_normalised_kernel_with_variance_sigma_squared():
    sigma = torch.linspace(0.1, 2.0, 50)
    box = A.pil_box_kernels(sigma, max_sigma=2.0)
    assert box.shape == (50, 5)  # l <= 1 on (0.1, 2.0)
    k = three_passes(box)
    assert k.shape == (50, 13)  # 6 * (1 + 1) + 1 taps
    t = torch.arange(13) - 6.0
    torch.testing.assert_close(k.sum(1), torch.ones(50))
    torch.testing.assert_close((k * t**2).sum(1), sigma**2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(box, box.flip(1))  # symmetric


def test_vicreg_views_use_pils_blur_and_match_the_reference_pipeline():
    assert all(c.blur_kernel is None for c in A.VICREG_VIEWS)
    assert [c.blur_p for c in A.VICREG_VIEWS] == [1.0, 0.1]
    # the per-sample drawing: p = 1 blurs every sample with its own sigma; p = 0 changes nothing
    g = torch.Generator().manual_seed(0)
    k = three_passes(A.blur_kernels(256, 1.0, None, (0.1, 2.0), g))
    variances = (k * (torch.arange(13) - 6.0) ** 2).sum(1)
    assert variances.min() >= 0.01 - 1e-4 and variances.max() <= 4 + 1e-4 and variances.std() > 0.5
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(A.gaussian_blur(x, 0.0, None, generator=g), x)
    reference = A.torchvision_reference(A.VICREG_VIEWS[0])
    assert any(isinstance(op, A.PILGaussianBlur) for t in reference.transforms for op in getattr(t, "transforms", []))
