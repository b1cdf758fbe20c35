"""Paired augmentation of segmentation batches on the training device, 2D (N, C, H, W) or 3D (N, C, D, H, W).

The geometry (flips, right-angle rotations, a small affine transform, an elastic warp) must move the image, the
target and the loss mask together, and it must never invent labels: integer targets are resampled by nearest
neighbour with index arithmetic (exact for any dtype, even labels above 2**24 that a float round trip would
change), float targets (probabilities, boundaries, distances) bilinearly or trilinearly. Intensity changes (gamma,
blur, noise, stain and colour jitter, inversion) touch the image only. Each sample draws its own parameters from a seeded generator, and everything
is applied with batched tensor operations: no Python loop over samples or pixels.

Affine and elastic transforms sample all tensors with one grid (``grid_sample``, align_corners=False). Outside the
input the image is reflected, while targets and masks read 0 there; those pixels hold no real label, so the returned
mask is 0 wherever a sampling point is not between the input's pixel centres, and losses given that mask skip them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deepscope.errors import DeepscopeError

EDGE_TOLERANCE = 1e-3  # pixels; a sampling point this far past the outer pixel centre still counts as inside
OD_FLOOR = 1 / 255  # intensities are clamped to this before the log of the optical density, as an 8-bit camera would
HED_SHIFT = 0.05  # a stain's optical-density shift is U(-s, s) times this; the scale 1 + U(-s, s) does the most


@dataclass
class SegAugmentConfig:
    """Segmentation augmentation; all zeros/False leaves the batch unchanged.

    ``rot90`` turns by a random multiple of 90 degrees in the last two spatial axes (H, W); when they differ in
    size a turn would change the shape, so rotation is skipped for that batch without a warning.
    """

    flip: bool = True  # independent random flip along every spatial axis
    rot90: bool = True  # random multiple of 90 degrees in (H, W), only when H == W
    affine_degrees: float = 0.0  # rotation in (H, W) by up to this many degrees either way
    affine_scale: float = 0.0  # isotropic scale in [1 - s, 1 + s]; below 1 shrinks the content
    elastic_sigma: float = 0.0  # smoothness of the elastic displacement field, Gaussian sigma in pixels
    elastic_alpha: float = 0.0  # typical (root-mean-square) elastic displacement per axis in pixels, 0 disables
    noise_std: float = 0.0  # standard deviation of additive Gaussian noise on the image
    gamma: float = 0.0  # image ** exp(uniform(-g, g)) on the per-sample min-max rescaled image
    blur_sigma: float = 0.0  # Gaussian blur of the image with a sigma drawn from [0, blur_sigma] pixels
    hed_jitter: float = 0.0  # H&E stain jitter of 3-channel images: each stain scaled by 1 + U(-s, s), see _hed_jitter
    colour_jitter: float = 0.0  # brightness, contrast (and saturation of 3 channels) factors in [1 - c, 1 + c]
    invert: float = 0.0  # probability of replacing a sample by 1 - x (bright background <-> dark background)

    def __post_init__(self) -> None:
        names = (
            "affine_degrees",
            "affine_scale",
            "elastic_sigma",
            "elastic_alpha",
            "noise_std",
            "gamma",
            "blur_sigma",
            "hed_jitter",
            "colour_jitter",
            "invert",
        )
        for name in names:
            if getattr(self, name) < 0:
                raise DeepscopeError(f"augmentation {name} must be >= 0, got {getattr(self, name)}")
        for name, meaning in (("affine_scale", "scales"), ("hed_jitter", "stain scales"), ("colour_jitter", "factors")):
            if getattr(self, name) >= 1:
                raise DeepscopeError(
                    f"augmentation {name} must be below 1 ({meaning} in [1 - s, 1 + s]), got {getattr(self, name)}"
                )
        if self.invert > 1:
            raise DeepscopeError(f"augmentation invert is a probability, at most 1, got {self.invert}")


def _uniform(generator: torch.Generator, n: int, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device).to(device)


def _symmetric(limit: float, generator: torch.Generator, n: int, device: torch.device) -> Tensor:
    """Per-sample values uniform in [-limit, limit]."""
    return limit * (2 * _uniform(generator, n, device) - 1)


def _rows(values: Tensor, ndim: int) -> Tensor:
    """A per-sample vector shaped to broadcast against an ``ndim`` batch."""
    return values.view(-1, *[1] * (ndim - 1))


def _check(image: Tensor, target: Tensor, mask: Tensor | None) -> None:
    if image.ndim not in (4, 5):
        raise DeepscopeError(f"image must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise DeepscopeError(f"image must be a float tensor to be resampled, got {image.dtype}")
    for name, other in (("target", target), ("mask", mask)):
        if other is None:
            continue
        if other.ndim not in (image.ndim - 1, image.ndim):
            shapes = f"image shape {tuple(image.shape)}, {name} shape {tuple(other.shape)}"
            raise DeepscopeError(f"{name} must be (N, *spatial) or (N, K, *spatial) like the image: {shapes}")
        if other.shape[0] != image.shape[0] or other.shape[-(image.ndim - 2) :] != image.shape[2:]:
            raise DeepscopeError(
                f"image shape {tuple(image.shape)} and {name} shape {tuple(other.shape)} differ in batch size or spatial shape"
            )


def _rot90(x: Tensor, turns: Tensor) -> Tensor:
    """Each sample turned ``turns[i]`` quarter turns in the last two axes (one ``where`` per case, not per sample)."""
    out = x
    for k in (1, 2, 3):
        out = torch.where(_rows(turns == k, x.ndim), x.rot90(k, (-2, -1)), out)
    return out


def gaussian_kernels(sigma: Tensor, radius: int) -> Tensor:
    """Normalized 1D Gaussians of length 2 * radius + 1, one row per sigma; sigma 0 gives the identity kernel."""
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    kernels = torch.exp(-0.5 * (offsets / sigma.clamp_min(1e-3)[:, None]) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def _blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with one sigma per sample, edges replicated.

    Samples and channels are folded into the channel axis of one grouped convolution per spatial axis, so each
    sample gets its own kernel; ``radius`` is passed in (from the config) to avoid reading ``sigma`` back from the GPU.
    """
    n, c, *spatial = x.shape
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    kernels = gaussian_kernels(sigma.to(torch.float32), radius).to(x.dtype).repeat_interleave(c, 0)
    out = F.pad(x.reshape(1, n * c, *spatial), [radius] * 2 * len(spatial), mode="replicate")
    for axis in range(len(spatial)):
        shape = [1] * len(spatial)
        shape[axis] = 2 * radius + 1
        out = conv(out, kernels.view(n * c, 1, *shape), groups=n * c)
    return out.view(n, c, *spatial)


def _affine(
    config: SegAugmentConfig, generator: torch.Generator, n: int, spatial: list[int], device: torch.device
) -> Tensor:
    """``affine_grid`` matrices (N, nd, nd + 1): rotation in (H, W) and isotropic scale, both about the centre.

    The rotation is built in pixel units and then expressed in normalized coordinates, so that it stays a rotation
    (not a shear) on images whose H and W differ.
    """
    nd = len(spatial)
    angle = torch.deg2rad(_symmetric(config.affine_degrees, generator, n, device))
    scale = 1 + _symmetric(config.affine_scale, generator, n, device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    width, height = spatial[-1], spatial[-2]
    theta = torch.zeros(n, nd, nd + 1, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * height / width  # grid coordinates list x (W) first, then y (H)
    theta[:, 1, 0], theta[:, 1, 1] = sin * width / height, cos
    if nd == 3:
        theta[:, 2, 2] = 1 / scale
    return theta


def _elastic(
    config: SegAugmentConfig, generator: torch.Generator, n: int, spatial: list[int], device: torch.device
) -> Tensor:
    """Smooth random displacements (N, *spatial, nd) in normalized grid units, about ``elastic_alpha`` pixels RMS per axis.

    Smoothing white noise with a normalized Gaussian divides its standard deviation by sqrt(sum of squared kernel
    weights) per axis; dividing by that factor makes ``elastic_alpha`` a displacement in pixels whatever the sigma.
    """
    nd = len(spatial)
    noise = torch.randn(n, nd, *spatial, generator=generator, device=generator.device).to(device)
    radius = math.ceil(3 * config.elastic_sigma)
    sigma = torch.full((n,), config.elastic_sigma, device=device)
    field = _blur(noise, sigma, radius)
    spread = gaussian_kernels(sigma[:1], radius).square().sum().sqrt() ** nd
    pixels = config.elastic_alpha * field / spread
    sizes = torch.tensor(spatial, dtype=torch.float32, device=device)
    return (2 * pixels.movedim(1, -1) / sizes).flip(-1)  # axis order (D, H, W) -> grid order (x, y, z)


def _source_pixels(grid: Tensor, spatial: list[int]) -> Tensor:
    """Sampling points of a normalized grid as pixel coordinates in axis order (D, H, W), align_corners=False."""
    sizes = torch.tensor(spatial, dtype=grid.dtype, device=grid.device)
    return ((grid.flip(-1) + 1) * sizes - 1) / 2


def _nearest(x: Tensor, pixels: Tensor) -> Tensor:
    """Nearest-neighbour resampling by gathering indices, exact for every dtype; points outside the input read 0."""
    n, c, *spatial = x.shape
    index = torch.round(pixels).long()
    sizes = torch.tensor(spatial, device=x.device)
    valid = ((index >= 0) & (index < sizes)).all(-1)
    strides = torch.tensor([math.prod(spatial[axis + 1 :]) for axis in range(len(spatial))], device=x.device)
    flat = (torch.minimum(index.clamp_min(0), sizes - 1) * strides).sum(-1).flatten(1)
    out = x.flatten(2).gather(2, flat[:, None].expand(n, c, -1)).view(n, c, *spatial)
    return out.masked_fill(~valid[:, None], 0)


def _resample(image: Tensor, target: Tensor, mask: Tensor, grid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Image, target and mask through one sampling grid; the mask also loses every point outside the input."""
    spatial = list(image.shape[2:])
    image = F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
    pixels = _source_pixels(grid, spatial)
    if target.is_floating_point():
        target = F.grid_sample(
            target, grid.to(target.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )
    else:
        target = _nearest(target, pixels)
    sizes = torch.tensor(spatial, dtype=pixels.dtype, device=pixels.device)
    inside = ((pixels >= -EDGE_TOLERANCE) & (pixels <= sizes - 1 + EDGE_TOLERANCE)).all(-1)
    mask = _nearest(mask, pixels).masked_fill(~inside[:, None], 0)
    return image, target, mask


def _gamma(x: Tensor, limit: float, generator: torch.Generator) -> Tensor:
    """Gamma on the per-sample min-max rescaled image, then back to the sample's own range (min and max stay put)."""
    dims = tuple(range(1, x.ndim))
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = (high - low).clamp_min(torch.finfo(x.dtype).tiny)
    exponent = _rows(torch.exp(_symmetric(limit, generator, x.shape[0], x.device)), x.ndim).to(x.dtype)
    return ((x - low) / span).clamp(0, 1) ** exponent * span + low


def _hed_jitter(x: Tensor, limit: float, generator: torch.Generator) -> Tensor:
    """Stain augmentation of (N, 3, *spatial) RGB images in the HED colour space (Tellez et al. 2018).

    Intensities are read as transmitted light: optical density ``-ln(max(x, OD_FLOOR))`` is unmixed into
    haematoxylin, eosin and DAB with skimage's ``hed_from_rgb``, each stain ``h`` becomes ``h * (1 + a) + b`` with
    ``a`` in U(-s, s) and ``b`` in U(-s, s) * ``HED_SHIFT`` (in natural-log optical density) per sample and stain,
    and is mixed back with ``rgb_from_hed``. The floor is 1/255 rather than skimage's 1e-6 because percentile
    normalization maps the darkest percent of pixels to 0 or below, and an optical density of 13.8 there turns a
    small stain change into a large one. Stains are not clipped at 0 (skimage clips them), so s = 0 returns the
    input to float precision; instead a pixel may not get a negative optical density (brighter than the light) unless
    it had one, which keeps the few strongly coloured dark pixels from flaring up to many times the background.
    Values below the floor keep their offset from it. The mixing matrices and the stain scales fold into one 3 x 3
    matrix per sample, applied with one einsum (skimage's rgb2hed takes one numpy image at a time).
    """
    n, dtype = x.shape[0], x.dtype
    # skimage.color imports scipy: not before the work starts
    from skimage.color import hed_from_rgb, rgb_from_hed

    unmix = torch.tensor(hed_from_rgb, dtype=torch.float32, device=x.device)
    mix = torch.tensor(rgb_from_hed, dtype=torch.float32, device=x.device)
    scale = 1 + _symmetric(limit, generator, 3 * n, x.device).view(n, 3)
    shift = HED_SHIFT * _symmetric(limit, generator, 3 * n, x.device).view(n, 3)
    matrix = torch.einsum("ij,nj,jk->nik", unmix, scale, mix)  # od_row @ unmix @ diag(scale) @ mix
    offset = shift @ mix
    floored = x.float().clamp_min(OD_FLOOR)
    density = -torch.log(floored)
    jittered = torch.einsum("ni...,nik->nk...", density, matrix) + offset.view(n, 3, *[1] * (x.ndim - 2))
    jittered = torch.maximum(jittered, density.clamp_max(0))  # no brighter than the light unless it already was
    return (torch.exp(-jittered) + (x.float() - floored)).to(dtype)


def _colour_jitter(x: Tensor, limit: float, generator: torch.Generator) -> Tensor:
    """Brightness (x * f), contrast (about the sample's mean) and, for 3 channels, saturation (about each pixel's
    channel mean), in that fixed order, each with its own per-sample factor f in [1 - c, 1 + c].

    Multiplying keeps a dark background at 0, as a brighter or dimmer exposure would; a grey image stored as RGB
    has no saturation to change, so it stays grey."""
    n, dims = x.shape[0], tuple(range(1, x.ndim))
    brightness, contrast = (_rows(1 + _symmetric(limit, generator, n, x.device), x.ndim).to(x.dtype) for _ in range(2))
    x = x * brightness
    mean = x.mean(dims, keepdim=True)
    x = (x - mean) * contrast + mean
    if x.shape[1] == 3:
        grey = x.mean(1, keepdim=True)
        x = (x - grey) * _rows(1 + _symmetric(limit, generator, n, x.device), x.ndim).to(x.dtype) + grey
    return x


def augment_pair(
    image: Tensor, target: Tensor, config: SegAugmentConfig, generator: torch.Generator, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Augment an image batch and its target (and loss mask) with the same per-sample geometry.

    ``image`` is float (N, C, *spatial); ``target`` is (N, *spatial) or (N, K, *spatial), integer labels or float
    maps; ``mask`` likewise, any dtype. Target and mask come back in their own shape and dtype. Without a mask the
    returned one is float32 (N, 1, *spatial): 1 where the target holds real data, 0 where an affine or elastic
    transform sampled from outside the input (the target reads 0 there), so pass it to the loss.
    Order: flips, rot90, affine + elastic (one resampling), then gamma, blur, noise, stain (HED) jitter, colour
    jitter and inversion on the image.
    """
    _check(image, target, mask)
    n, spatial, device = image.shape[0], list(image.shape[2:]), image.device
    has_channel = target.ndim == image.ndim
    target_c = target if has_channel else target.unsqueeze(1)
    if mask is None:
        mask_c = torch.ones(n, 1, *spatial, device=device)
    else:
        mask_c = mask if mask.ndim == image.ndim else mask.unsqueeze(1)
    if config.flip:
        for axis in range(2, image.ndim):
            flip = _uniform(generator, n, device) < 0.5
            image, target_c, mask_c = (
                torch.where(_rows(flip, x.ndim), x.flip(axis), x) for x in (image, target_c, mask_c)
            )
    if config.rot90 and spatial[-1] == spatial[-2]:
        turns = torch.randint(4, (n,), generator=generator, device=generator.device).to(device)
        image, target_c, mask_c = (_rot90(x, turns) for x in (image, target_c, mask_c))
    if config.affine_degrees > 0 or config.affine_scale > 0 or config.elastic_alpha > 0:
        theta = _affine(config, generator, n, spatial, device)
        grid = F.affine_grid(theta, [n, 1, *spatial], align_corners=False)
        if config.elastic_alpha > 0:
            grid = grid + _elastic(config, generator, n, spatial, device)
        image, target_c, mask_c = _resample(image, target_c, mask_c, grid)
    if config.gamma > 0:
        image = _gamma(image, config.gamma, generator)
    if config.blur_sigma > 0:
        sigma = config.blur_sigma * _uniform(generator, n, device)
        image = _blur(image, sigma, math.ceil(3 * config.blur_sigma))
    if config.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator, device=generator.device)
        image = image + config.noise_std * noise.to(image)
    if config.hed_jitter > 0 and image.shape[1] == 3:
        image = _hed_jitter(image, config.hed_jitter, generator)
    if config.colour_jitter > 0:
        image = _colour_jitter(image, config.colour_jitter, generator)
    if config.invert > 0:
        invert = _uniform(generator, n, device) < config.invert
        image = torch.where(_rows(invert, image.ndim), 1 - image, image)
    if mask is not None and mask.ndim != image.ndim:
        mask_c = mask_c.squeeze(1)
    return image, target_c if has_channel else target_c.squeeze(1), mask_c
