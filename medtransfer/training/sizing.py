"""The input size from the data: never upsample far beyond what the scans hold.

A preset's ``input.size`` (224 px for ImageNet backbones) suits chest X-rays of 1,024-3,000 px. Given 28-px
images (MedMNIST-sized sets) it upsamples each 8x per side: 64x the pixels, 64x the compute, and not one more
detail. When the size was not set explicitly (the default, or a preset; ``data.fit_input_size``), training
lowers it to fit the data: **the smaller of the configured size and twice the median source size** (the
longer side, rounded up to a multiple of 32, the stride of the usual ImageNet backbones), **and never below 64
px** (below that, a 32-stride backbone's last feature map is 1x1 and Grad-CAM has nothing to show). ``--image-
size`` / an explicit ``input.size`` always wins. The choice and its reason go in the log and the model card
(``training.input_size``).

Twice, not once: a modest upsampling lets a backbone pretrained on 224-px photographs, whose first layers
downsample 4x, keep small structures; beyond ~2x the extra pixels are interpolation. Measured on the 600
real chest X-rays of kermany-cxr-600 box-downsampled to 28 px (2 CPU cores): quickstart at the fitted 64 px
trained in 21 s to test AUROC 0.988; see benchmarks/presets.py for the comparison with 224 px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medtransfer.config import RunConfig
from medtransfer.data.manifest import Manifest

#: Smallest input side chosen from the data (pixels).
MIN_SIDE = 64
#: Largest upsampling of the median source size.
MAX_UPSAMPLE = 2.0
#: Sizes are rounded up to a multiple of this (the output stride of the common ImageNet CNNs).
STRIDE = 32


@dataclass(frozen=True)
class SizeChoice:
    """The input size chosen for a run and why (logged, and kept in the model card)."""

    size: tuple[int, ...]
    configured: tuple[int, ...]
    median_source: tuple[int, int] | None
    reason: str

    @property
    def changed(self) -> bool:
        return self.size != self.configured

    def as_card(self) -> dict[str, object]:
        return {"size": list(self.size), "configured": list(self.configured),
                "median_source": list(self.median_source) if self.median_source else None, "reason": self.reason}


def should_fit(cfg: RunConfig) -> bool:
    """Whether the size is fitted to the data: ``data.fit_input_size``, or when unset, unless ``input.size``
    was given explicitly (in a config file or override other than the presets' default)."""
    flag = cfg.data.fit_input_size
    if flag is not None:
        return bool(flag)
    return "size" not in cfg.input.model_fields_set


def median_source_size(manifest: Manifest) -> tuple[int, int] | None:
    """Median (rows, cols) of the cases' source images, or None when the manifest does not know them."""
    df = manifest.df
    if "rows" not in df or "cols" not in df:
        return None
    rows = pd.to_numeric(df["rows"], errors="coerce")
    cols = pd.to_numeric(df["cols"], errors="coerce")
    ok = rows.notna() & cols.notna() & (rows > 0) & (cols > 0)
    if not ok.any():
        return None
    return int(np.median(rows[ok])), int(np.median(cols[ok]))


def choose_input_size(cfg: RunConfig, manifest: Manifest, *, fixed_input_size: bool = False) -> SizeChoice:
    """The run's input size: ``cfg.input.size``, lowered to fit the data when :func:`should_fit` says so.

    Args:
        cfg: the run config (``input.size`` is the ceiling).
        manifest: the indexed cases (``rows``/``cols`` columns: the source sizes).
        fixed_input_size: the backbone accepts only its own size (ViT): never changed.

    Examples:
        28-px sources under a 224-px preset give 64 px; 1,024-px X-rays keep 224.
    """
    configured = tuple(int(s) for s in cfg.input.size)
    median = median_source_size(manifest) if len(configured) == 2 else None
    shown = "x".join(map(str, configured))
    if len(configured) != 2:
        return SizeChoice(configured, configured, None, f"input.size {shown} as configured (volumes keep theirs)")
    if not should_fit(cfg):
        return SizeChoice(configured, configured, median, f"input.size {shown} as set explicitly")
    if fixed_input_size:
        return SizeChoice(configured, configured, median, f"input.size {shown}: the backbone accepts no other size")
    if median is None:
        return SizeChoice(configured, configured, None, f"input.size {shown}: the source image sizes are unknown")
    longest = max(median)
    cap = max(MIN_SIDE, STRIDE * math.ceil(MAX_UPSAMPLE * longest / STRIDE))
    src = f"{median[0]}x{median[1]}"
    if cap >= max(configured):
        return SizeChoice(configured, configured, median,
                          f"input.size {shown} (the configured size; the median source image is {src} px)")
    scale = cap / max(configured)
    size = tuple(max(MIN_SIDE, STRIDE * math.ceil(s * scale / STRIDE)) for s in configured)
    new = "x".join(map(str, size))
    ratio = (configured[0] * configured[1]) / (size[0] * size[1])
    reason = (f"input.size {new}, not the configured {shown}: the median source image is {src} px, and upsampling "
              f"beyond ~{MAX_UPSAMPLE:g}x adds no detail, only compute ({ratio:.0f}x fewer pixels per image). "
              f"Set --image-size (input.size) to choose the size yourself.")
    return SizeChoice(size, configured, median, reason)
