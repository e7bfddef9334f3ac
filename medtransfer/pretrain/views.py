"""Random views of a batch of scans for self-supervised pretraining: medical-safe augmentations.

Self-supervised methods learn what stays the same between two random views of one image, so the
augmentations decide what the backbone learns to ignore. ImageNet recipes (SimCLR, BYOL, DINO) crop as little as
8% of the image, flip, jitter colour and solarise. On a chest X-ray those would teach the backbone to ignore
exactly what matters: an 8% crop is often a patch of rib with no finding, a flip swaps the heart's side,
and there is no colour to jitter. Here, as in chest X-ray SSL work (MoCo-CXR, Sowrirajan et al. 2021; Azizi et
al. 2021), the views are mild: a random resized crop keeping 60-100% of the area, a small rotation, contrast
and brightness changes, an occasional blur and a little noise. All operate on normalised tensors on the
batch's device, so views are made where the model runs (GPU when there is one).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from medtransfer.config import PretrainConfig


def random_views(images: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """One random view of each image.

    Args:
        images: float (N, C, H, W), normalised (about zero mean, unit SD).
        cfg: the pretraining settings (crop_scale, rotation, flip, intensity, blur, noise).
        generator: a CPU generator for reproducible views (None: the global RNG).

    Returns:
        float (N, C, H, W) on the same device.
    """
    n, _, h, w = images.shape
    dev = images.device
    grid = _affine_grid(n, h, w, cfg, generator).to(dev)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    if cfg.intensity > 0:
        scale = 1 + cfg.intensity * (2 * _rand(n, generator) - 1)
        shift = (cfg.intensity / 2) * (2 * _rand(n, generator) - 1)
        out = out * scale.to(dev).view(n, 1, 1, 1) + shift.to(dev).view(n, 1, 1, 1)
    if cfg.blur > 0:
        chosen = _rand(n, generator) < cfg.blur
        if bool(chosen.any()):
            sigma = float(0.1 + 1.4 * _rand(1, generator)) * max(h, w) / 224  # 0.1-1.5 px at 224 px
            idx = chosen.nonzero().flatten().to(dev)
            out[idx] = _gaussian_blur(out[idx], sigma)
    if cfg.noise > 0:
        noise = torch.randn(out.shape, generator=generator) if generator is not None else torch.randn(out.shape)
        out = out + cfg.noise * noise.to(dev, out.dtype)
    return out


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) if generator is not None else torch.rand(n)


def _affine_grid(n: int, h: int, w: int, cfg: PretrainConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Sampling grids (N, H, W, 2) of a random resized crop, rotation and optional flip, as one affine map."""
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * _rand(n, generator)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * _rand(n, generator)
    ratio = torch.exp(log_ratio)
    sx, sy = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # crop width and height, fractions of the image
    too_big = (sx > 1) | (sy > 1)  # that aspect ratio does not fit at this area: a square crop (torchvision's fallback)
    sx = torch.where(too_big, torch.sqrt(area), sx)
    sy = torch.where(too_big, torch.sqrt(area), sy)
    cx = (1 - sx) * (2 * _rand(n, generator) - 1)  # crop centre in [-1, 1] coordinates, inside the image
    cy = (1 - sy) * (2 * _rand(n, generator) - 1)
    angle = torch.deg2rad(cfg.rotation * (2 * _rand(n, generator) - 1))
    flip = torch.where(_rand(n, generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx * cos * flip
    theta[:, 0, 1] = -sin * sy
    theta[:, 1, 0] = sin * sx * flip
    theta[:, 1, 1] = cos * sy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return F.affine_grid(theta, [n, 1, h, w], align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflection padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
