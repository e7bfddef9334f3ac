"""MONAI dictionary-transform pipelines built from an :class:`InputSpec` (key ``"image"``).

The input of every pipeline is what :func:`medtransfer.data.loading.load_case` returns: float32
(1, *spatial) in [0, 1]. The pipeline is split in three so that the expensive, deterministic part can be
cached (:mod:`medtransfer.data.dataset`):

1. :func:`resize_transforms`: resize to ``spec.size`` (``keep_aspect``: fit inside and pad with 0). Output
   float32 (1, *size) in [0, 1]: this is what the disk cache stores.
2. :func:`random_transforms` (training only): flips, rotation, zoom, contrast/brightness, on [0, 1] images.
3. :func:`finalise_transforms`: replicate to ``spec.channels`` and normalise with ``spec.mean``/``std``.

:func:`deterministic_transforms` is 1 followed by 3: the whole evaluation/prediction pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandFlipd,
    Randomizable,
    RandRotated,
    RandShiftIntensityd,
    RandZoomd,
    RepeatChanneld,
    Resize,
    SpatialPad,
)

from medtransfer.config import AugmentConfig
from medtransfer.data.spec import InputSpec

KEY = "image"


class FitResized(MapTransform):
    """Resize a channel-first image to ``spatial_size``; with ``keep_aspect`` fit inside it and pad with 0.

    Shrinking uses ``area`` interpolation (an average over each output pixel's footprint, so no aliasing of
    fine texture such as trabecular bone); enlarging uses (bi|tri)linear interpolation. Fitting then padding
    gives the same result as the usual "pad to square, then resize" at a fraction of the cost.
    """

    def __init__(self, keys: str | Sequence[str], spatial_size: Sequence[int], keep_aspect: bool = False) -> None:
        super().__init__(keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.keep_aspect = keep_aspect
        self._pad = SpatialPad(self.spatial_size, method="symmetric", mode="constant")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._fit(d[key])
        return d

    def _fit(self, img: Any) -> Any:
        src = tuple(int(s) for s in img.shape[1:])
        if len(src) != len(self.spatial_size):
            raise ValueError(f"image has {len(src)} spatial dims {src} but the target size is {self.spatial_size}")
        target = self.spatial_size
        if self.keep_aspect:
            scale = min(t / s for t, s in zip(target, src, strict=True))
            target = tuple(max(1, min(t, round(s * scale))) for t, s in zip(target, src, strict=True))
        if target != src:
            shrink = all(t <= s for t, s in zip(target, src, strict=True))
            mode = "area" if shrink else ("bilinear" if len(src) == 2 else "trilinear")
            img = Resize(target, mode=mode, align_corners=None if shrink else False)(img)
        return self._pad(img) if target != self.spatial_size else img


class _Clampd(MapTransform):
    """Clamp to [0, 1] after intensity augmentation, so augmented images stay in the cached value range."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.clamp(torch.as_tensor(d[key]), 0.0, 1.0)
        return d


def resize_transforms(spec: InputSpec) -> Compose:
    """The cached, deterministic geometry: float32 (1, *spatial) [0, 1] → float32 tensor (1, *spec.size) [0, 1]."""
    return Compose([
        EnsureTyped(keys=KEY, dtype=torch.float32, track_meta=False),
        FitResized(KEY, spec.size, keep_aspect=spec.keep_aspect),
        EnsureTyped(keys=KEY, dtype=torch.float32, track_meta=False),
    ])


class Normalised(MapTransform):
    """``(x - mean[c]) / std[c]`` per channel; returns a plain float32 CPU tensor.

    Computed with numpy rather than MONAI's ``NormalizeIntensityd``/torch because it runs on every item of
    every epoch after the cache: on small images torch's intra-op thread pool costs ~100x the arithmetic when
    the CPU is busy (5 ms vs 0.05 ms per 224 px image measured on 2 shared cores), and MONAI adds MetaTensor
    dispatch on top. DataLoader workers run single-threaded anyway; the main process (``num_workers=0``) not.
    """

    def __init__(self, keys: str | Sequence[str], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(keys)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if isinstance(x, torch.Tensor):
                x = (x.as_tensor() if isinstance(x, MetaTensor) else x).detach().cpu().numpy()
            x = np.asarray(x, dtype=np.float32)
            shape = (-1,) + (1,) * (x.ndim - 1)
            d[key] = torch.from_numpy((x - self.mean.reshape(shape)) / self.std.reshape(shape))
        return d


def normalise(spec: InputSpec) -> Normalised:
    """``(x - mean[c]) / std[c]`` per channel with ``spec.mean``/``spec.std`` (ImageNet statistics by default)."""
    return Normalised(KEY, spec.mean, spec.std)


def finalise_transforms(spec: InputSpec) -> Compose:
    """(1, *size) in [0, 1] → float32 tensor (spec.channels, *size), normalised.

    Grey is replicated to 3 channels when ``spec.channels == 3`` (the RGB backbone then sees R = G = B).
    """
    steps: list[Any] = [RepeatChanneld(keys=KEY, repeats=3)] if spec.channels == 3 else []
    return Compose([*steps, normalise(spec)])


def deterministic_transforms(spec: InputSpec) -> Compose:
    """The evaluation pipeline: resize (cacheable), replicate channels, normalise.

    Args:
        spec: the model's input spec.

    Returns:
        A MONAI ``Compose`` mapping ``{"image": float32 (1, *spatial) in [0, 1]}`` to
        ``{"image": float32 tensor (spec.channels, *spec.size)}``, normalised with ``spec.mean``/``spec.std``.

    Examples:
        >>> out = deterministic_transforms(InputSpec(size=(64, 64)))({"image": torch.rand(1, 80, 100)})
        >>> tuple(out["image"].shape)
        (1, 64, 64)
    """
    return Compose([*resize_transforms(spec).transforms, *finalise_transforms(spec).transforms])


class RandAugment2d(MapTransform, Randomizable):
    """The 2D training augmentation in one resampling: flip, rotation and zoom as one affine, then intensity.

    Same distribution as MONAI's ``RandFlipd`` + ``RandRotated`` + ``RandZoomd`` + ``RandAdjustContrastd`` +
    ``RandShiftIntensityd`` (see :func:`random_transforms`), at a fraction of the cost: MONAI spends ~3 ms per
    image in per-call overhead whatever the image size (two resamplings, affine bookkeeping, MetaTensor
    dispatch), as much as a whole 64-px training step on 2 CPU cores; one ``affine_grid`` + ``grid_sample`` takes
    ~0.2 ms. Bilinear resampling, zero padding, the output keeps the input size. Zoom > 1 enlarges (crops).
    Parameters are drawn from this transform's own random state (``set_random_state``), in a fixed order.
    """

    def __init__(self, keys: str | Sequence[str], augment: AugmentConfig) -> None:
        MapTransform.__init__(self, keys)
        self.augment = augment

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        a = self.augment
        r = self.R
        flip = a.flip_prob > 0 and r.rand() < a.flip_prob
        angle = r.uniform(-1.0, 1.0) * math.radians(a.rotate_degrees) if a.rotate_degrees > 0 else 0.0
        zoom = r.uniform(*a.zoom) if tuple(a.zoom) != (1.0, 1.0) else 1.0
        gamma = r.uniform(0.7, 1.5) if a.intensity_prob > 0 and r.rand() < a.intensity_prob else None
        shift = r.uniform(-0.1, 0.1) if a.intensity_prob > 0 and r.rand() < a.intensity_prob else None
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key], dtype=torch.float32)
            x = x.as_tensor() if isinstance(x, MetaTensor) else x
            if angle or zoom != 1.0 or flip:
                x = _affine2d(x, angle=angle, zoom=zoom, flip=flip)
            if gamma is not None:  # MONAI's AdjustContrast: rescale to [0, 1], power, rescale back
                lo, hi = x.min(), x.max()
                span = (hi - lo).clamp_min(1e-7)
                x = ((x - lo) / span) ** gamma * span + lo
            if shift is not None:
                x = x + shift
            d[key] = x.clamp(0.0, 1.0) if gamma is not None or shift is not None else x
        return d


def _affine2d(x: torch.Tensor, *, angle: float, zoom: float, flip: bool) -> torch.Tensor:
    """Rotate by ``angle`` (radians) about the centre, zoom by ``zoom`` and optionally mirror left-right, in one
    bilinear resampling of a (C, H, W) image (zero padding, size kept)."""
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    h, w = x.shape[-2:]
    # affine_grid works in normalised [-1, 1] coordinates: keep rotation isotropic on non-square images
    theta = torch.tensor([[c * (-1.0 if flip else 1.0), -s * h / w, 0.0],
                          [s * w / h * (-1.0 if flip else 1.0), c, 0.0]], dtype=torch.float32)
    if flip and angle == 0.0 and zoom == 1.0:
        return torch.flip(x, dims=[-1])  # exact mirror, no resampling
    grid = torch.nn.functional.affine_grid(theta[None], [1, x.shape[0], h, w], align_corners=False)
    return torch.nn.functional.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros",
                                           align_corners=False)[0]


def random_transforms(augment: AugmentConfig | None, spatial_dims: int) -> Compose:
    """Training-time augmentation on [0, 1] images, applied after the cache and before normalisation.

    - Flip: left-right only (the last spatial axis), with ``flip_prob``. CheXNet trained with horizontal
      flips; up-down flips would create anatomy that never occurs. Note a left-right flip moves the heart
      to the right: switch ``flip_prob`` to 0 where laterality matters (e.g. situs, side-specific labels).
    - Rotation: angle uniform in ±``rotate_degrees``, in the image (H, W) plane; drawn for every image
      (small angles are the common case), zero padding.
    - Zoom: factor uniform in ``zoom``, size kept.
    - Intensity, each with ``intensity_prob``: gamma in (0.7, 1.5) (contrast) and a shift of ±0.1
      (brightness), then clamped to [0, 1].

    Images (2D) go through :class:`RandAugment2d`: the same draws as one affine resampling (~0.3 ms instead of
    ~3 ms per image); volumes (3D) through MONAI's transforms.

    Returns an empty ``Compose`` (identity) when ``augment`` is None or ``augment.enabled`` is False.
    """
    if augment is None or not augment.enabled:
        return Compose([])
    if spatial_dims == 2:
        return Compose([RandAugment2d(KEY, augment)])
    interp = "trilinear"
    steps: list[Any] = []
    if augment.flip_prob > 0:
        steps.append(RandFlipd(keys=KEY, prob=augment.flip_prob, spatial_axis=spatial_dims - 1))
    if augment.rotate_degrees > 0:
        angle = math.radians(augment.rotate_degrees)
        # range_x is the in-plane angle: for (D, H, W) volumes it rotates within each slice (about the D axis),
        # never mixing slices (checked in tests/data/test_transforms.py).
        steps.append(RandRotated(keys=KEY, range_x=angle, prob=1.0, keep_size=True, padding_mode="zeros",
                                 mode=interp))
    lo, hi = augment.zoom
    if (lo, hi) != (1.0, 1.0):
        steps.append(RandZoomd(keys=KEY, prob=1.0, min_zoom=lo, max_zoom=hi, keep_size=True, mode=interp,
                               padding_mode="constant"))
    if augment.intensity_prob > 0:
        steps += [
            RandAdjustContrastd(keys=KEY, prob=augment.intensity_prob, gamma=(0.7, 1.5)),
            RandShiftIntensityd(keys=KEY, prob=augment.intensity_prob, offsets=0.1),
            _Clampd(KEY),
        ]
    steps.append(EnsureTyped(keys=KEY, dtype=torch.float32, track_meta=False))
    return Compose(steps)
