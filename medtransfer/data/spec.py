"""``InputSpec``: the one description of preprocessing, shared by training, evaluation and prediction.

It lives in the model card, so a trained model never comes apart from its preprocessing: evaluation and
prediction rebuild the exact pipeline from it (torchvision's weights API carries its transforms the same way).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: What a model predicts: one of two classes, one of K classes, or any subset of K labels.
Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = get_args(Task)

#: ImageNet statistics (torchvision). Grey-scale input uses their channel average, because the adapted
#: first conv sums the RGB filters (timm's adapt_input_conv), i.e. it sees one grey channel as R=G=B.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)

#: Named CT windows, (centre, width) in Hounsfield units: the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
_AXES = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def parse_window(text: str) -> tuple[float, float]:
    """``(centre, width)`` of a window given by name (:data:`CT_WINDOWS`) or as ``"centre,width"`` (HU).

    Raises:
        ValueError: an unknown name, or a width that is not positive.

    Examples:
        >>> parse_window("lung"), parse_window("40,400")
        ((-600.0, 1500.0), (40.0, 400.0))
    """
    name = str(text).strip().lower()
    if name in CT_WINDOWS:
        return CT_WINDOWS[name]
    parts = name.replace(" ", "").split(",")
    try:
        centre, width = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"unknown window {text!r}: use one of {', '.join(CT_WINDOWS)} or 'centre,width' in HU "
                         "(e.g. '40,400')") from None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        raise ValueError(f"window {text!r}: the width must be a positive number of HU (e.g. '40,400')")
    return centre, width


class InputSpec(BaseModel):
    """How a scan becomes a model input tensor.

    The pipeline, in order: decode (DICOM: modality LUT → VOI LUT/window → MONOCHROME1 inversion;
    NIfTI/PNG: as stored) → intensity scaling to float32 in [0, 1] (``window``) → channel-first with
    ``channels`` channels → resize to ``size`` → normalise with ``mean``/``std``.

    Attributes:
        channels: 1 (grey; the backbone's first conv is adapted) or 3 (grey replicated to RGB).
        size: output spatial size, (H, W) for 2D or (D, H, W) for 3D.
        window: ``"file"`` uses the DICOM VOI LUT / WindowCenter+Width when present and otherwise falls back
            to ``"percentile"``; ``"fixed"`` uses ``window_center``/``window_width`` (in modality units, e.g. HU);
            ``"minmax"`` scales the image's own min..max; ``"percentile"`` clips at ``percentiles``.
        invert_monochrome1: show MONOCHROME1 images as MONOCHROME2 (bone bright). On by default because
            a model must see one polarity; switch off only if every scan is MONOCHROME1 and you know why.
        keep_aspect: pad to square before resizing instead of stretching.
        mean, std: normalisation after scaling to [0, 1]; one value per channel.
        orientation: volumes only: the anatomical axcode (MONAI ``Orientation``, e.g. ``"RAS"``) volumes are
            reoriented to; the (D, H, W) array then runs along (axcode[2], opposite of axcode[1], opposite of
            axcode[0]): for RAS, slices inferior to superior, rows anterior to posterior, columns from the
            patient's right to left (an axial DICOM series as a radiologist sees it).
        spacing: volumes only: resample to this voxel size in mm, in (D, H, W) order, before resizing
            (None keeps each file's own spacing).
        windows: CT windows in HU applied to the modality values instead of ``window``: names from
            :data:`CT_WINDOWS` or ``"centre,width"``; one window gives one channel, several give one channel
            each (then ``channels`` must equal their number).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    channels: Literal[1, 3] = 1
    size: tuple[int, ...] = (224, 224)
    window: Literal["file", "fixed", "minmax", "percentile"] = "file"
    window_center: float | None = Field(
        default=None, description="Window centre for window: fixed, in modality units (e.g. 40 HU).")
    window_width: float | None = Field(default=None, gt=0,
                                       description="Window width for window: fixed (e.g. 400 HU).")
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5),
        description="Low/high percentiles clipped to 0/1 for window: percentile (and the file fallback).")
    invert_monochrome1: bool = True
    keep_aspect: bool = False
    mean: tuple[float, ...] = IMAGENET_GREY_MEAN
    std: tuple[float, ...] = IMAGENET_GREY_STD
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    windows: tuple[str, ...] = ()

    @field_validator("orientation", mode="before")
    @classmethod
    def _axcode(cls, v: object) -> object:
        code = str(v).strip().upper() if isinstance(v, str) else v
        if not isinstance(code, str) or len(code) != 3 or any(
                sum(c in axis for c in code) != 1 for axis in _AXES):
            raise ValueError(f"orientation must be a 3-letter axcode with one of L/R, one of A/P and one of S/I "
                             f"(e.g. 'RAS', 'LPS'), got {v!r}")
        return code

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(math.isfinite(s) and s > 0 for s in v):
            raise ValueError(f"spacing must be three positive voxel sizes in mm, (D, H, W), got {list(v)}")
        return v

    @field_validator("windows", mode="before")
    @classmethod
    def _known_windows(cls, v: object) -> object:
        if isinstance(v, str):  # "lung" from the command line means one window, not four letters
            v = (v,)
        names = tuple(str(w).strip().lower() for w in v) if isinstance(v, (list, tuple)) else v
        for name in names if isinstance(names, tuple) else ():
            parse_window(name)
        return names

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if len(self.size) not in (2, 3) or min(self.size) < 8:
            raise ValueError(f"size must be (H, W) or (D, H, W) with every side >= 8, got {self.size}")
        if self.spacing is not None and len(self.size) != 3:
            raise ValueError(f"spacing resamples volumes, but size {list(self.size)} is for 2D images; set a "
                             "(D, H, W) size or leave spacing unset")
        k = len(self.windows)
        if k > 1 and self.channels != k:
            if "channels" in self.model_fields_set or k not in get_args(type(self).model_fields["channels"].annotation):
                raise ValueError(
                    f"{k} windows {list(self.windows)} give {k} channels, one each, but channels is "
                    f"{self.channels} and can be 1 or 3: give one window, or three (e.g. lung, mediastinum, bone) "
                    "with channels 3")
            object.__setattr__(self, "channels", k)  # frozen model: set once here; mean/std follow below
        if self.window == "fixed" and (self.window_center is None or self.window_width is None):
            raise ValueError("window='fixed' needs window_center and window_width (e.g. 40 and 400 for CT soft tissue)")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        # Defaults follow the channel count (ImageNet grey or RGB statistics) unless the user set mean/std;
        # the run replaces them with the backbone's own statistics anyway (resolve_input_spec).
        for name, grey, rgb in (("mean", IMAGENET_GREY_MEAN, IMAGENET_MEAN), ("std", IMAGENET_GREY_STD, IMAGENET_STD)):
            if name not in self.model_fields_set and len(getattr(self, name)) != self.channels:
                object.__setattr__(self, name, grey if self.channels == 1 else rgb)  # frozen model: set once here
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self

    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return len(self.size)

    @property
    def intensity_channels(self) -> int:
        """Channels of the decoded, cached image: one per CT window, else 1 (replicated to ``channels`` later)."""
        return max(1, len(self.windows))

    def window_values(self) -> tuple[tuple[float, float], ...]:
        """``(centre, width)`` in HU of each of ``windows``, in order."""
        return tuple(parse_window(w) for w in self.windows)

    def key(self) -> str:
        """A stable string that changes whenever the deterministic preprocessing changes (cache key)."""
        return self.model_dump_json()
