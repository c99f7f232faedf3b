"""Batched, per-sample random augmentations on the device: a uint8 batch in, float views out.

Every operation takes a float batch [B,3,H,W] in [0,1] on any device and draws each
sample's own parameters with `torch.rand(..., generator=generator, device=x.device)` (a
CUDA batch needs a CUDA generator, or None). There is no loop over samples and no host
synchronisation, so the views of a whole CIFAR batch cost milliseconds instead of a
DataLoader's per-image PIL work (Colab has 2 vCPUs). The semantics are torchvision's;
`torchvision_reference` builds the same pipeline with torchvision/PIL for the tests and the
benchmark. The one deliberate difference is the hue jitter (see `hue_matrix`).

Three ideas make it fast: crop+resize+flip and blur are per-sample separable linear maps of
the pixels (two batched matmuls, `_separable`); every colour op is a per-sample 3x3 colour
matrix plus offset (one batched matmul per op, `apply_jitter`); and a pipeline first draws
the whole batch's parameters (`View.sample`), then applies them (`View.render`), on a CPU in
blocks of 64 images that stay in the cache and in the process's heap (`CPU_BLOCK`).

[0] SimCLR, 2020, arXiv:2002.05709   [1] BYOL, 2020, arXiv:2006.07733
[2] VICReg, 2022, arXiv:2105.04906
"""
import functools
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


@functools.lru_cache(maxsize=None)
def _const(values: tuple, device: torch.device) -> Tensor:
    # Constants are made once per device: a fresh torch.tensor on CUDA every call is a copy.
    return torch.tensor(values, dtype=torch.float32, device=device)


def _uniform(shape, low: float, high: float, generator, device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _coin(n: int, p: float, generator, device) -> Tensor:
    """Per-sample Bernoulli(p) as a bool [n]."""
    return torch.rand(n, generator=generator, device=device) < p


# ---------------------------------------------------------------- geometry


def sample_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                      generator=None, device=None):
    """`RandomResizedCrop.get_params` for n samples at once.

    All 10 attempts of every sample are drawn together and each sample keeps its first
    valid one; a sample with none falls back to torchvision's central crop.
    Returns float tensors (top, left, h, w), each [n]. [0] SimCLR, 2020, arXiv:2002.05709
    """
    attempts = 10
    area = height * width * _uniform((n, attempts), scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]),
                                generator, device))
    w = torch.sqrt(area * aspect).round()  # round half to even, like Python's round
    h = torch.sqrt(area / aspect).round()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    index = torch.arange(attempts, device=device)
    first = torch.where(valid, index, attempts).amin(dim=1, keepdim=True)
    found = first.squeeze(1) < attempts
    first = first.clamp(max=attempts - 1)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)

    # torchvision's fallback: the largest central crop whose ratio is within `ratio`
    if width / height < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, float(fh))
    w = torch.where(found, w, float(fw))
    # top-left uniform over the valid integer positions (min guards u*(n) rounding up to n)
    u = torch.rand(2, n, generator=generator, device=device)
    top = torch.minimum((u[0] * (height - h + 1)).floor(), height - h)
    left = torch.minimum((u[1] * (width - w + 1)).floor(), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return top, left, h, w


def _separable(x: Tensor, ay: Tensor, ax: Tensor) -> Tensor:
    """out[b,c] = ay[b] @ x[b,c] @ ax[b]ᵀ with ay [B,S,H], ax [B,T,W]: a per-sample separable
    linear map of the pixels (resampling, blur) as two batched matmuls. On one CPU thread
    this beat grid_sample (1.5x) and reflect padding + a B*3-group convolution (2x)."""
    B, C, H, W = x.shape
    S, T = ay.shape[1], ax.shape[1]
    rows = torch.bmm(x.reshape(B, C * H, W), ax.transpose(1, 2).contiguous())  # [B,C*H,T]
    ay = ay[:, None].expand(B, C, S, H).reshape(B * C, S, H)
    return torch.bmm(ay, rows.view(B * C, H, T)).view(B, C, S, T)


def _interp_matrix(start, length, extent, size, flip=None, inside=True):
    """[B, size, extent] bilinear weights taking the interval [start, start+length) of an
    axis of `extent` pixels to `size` pixels (half-pixel centres, like torchvision's
    resize), mirrored where `flip`. inside=True clamps to the box's first and last pixels
    (resizing an already-cropped image); inside=False reads zeros outside the image."""
    u = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    if flip is not None:
        u = torch.where(flip[:, None], size - u, u)  # output pixel u reads crop pixel S-1-u
    src = start[:, None] + u * (length / size)[:, None] - 0.5  # continuous source pixel
    if inside:
        src = torch.minimum(torch.maximum(src, start[:, None]), (start + length - 1)[:, None])
    # bilinear weights are a tent: pixel j gets max(0, 1 - |src - j|), i.e. 1-f and f for the
    # two neighbours; pixels outside the image are not in the matrix, which is zero padding
    pixels = torch.arange(extent, device=start.device, dtype=torch.float32)
    distance = (src[:, :, None] - pixels).abs_()  # [B, size, extent], the only large allocation
    return distance.neg_().add_(1).clamp_(min=0)


def crop_flip(x, top, left, height, width, flip, size, inside=True):
    """Per-sample crop boxes (pixels, float [B]) resized bilinearly to size x size and
    mirrored where `flip` (bool [B] or None), in one separable resampling.

    Equivalent to one grid_sample with the per-sample affine map
    theta = [[±w/W, 0, (2j+w)/W-1], [0, h/H, (2i+h)/H-1]] (align_corners=False).
    """
    _, _, H, W = x.shape
    ay = _interp_matrix(top, height, H, size, None, inside)
    ax = _interp_matrix(left, width, W, size, flip, inside)
    return _separable(x, ay, ax)


def resized_crop_flip(x, size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                      generator=None):
    """RandomResizedCrop(size, scale, ratio, bilinear) then RandomHorizontalFlip(flip_p).

    No antialiasing: at CIFAR size every crop is upsampled, where it makes no difference.
    [0] SimCLR, 2020, arXiv:2002.05709
    """
    B, _, H, W = x.shape
    top, left, h, w = sample_crop_boxes(B, H, W, scale, ratio, generator, x.device)
    flip = _coin(B, flip_p, generator, x.device)
    return crop_flip(x, top, left, h, w, flip, size)


def pad_crop_flip(x, padding=4, flip_p=0.5, generator=None, size=None):
    """The supervised CIFAR augmentation: RandomCrop(size, padding, zero fill) then
    RandomHorizontalFlip(flip_p). Integer shifts give weights of exactly 0 and 1, so
    pixels are copied exactly."""
    B, _, H, W = x.shape
    size = H if size is None else size
    boxes = pad_crop_boxes(B, H, W, padding, size, generator, x.device)
    flip = _coin(B, flip_p, generator, x.device)
    return crop_flip(x, *boxes, flip, size, inside=False)


def pad_crop_boxes(n, height, width, padding=4, size=32, generator=None, device=None):
    """`RandomCrop(size, padding).get_params` for n samples: float (top, left, h, w), each
    [n], in the unpadded image's pixels (so top and left can be negative)."""
    u = torch.rand(2, n, generator=generator, device=device)
    # torchvision picks the top-left in the padded image uniformly in 0..H+2p-size
    top = (u[0] * (height + 2 * padding - size + 1)).floor().clamp(max=height + 2 * padding - size)
    left = (u[1] * (width + 2 * padding - size + 1)).floor().clamp(max=width + 2 * padding - size)
    side = torch.full((n,), float(size), device=device)
    return top - padding, left - padding, side, side


def resize(x, size):
    """Bilinear, antialiased resize to size x size (identity if already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


# ---------------------------------------------------------------- colour


def saturation_matrix(s: Tensor) -> Tensor:
    """[B,3,3]: blend each pixel with its grey level, s·I + (1-s)·1wᵀ (torchvision's
    adjust_saturation)."""
    eye = torch.eye(3, device=s.device)
    gray = _const(GRAY_WEIGHTS, s.device).expand(3, 3)  # every row is wᵀ
    return s[:, None, None] * eye + (1 - s)[:, None, None] * gray


def hue_matrix(h: Tensor) -> Tensor:
    """[B,3,3]: rotation by 2π·h about the grey axis (1,1,1) of RGB space, a linear
    stand-in for torchvision's HSV hue shift (h in turns, same direction: h>0 turns red
    towards yellow).

    HSV hue is the angle around the grey axis measured on a hexagon; a rotation about the
    axis measures it on a circle. On random colourful images this moves the HSV hue by
    the intended amount (mean error ~0.004 turns for |h| <= 0.1, tested), but unlike HSV it
    can change a pixel's max and min channel (value and saturation): the mean absolute pixel
    difference to adjust_hue at |h| = 0.1 is 0.03 (moderately coloured images) to 0.06
    (saturated ones), against 0.044 / 0.087 for no shift at all. It is also the least-squares
    best linear map commuting with RGB's channel cycle (fitted: same coefficients). A
    rotation of the (I,Q) plane of YIQ space has a 6x larger hue error (skewed axes). Being
    linear it shares one 3x3 matrix product with the other jitter ops.
    """
    theta = 2 * math.pi * h
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    r3 = 1 / math.sqrt(3)
    cross = _const(((0.0, -r3, r3), (r3, 0.0, -r3), (-r3, r3, 0.0)), h.device)  # [k]x
    # Rodrigues' formula with k = (1,1,1)/√3: R = cos·I + sin·[k]x + (1-cos)·kkᵀ
    return cos * torch.eye(3, device=h.device) + sin * cross + (1 - cos) / 3


def jitter_params(n, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8,
                  generator=None, device=None):
    """Per-sample ColorJitter parameters: factors [n, 4] (brightness, contrast, saturation,
    hue) drawn as torchvision does, neutral (1, 1, 1, 0) where RandomApply's coin (p) says
    no, and each sample's order of the 4 ops [n, 4] (a random permutation, like randperm)."""
    apply = _coin(n, p, generator, device)
    low = (max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue)
    high = (1 + brightness, 1 + contrast, 1 + saturation, hue)
    low, high = _const(low, device), _const(high, device)
    factors = torch.rand(n, 4, generator=generator, device=device) * (high - low) + low
    factors = torch.where(apply[:, None], factors, _const((1.0, 1.0, 1.0, 0.0), device))
    order = torch.rand(n, 4, generator=generator, device=device).argsort(dim=1)
    return factors, order


def apply_jitter(x, factors, order):
    """The 4 colour ops with given per-sample factors [B, 4] in per-sample order [B, 4].

    Each op maps a pixel affinely, x -> M x + v: brightness M = b·I; contrast M = c·I,
    v = (1-c)·(mean grey level of the current image); saturation see `saturation_matrix`;
    hue see `hue_matrix`. Like torchvision we clamp to [0,1] after each op, so 4 passes;
    at pass k each sample uses the op at position k of its order, all samples in one
    batched matrix product.
    """
    return _jitter_passes(x, *jitter_matrices(factors, order))


def jitter_matrices(factors, order):
    """The colour matrices [B, 4, 3, 3] of `apply_jitter`'s 4 passes, in each sample's order,
    and the weight [B, 4] of the grey level each pass adds (1-c for contrast, else 0)."""
    b, c, s, h = factors.unbind(dim=1)
    eye = torch.eye(3, device=factors.device)
    ops = torch.stack((b[:, None, None] * eye, c[:, None, None] * eye,  # [B, 4, 3, 3]
                       saturation_matrix(s), hue_matrix(h)), dim=1)
    rows = torch.arange(len(factors), device=factors.device)[:, None]
    return ops[rows, order], (order == 1) * (1 - c)[:, None]


def _jitter_passes(x, matrices, grey_weight):
    B, C, H, W = x.shape
    gray = _const(GRAY_WEIGHTS, x.device)
    x = x.reshape(B, C, H * W)
    buffers = (torch.empty_like(x), torch.empty_like(x))  # ping-pong: 2 allocations, not 4
    for k in range(4):
        # contrast blends towards the CURRENT image's grey level
        v = (x.mean(dim=2) @ gray) * grey_weight[:, k]
        # bmm + add_: baddbmm broadcasting v takes a ~5x slower path on a CPU
        x = torch.bmm(matrices[:, k], x, out=buffers[k % 2]).add_(v[:, None, None]).clamp_(0, 1)
    return x.view(B, C, H, W)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8,
                 generator=None):
    """RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p), per sample:
    its own factors and its own random order of the 4 ops, clamping after each.
    [0] SimCLR, 2020, arXiv:2002.05709"""
    params = jitter_params(x.shape[0], brightness, contrast, saturation, hue, p, generator,
                           x.device)
    return apply_jitter(x, *params)


def random_grayscale(x, p=0.2, generator=None):
    """RandomGrayscale(p): grey level in all 3 channels, torchvision's weights."""
    return _mix_channels(x, grayscale_matrices(_coin(x.shape[0], p, generator, x.device)))


def grayscale_matrices(apply):
    """[B, 3, 3]: every row the grey weights where `apply`, the identity elsewhere."""
    gray = _const(GRAY_WEIGHTS, apply.device).expand(3, 3)
    return torch.where(apply[:, None, None], gray, torch.eye(3, device=apply.device))


def _mix_channels(x, m):
    """out[b] = m[b] @ (the pixels of x[b] as 3 rows): a per-sample 3x3 colour matrix."""
    B, C, H, W = x.shape
    return torch.bmm(m, x.reshape(B, C, H * W)).view(B, C, H, W)


def _blur_matrix(k: Tensor, n: int, edge: str = "reflect") -> Tensor:
    """[B, n, n] 1-D convolution with per-sample kernels k [B, K] and the padding folded into
    the matrix: "reflect" (torchvision's GaussianBlur) or "replicate" (PIL's GaussianBlur
    repeats the edge pixel)."""
    half = k.shape[1] // 2
    index = torch.arange(-half, n + half, device=k.device).unfold(0, 2 * half + 1, 1)  # [n, K] taps
    if edge == "replicate":
        index = index.clamp(0, n - 1)
    else:
        index = index.abs()  # reflected at the start ...
        index = torch.where(index > n - 1, 2 * (n - 1) - index, index)  # ... and at the end
        index = index.clamp(0, n - 1)  # a kernel wider than twice the image reflects only once
    m = torch.zeros(k.shape[0], n, n, device=k.device)
    return m.scatter_add_(2, index.expand(k.shape[0], n, -1), k[:, None, :].expand(-1, n, -1))


def gaussian_blur(x, p=0.5, kernel_size=3, sigma=(0.1, 2.0), generator=None):
    """RandomApply([GaussianBlur], p), sigma ~ U(sigma) per sample.

    kernel_size=K (odd): torchvision's GaussianBlur(K, sigma), a Gaussian truncated to K taps
    with reflect padding (SimCLR, BYOL). kernel_size=None: PIL's ImageFilter.GaussianBlur(sigma),
    which the VICReg code uses: three box passes, no truncation (see `pil_box_kernels`).
    The 2-D blur is separable: a per-sample blur matrix along each axis, applied as two batched
    matmuls (see `_separable`); samples not drawn get a delta kernel (identity).
    [0] SimCLR, 2020, arXiv:2002.05709   [2] VICReg, 2022, arXiv:2105.04906
    """
    kernels = blur_kernels(x.shape[0], p, kernel_size, sigma, generator, x.device)
    return blur(x, kernels, *_blur_mode(kernel_size))


def _blur_mode(kernel_size) -> tuple:
    """(edge, passes) of `blur` for a kernel size: PIL's three box passes with the edge pixel
    repeated (kernel_size None), or one pass of torchvision's reflect-padded Gaussian."""
    return ("replicate", 3) if kernel_size is None else ("reflect", 1)


def blur_kernels(n, p=0.5, kernel_size=3, sigma=(0.1, 2.0), generator=None, device=None):
    """[n, K] normalised 1-D kernels, sigma ~ U(sigma), a delta where the coin (p) says no:
    Gaussians truncated to K = kernel_size taps, or (kernel_size None) the box that PIL's
    GaussianBlur(sigma) applies three times (`pil_box_kernels`)."""
    apply = _coin(n, p, generator, device)
    s = _uniform(n, sigma[0], sigma[1], generator, device)
    if kernel_size is None:
        k = pil_box_kernels(s, max_sigma=max(sigma))
    else:
        half = (kernel_size - 1) / 2
        t = torch.linspace(-half, half, kernel_size, device=device)
        k = torch.exp(-0.5 * (t / s[:, None]) ** 2)
        k = k / k.sum(dim=1, keepdim=True)
    centre = torch.arange(k.shape[1], device=device) == k.shape[1] // 2
    return torch.where(apply[:, None], k, centre.float())


def _pil_box_radius(sigma):
    """PIL's `_gaussian_blur_radius` (BoxBlur.c) for 3 passes: the integer part l and the
    fractional part a of the box radius whose 3-fold convolution has variance sigma²
    (Gwosdek et al., 2011, "Theoretical foundations of Gaussian convolution by extended box
    filtering", eq. 7, 11, 14). Works on floats and on tensors."""
    s2 = sigma * sigma / 3
    sqrt, floor = (torch.sqrt, torch.floor) if torch.is_tensor(s2) else (math.sqrt, math.floor)
    l = floor((sqrt(12 * s2 + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    return l, a


def pil_box_kernels(sigma: Tensor, max_sigma: Optional[float] = None) -> Tensor:
    """[n, 2L+3] the 1-D box of PIL's `ImageFilter.GaussianBlur(radius=sigma)` for sigma [n].

    PIL approximates a Gaussian by three passes of an "extended" box of radius l + a: weight
    1/(2(l+a)+1) on the 2l+1 central taps and a/(2(l+a)+1) on the next two, so that the three
    passes have a variance of exactly sigma² and a support of 6(l+1)+1 taps (13 at sigma = 2,
    where a 3-tap Gaussian spreads a point less than half as far). Each pass repeats the edge
    pixel, so the edges see three replicate-padded passes, not one (`blur(x, k, "replicate", 3)`).
    L is the largest l in the range (`max_sigma`, default the largest sigma given), so kernels
    drawn from one range share a shape. PIL rounds to uint8 after each pass; we do not
    (tests/test_blur.py: within 1.5/255 of PIL on delta and random images).
    """
    l, a = _pil_box_radius(sigma)
    l_max = int(_pil_box_radius(float(max_sigma if max_sigma is not None else sigma.max()))[0])
    taps = torch.arange(-(l_max + 1), l_max + 2, device=sigma.device).abs()
    box = torch.where(taps <= l[:, None], 1.0, torch.where(taps == l[:, None] + 1, a[:, None], 0.0))
    return box / (2 * (l + a) + 1)[:, None]  # sums to 1


def blur(x, kernels, edge: str = "reflect", passes: int = 1):
    """Each sample blurred by its own 1-D kernel [B, K] along both axes, `passes` times, with
    "reflect" or "replicate" padding at every pass (see `_blur_matrix`)."""
    H, W = x.shape[-2:]
    ay, ax = _blur_matrix(kernels, H, edge), _blur_matrix(kernels, W, edge)
    ay, ax = torch.linalg.matrix_power(ay, passes), torch.linalg.matrix_power(ax, passes)
    return _separable(x, ay, ax)


def solarize(x, p=0.2, threshold=0.5, generator=None):
    """RandomSolarize(p): x -> 1 - x where x >= threshold (0.5: PIL's 128 on uint8 images).
    [1] BYOL, 2020, arXiv:2006.07733"""
    return solarize_where(x, _coin(x.shape[0], p, generator, x.device), threshold)


def solarize_where(x, apply, threshold=0.5):
    """x -> 1 - x for pixels >= threshold, in the samples where `apply` (bool [B])."""
    apply = apply[:, None, None, None]
    if threshold == 0.5:
        # min(x, 1-x) is exactly that, and 2-x >= x leaves samples not drawn unchanged;
        # two arithmetic passes are ~5x faster on a CPU than a masked torch.where
        out = torch.where(apply, 1.0, 2.0) - x
        return torch.minimum(x, out, out=out)
    return torch.where(apply & (x >= threshold), 1 - x, x)


def normalize(x, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """(x - mean) / std per channel, as x * (1/std) + (-mean/std)."""
    scale = _const(tuple(1 / s for s in std), x.device)[:, None, None]
    shift = _const(tuple(-m / s for m, s in zip(mean, std)), x.device)[:, None, None]
    return (x * scale).add_(shift)  # 2x faster on a CPU than addcmul, which broadcasts slowly


def to_float(images: Tensor) -> Tensor:
    """uint8 [B,3,H,W] -> float32 in [0,1] on the same device (ValueError otherwise)."""
    _check_images(images)
    return images.float().div_(255)


def _check_images(images) -> None:
    if not (isinstance(images, Tensor) and images.dtype == torch.uint8
            and images.dim() == 4 and images.shape[1] == 3):
        got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
               if isinstance(images, Tensor) else type(images).__name__)
        raise ValueError(f"expected a uint8 image batch [B, 3, H, W], got a {got}")


# ---------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class ViewConfig:
    """One view's augmentation settings. The defaults augment nothing."""
    crop_scale: Optional[tuple] = None  # RandomResizedCrop scale; None: no random crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # torchvision's default
    flip_p: float = 0.0
    jitter: tuple = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_kernel: Optional[int] = 3  # torchvision's GaussianBlur(3); None: PIL's (no truncation)
    blur_sigma: tuple = (0.1, 2.0)  # SimCLR's sigma range
    solarize_p: float = 0.0
    pad_crop: Optional[int] = None  # RandomCrop padding (supervised); used if crop_scale is None


class View:
    """One augmentation pipeline, in torchvision's order: crop+flip, jitter, grayscale,
    blur, solarize, normalize. Call it on a uint8 [B,3,H,W] batch (any device, optional
    `generator=`); returns a normalised float32 [B,3,size,size] batch on that device.

    It works in two steps: `sample` draws every random parameter of the whole batch (in the
    order the ops above draw them; the colour ops' as 3x3 matrices), `render` applies them to
    images, so a CPU can render a batch block by block (`_in_cpu_blocks`). Image-sized
    matrices (crop, blur) are built per block: a whole batch's would page-fault (see below).
    """

    def __init__(self, config: ViewConfig, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32):
        self.config, self.mean, self.std, self.size = config, tuple(mean), tuple(std), size

    def __call__(self, images: Tensor, generator=None) -> Tensor:
        _check_images(images)
        return _render_views((self,), images, to_float, generator)[0]

    def apply(self, x: Tensor, generator=None) -> Tensor:
        """The pipeline on a float batch in [0,1] (not modified)."""
        return _render_views((self,), x, lambda block: block, generator)[0]

    def sample(self, n: int, height: int, width: int, generator=None, device=None) -> dict:
        """Every random draw of the pipeline for n images of height x width, as a dict of
        per-sample tensors [n, ...] (or tuples of them). Python checks the config only: ops
        that can never fire draw nothing."""
        c, g, params = self.config, generator, {}
        box = None
        if c.crop_scale is not None:
            box = sample_crop_boxes(n, height, width, c.crop_scale, c.crop_ratio, g, device)
        elif c.pad_crop is not None:
            box = pad_crop_boxes(n, height, width, c.pad_crop, self.size, g, device)
        if box is not None:  # a crop always draws its flip coin, as the crop ops do
            params["crop"] = (*box, _coin(n, c.flip_p, g, device))
        elif c.flip_p > 0:
            params["flip"] = _coin(n, c.flip_p, g, device)
        if c.jitter_p > 0 and any(c.jitter):
            params["jitter"] = jitter_matrices(*jitter_params(n, *c.jitter, p=c.jitter_p, generator=g,
                                                              device=device))
        if c.grayscale_p > 0:
            params["grayscale"] = grayscale_matrices(_coin(n, c.grayscale_p, g, device))
        if c.blur_p > 0:
            params["blur"] = blur_kernels(n, c.blur_p, c.blur_kernel, c.blur_sigma, g, device)
        if c.solarize_p > 0:
            params["solarize"] = _coin(n, c.solarize_p, g, device)
        return params

    def render(self, x: Tensor, params: dict) -> Tensor:
        """The pipeline with the parameters `sample` drew, on a float batch in [0,1]."""
        if "crop" in params:  # a padded crop (no crop_scale) reads zeros outside the image
            x = crop_flip(x, *params["crop"], self.size, inside=self.config.crop_scale is not None)
        else:
            x = resize(x, self.size)
            if "flip" in params:
                x = torch.where(params["flip"][:, None, None, None], x.flip(-1), x)
        if "jitter" in params:
            x = _jitter_passes(x, *params["jitter"])
        if "grayscale" in params:
            x = _mix_channels(x, params["grayscale"])
        if "blur" in params:
            x = blur(x, params["blur"], *_blur_mode(self.config.blur_kernel))
        if "solarize" in params:
            x = solarize_where(x, params["solarize"])
        return normalize(x, self.mean, self.std)

    def __repr__(self):
        return f"View({self.config}, size={self.size})"


class Views:
    """Several views of one batch: `Views(cfg1, cfg2, ...)(images)` returns a tuple with
    one normalised float batch per config."""

    def __init__(self, *configs: ViewConfig, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32):
        self.views = tuple(View(c, mean, std, size) for c in configs)

    def __call__(self, images: Tensor, generator=None) -> tuple:
        _check_images(images)
        return _render_views(self.views, images, to_float, generator)

    def __repr__(self):
        return "Views(" + ", ".join(map(repr, self.views)) + ")"


# On a CPU the pipelines render a batch in blocks of this many images. A block's
# intermediate tensors (768 KB each) stay in the 2 MB L2 cache and in the process's heap;
# with glibc's defaults, whole-batch ones (6 MB at batch 512) go back to the OS when freed
# and page-fault again in the next call, which cost as much as the arithmetic. Measured
# (thesis pipeline, batch 512, one thread): the whole batch at once took about 45 ms and
# 15,000-19,000 page faults per call, blocks of 64 take 30-36 ms and 3,000-5,600 page faults
# in benchmarks/augment_speed.py, most of them in the two fresh output batches.
# The random parameters are drawn for the whole batch first, so blocks do not change them.
# GPUs render the whole batch at once.
CPU_BLOCK = 64


def _render_views(views, batch: Tensor, convert, generator=None) -> tuple:
    """Each view of `batch`: every view's parameters drawn for the whole batch (one view
    after the other), then rendered on `convert(batch[block])`, converted once for all views."""
    n, _, height, width = batch.shape
    params = [view.sample(n, height, width, generator, batch.device) for view in views]

    def render(block):
        x = convert(batch[block])
        return tuple(view.render(x, _take(p, block)) for view, p in zip(views, params))

    return _in_cpu_blocks(render, n, batch.device)


def _in_cpu_blocks(render, n: int, device) -> tuple:
    """render(slice) -> tuple of batches, for slice(0, n) at once, or on a CPU block by
    block into one output per batch."""
    if device.type != "cpu" or n <= CPU_BLOCK:
        return render(slice(0, n))
    outs = None
    for start in range(0, n, CPU_BLOCK):
        block = slice(start, min(start + CPU_BLOCK, n))
        parts = render(block)
        if outs is None:
            outs = tuple(p.new_empty((n, *p.shape[1:])) for p in parts)
        for out, part in zip(outs, parts):
            out[block] = part
    return outs


def _take(params: dict, block: slice) -> dict:
    """The parameters of the samples in `block` (values are tensors or tuples of them)."""
    return {k: v[block] if isinstance(v, Tensor) else tuple(t[block] for t in v) for k, v in params.items()}


# VICReg study (sec. 3.2.1): the VICReg paper's pipeline with crop scale (0.2, 1) instead of
# (0.08, 1) for 32x32 images. From the paper [2] (the SimCLR/BYOL recipe): flip 0.5, jitter
# (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarize p 0.0 / 0.2. The
# VICReg code blurs with PIL's ImageFilter.GaussianBlur(sigma), sigma ~ U(0.1, 2.0), which has
# no kernel size: blur_kernel=None renders PIL's kernel (up to 13 taps at sigma = 2). A 3-tap
# Gaussian (SimCLR's 10% of the image side) spread a point 0.80 px at sigma = 2, PIL 2.03 px.
_VICREG = dict(crop_scale=(0.2, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
               grayscale_p=0.2, blur_kernel=None)
VICREG_VIEWS = (ViewConfig(**_VICREG, blur_p=1.0, solarize_p=0.0),
                ViewConfig(**_VICREG, blur_p=0.1, solarize_p=0.2))

# Thesis (sec. 2.3.3 lists the ops, sec. 4.2 drops the blur at CIFAR resolution; it gives no
# values, SPEC sec. 6 pins these): crop scale (0.08, 1), flip 0.5, jitter (0.4, 0.4, 0.4,
# 0.1) p 0.8, grayscale 0.2. Solarize p 0.0 / 0.2 is BYOL's asymmetric choice [1], applied
# here to all thesis methods (moco, byol, simsiam, barlow_twins, directpred, simclr).
_THESIS = dict(crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
               grayscale_p=0.2)
THESIS_VIEWS = (ViewConfig(**_THESIS, solarize_p=0.0), ViewConfig(**_THESIS, solarize_p=0.2))

# Supervised baseline (thesis, 92.34%): RandomCrop(32, padding=4) + flip, nothing else.
SUPERVISED_VIEWS = (ViewConfig(pad_crop=4, flip_p=0.5),)

METHOD_VIEWS = {"simclr": THESIS_VIEWS, "moco": THESIS_VIEWS, "byol": THESIS_VIEWS,
                "simsiam": THESIS_VIEWS, "barlow_twins": THESIS_VIEWS,
                "directpred": THESIS_VIEWS, "vicreg": VICREG_VIEWS}


def train_views(method: str, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32, crop_scale=None) -> Views:
    """The training-time views of a method: two for the self-supervised methods, one (a
    1-tuple) for "supervised". `crop_scale` replaces the random-resized-crop scale of the
    views that crop (the study raised its lower bound from 0.08 to 0.2 for 32 px images;
    quick mode raises it further for the 8x8-pixel `digits`)."""
    configs = {**METHOD_VIEWS, "supervised": SUPERVISED_VIEWS}.get(method)
    if configs is None:
        raise ValueError(f"unknown method {method!r}; expected one of "
                         f"{sorted(METHOD_VIEWS) + ['supervised']}")
    if crop_scale is not None:
        configs = [replace(c, crop_scale=tuple(crop_scale)) if c.crop_scale else c for c in configs]
    return Views(*configs, mean=mean, std=std, size=size)


def two_views(method: str, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32) -> Views:
    """A self-supervised method's two-view pipeline: `x1, x2 = two_views("byol")(images)`."""
    if method == "supervised":
        raise ValueError("'supervised' trains on one view: use train_views('supervised')")
    if method not in METHOD_VIEWS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHOD_VIEWS)}")
    return train_views(method, mean, std, size)


def eval_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32) -> View:
    """uint8 batch -> normalised float batch (resized only if it is not size x size)."""
    return View(ViewConfig(), mean, std, size)


def linear_eval_transform(mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32, flip=True,
                          scale=(0.08, 1.0)) -> View:
    """Random resized crop (+ flip) for a linear probe: the thesis's probe uses the crop
    only (flip=False), the VICReg study's crop + flip."""
    return View(ViewConfig(crop_scale=tuple(scale), flip_p=0.5 if flip else 0.0),
                mean, std, size)


def torchvision_reference(config: ViewConfig, mean=CIFAR10_MEAN, std=CIFAR10_STD, size=32):
    """The same view as a torchvision/PIL `Compose` on ONE PIL image (tests, benchmark)."""
    import torchvision.transforms as T

    c = config
    if c.crop_scale is not None:
        ops = [T.RandomResizedCrop(size, c.crop_scale, c.crop_ratio,
                                   T.InterpolationMode.BILINEAR)]
    elif c.pad_crop is not None:
        ops = [T.RandomCrop(size, padding=c.pad_crop)]
    else:
        ops = [T.Resize((size, size), T.InterpolationMode.BILINEAR)]
    if c.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(c.flip_p))
    if c.jitter_p > 0 and any(c.jitter):
        ops.append(T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_p))
    if c.grayscale_p > 0:
        ops.append(T.RandomGrayscale(c.grayscale_p))
    if c.blur_p > 0:
        blur_op = PILGaussianBlur(c.blur_sigma) if c.blur_kernel is None else T.GaussianBlur(c.blur_kernel, c.blur_sigma)
        ops.append(T.RandomApply([blur_op], p=c.blur_p))
    if c.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=c.solarize_p))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class PILGaussianBlur:
    """The VICReg code's blur on ONE PIL image: `ImageFilter.GaussianBlur(sigma)` with sigma ~
    U(sigma) (drawn from torch's default generator, like torchvision's transforms).
    [2] VICReg, 2022, arXiv:2105.04906 (its augmentations.py)"""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img):
        from PIL import ImageFilter

        s = float(torch.empty(1).uniform_(*self.sigma))
        return img.filter(ImageFilter.GaussianBlur(s))

    def __repr__(self):
        return f"PILGaussianBlur(sigma={self.sigma})"


# ---------------------------------------------------------------- ImageNet backbones

# torchvision's ImageNet statistics, which the VICReg ImageNet ResNet-50 was trained with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform(size: int = 224, train: bool = False, flip: bool = True, scale=(0.08, 1.0)) -> View:
    """CIFAR batches for an ImageNet backbone (study sec. 3.4): upsampled bilinearly to size x size
    and normalized with ImageNet's statistics. train=True: the VICReg linear-evaluation crop
    (+ flip), drawn on the small image and resampled straight to `size` (one resampling).
    [2] VICReg, 2022, arXiv:2105.04906"""
    if train:
        return linear_eval_transform(IMAGENET_MEAN, IMAGENET_STD, size, flip, scale)
    return eval_transform(IMAGENET_MEAN, IMAGENET_STD, size)
