"""MONAI dictionary-transform pipelines built from an :class:`InputSpec` (key ``"image"``).

The input of every pipeline is what :func:`medtransfer.data.loading.load_case` returns: float32
(k, *spatial) in [0, 1] (k = 1, or one channel per CT window). The pipeline is split in three so that the
expensive, deterministic part can be cached (:mod:`medtransfer.data.dataset`):

1. :func:`resize_transforms`: resize to exactly ``spec.size`` (``keep_aspect``: fit inside and pad with 0).
   Output float32 (k, *size) in [0, 1]: this is what the disk cache stores (``read_scan`` resizes with the same
   :class:`FitResized`).
2. :func:`random_transforms` (training only): flips, rotation, zoom, contrast/brightness, on [0, 1] images.
3. :func:`finalise_transforms`: replicate one grey channel to ``spec.channels`` and normalise with
   ``spec.mean``/``std``.

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
    RandRotated,
    RandShiftIntensityd,
    RandZoomd,
    Resize,
    SpatialPad,
)

from medtransfer.config import AugmentConfig
from medtransfer.data.spec import InputSpec

KEY = "image"


class FitResized(MapTransform):
    """Resize a channel-first image to exactly ``spatial_size``; with ``keep_aspect`` fit inside it and pad with 0.

    Shrinking uses ``area`` interpolation (an average over each output pixel's footprint, so no aliasing of
    fine texture such as trabecular bone); enlarging uses (bi|tri)linear interpolation. Fitting then padding
    gives the same result as the usual "pad to square, then resize" at a fraction of the cost. A MONAI
    ``MetaTensor`` keeps a correct affine (MONAI's ``Resize`` and ``SpatialPad`` update it).
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
        out = self._pad(img) if target != self.spatial_size else img
        if tuple(out.shape[1:]) != self.spatial_size:  # guards the contract every model relies on
            raise RuntimeError(f"resize produced {tuple(out.shape[1:])}, not {self.spatial_size}")
        return out


class ToChannelsd(MapTransform):
    """One grey channel replicated to ``channels`` (the RGB backbone then sees R = G = B); an image that already
    has ``channels`` channels (one per CT window) is left as it is."""

    def __init__(self, keys: str | Sequence[str], channels: int) -> None:
        super().__init__(keys)
        self.channels = int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            if x.shape[0] == self.channels:
                continue
            if x.shape[0] != 1:
                raise ValueError(f"image has {x.shape[0]} channels; the model takes {self.channels} "
                                 "(one grey channel is replicated, k windows need channels = k)")
            reps = (self.channels,) + (1,) * (x.ndim - 1)
            d[key] = x.repeat(*reps) if isinstance(x, torch.Tensor) else np.tile(x, reps)
        return d


class _Clampd(MapTransform):
    """Clamp to [0, 1] after intensity augmentation, so augmented images stay in the cached value range."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.clamp(torch.as_tensor(d[key]), 0.0, 1.0)
        return d


def resize_transforms(spec: InputSpec) -> Compose:
    """The cached, deterministic geometry: float32 (k, *spatial) [0, 1] → float32 tensor (k, *spec.size) [0, 1]."""
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
    """(k, *size) in [0, 1] → float32 tensor (spec.channels, *size), normalised.

    Grey (k = 1) is replicated to 3 channels when ``spec.channels == 3`` (the RGB backbone then sees R = G = B);
    three CT windows (k = 3) are the three channels.
    """
    steps: list[Any] = [ToChannelsd(KEY, spec.channels)] if spec.channels != 1 else []
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

    Returns an empty ``Compose`` (identity) when ``augment`` is None or ``augment.enabled`` is False.
    """
    if augment is None or not augment.enabled:
        return Compose([])
    interp = "bilinear" if spatial_dims == 2 else "trilinear"
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
