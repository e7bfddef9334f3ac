"""``InputSpec``: the one description of preprocessing, shared by training, evaluation and prediction.

It lives in the model card, so a trained model never comes apart from its preprocessing: evaluation and
prediction rebuild the exact pipeline from it (torchvision's weights API carries its transforms the same way).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: What a model predicts: one of two classes, one of K classes, or any subset of K labels.
Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = get_args(Task)

#: ImageNet statistics (torchvision). Grey-scale input uses their channel average, because the adapted
#: first conv sums the RGB filters (timm's adapt_input_conv), i.e. it sees one grey channel as R=G=B.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)


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

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if len(self.size) not in (2, 3) or min(self.size) < 8:
            raise ValueError(f"size must be (H, W) or (D, H, W) with every side >= 8, got {self.size}")
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

    def key(self) -> str:
        """A stable string that changes whenever the deterministic preprocessing changes (cache key)."""
        return self.model_dump_json()
