"""``ModelCard``: the JSON record beside ``model.safetensors`` that makes a model self-describing.

It holds what :func:`~medtransfer.models.checkpoint.load_model` needs to rebuild the architecture (backbone,
task, classes, input channels, for volumes the model kind and slice context), the preprocessing (``InputSpec``), what was learned after training
(thresholds, temperature) and a summary of the training data. It never holds PHI: sites, views and sexes
are category names, ages a range, patients only counts.

Importing this module does not import torch (the report renderer reads cards).
"""

from __future__ import annotations

import difflib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtransfer import io
from medtransfer.data.spec import InputSpec, Task
from medtransfer.errors import CheckpointError
from medtransfer.models.backbones import BACKBONES
from medtransfer.models.timm_backbones import is_timm, valid_timm_name

#: Bump when a field changes meaning; older cards are still read, newer ones are refused.
CARD_SCHEMA_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelCard(BaseModel):
    """What a trained model is, how its inputs are made, and what it was trained on.

    Attributes:
        schema_version: card format version.
        name: a human-readable model name (the report title).
        created: ISO 8601 timestamp.
        backbone: a name from ``medtransfer backbones``, or ``timm:<name>`` (a timm model).
        weights: the initial weights' fingerprint (``weights_fingerprint``: weights, source, file, sha256; for a
            timm backbone also the timm model with its pretrained tag, the hub repo and timm's version).
        strategy: ``linear-probe``, ``fine-tune`` or ``gradual``.
        task: ``binary`` (one output scoring ``classes[1]``), ``multiclass`` or ``multilabel``.
        classes: class names, in output order.
        num_outputs: 1 for binary, ``len(classes)`` otherwise.
        input: the preprocessing; evaluation and prediction rebuild it from here.
        volume: for volume models (``input.size`` with 3 entries) how the model sees them, as ``model.volume``
            (``slices``, ``acs`` or ``native``); None for images.
        slice_context: ``volume: slices`` only: 3 adjacent slices as RGB, or 1; None otherwise.
        thresholds: class → decision threshold on the probability (empty until evaluation chooses them).
        temperature: temperature-scaling factor for the logits (None: uncalibrated).
        calibration: how the temperature was decided on the validation split: ``applied`` (bool), ``reason``,
            the fitted value, and validation ECE/NLL before and after (cross-fitted by patient when large
            enough); a temperature that does not improve them is recorded here and not applied.
        training: counts per split and class, epochs, best epoch, best validation metrics.
        data: summary of the training data: manifest digest, modalities, views, sites, sexes, age range.
        versions: package versions the model was trained with.
        notes: free text.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: int = CARD_SCHEMA_VERSION
    name: str = "medtransfer model"
    created: str = Field(default_factory=_now)
    backbone: str
    weights: dict[str, Any] = Field(default_factory=dict)
    strategy: str = "gradual"
    task: Task
    classes: list[str]
    num_outputs: int
    input: InputSpec = InputSpec()
    volume: Literal["slices", "acs", "native"] | None = None
    slice_context: Literal[1, 3] | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    temperature: float | None = Field(default=None, gt=0)
    calibration: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, Any] = Field(default_factory=dict)
    notes: str = ""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if is_timm(v):  # checked against timm when the model is rebuilt; the card is read without timm
            if not valid_timm_name(v):
                raise ValueError(f"'{v}' is not a timm backbone name; expected timm:<architecture>[.<tag>]")
            return v
        if v not in BACKBONES:
            close = difflib.get_close_matches(v, list(BACKBONES), n=1, cutoff=0.5)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown backbone '{v}'{hint} (known: {', '.join(BACKBONES)})")
        return v

    @field_validator("created")
    @classmethod
    def _iso(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError as exc:
            raise ValueError(f"created must be an ISO 8601 timestamp, got {v!r}") from exc
        return v

    @field_validator("schema_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v > CARD_SCHEMA_VERSION:
            raise ValueError(f"card schema_version {v} is newer than this medtransfer understands "
                             f"({CARD_SCHEMA_VERSION}); upgrade medtransfer")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        expected = 1 if self.task == "binary" else len(self.classes)
        if self.num_outputs != expected:
            raise ValueError(f"num_outputs={self.num_outputs} does not fit task '{self.task}' with "
                             f"{len(self.classes)} classes (expected {expected})")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary card needs exactly 2 classes, got {self.classes}")
        if (self.volume is None) != (len(self.input.size) == 2):
            raise ValueError(f"input.size {list(self.input.size)} with volume={self.volume}: a volume model (size D, H, "
                             "W) records its kind (slices, acs or native), an image model none")
        if (self.slice_context is None) != (self.volume != "slices"):
            raise ValueError(f"slice_context={self.slice_context} with volume={self.volume}: only a slices model has one")
        three_d = not is_timm(self.backbone) and BACKBONES[self.backbone].spatial_dims == 3  # timm models are 2D
        if self.volume is not None and (self.volume == "native") != three_d:
            raise ValueError(f"volume={self.volume} does not fit backbone {self.backbone} (native needs a 3D network, "
                             "slices and acs a 2D one)")
        unknown = set(self.thresholds) - set(self.classes)
        if unknown:
            raise ValueError(f"thresholds for unknown classes {sorted(unknown)}; classes are {self.classes}")
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the card as JSON, atomically; returns the path."""
        return io.write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ModelCard:
        """Read and validate a card.

        Raises:
            CheckpointError: missing file, invalid JSON, or content that fails validation (unknown backbone,
                unknown keys, inconsistent outputs), naming the field and what to do.
        """
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"{p}: model card not found. A run directory needs model_card.json beside "
                                  "model.safetensors (written by 'medtransfer train').")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{p}: not valid JSON ({exc}); the card is corrupt. Re-train, or restore it "
                                  "from a backup.") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "card"
            raise CheckpointError(f"{p}: invalid model card: '{where}': {first['msg']}. The card must come from "
                                  "a medtransfer run; do not edit it by hand.") from exc
