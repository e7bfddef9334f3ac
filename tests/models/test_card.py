"""The model card: validation, JSON roundtrip, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from medtransfer.data.spec import InputSpec
from medtransfer.errors import CheckpointError
from medtransfer.models.card import ModelCard


def make_card(**kw) -> ModelCard:
    base = dict(
        name="cxr",
        backbone="efficientnet_lite0",
        weights={"weights": "imagenet", "source": "bundled", "file": "x.pth", "sha256": "ab" * 32},
        strategy="gradual",
        task="binary",
        classes=["normal", "pneumonia"],
        num_outputs=1,
        input=InputSpec(size=(64, 64)),
        training={"counts": {"train": {"normal": 10, "pneumonia": 12}}, "best_epoch": 3, "best_val_auroc": 0.91},
        data={"manifest_digest": "abc", "sites": ["A", "B"], "age_range": [18.0, 90.0]},
        versions={"torch": "2.x"},
    )
    base.update(kw)
    return ModelCard(**base)


def test_card_roundtrip(tmp_path):
    card = make_card(thresholds={"pneumonia": 0.37}, temperature=1.4, notes="hello")
    card.save(tmp_path / "model_card.json")
    loaded = ModelCard.load(tmp_path / "model_card.json")
    assert loaded == card
    assert loaded.input.size == (64, 64)
    assert loaded.created  # ISO timestamp filled in


def test_unknown_backbone_in_card_is_a_checkpoint_error(tmp_path):
    raw = make_card().model_dump(mode="json")
    raw["backbone"] = "resnet181"
    (tmp_path / "model_card.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"backbone.*did you mean 'resnet18'"):
        ModelCard.load(tmp_path / "model_card.json")


@pytest.mark.parametrize("content,match", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"schema_version": 1}', "invalid model card"),
])
def test_missing_or_corrupt_card(tmp_path, content, match):
    path = tmp_path / "model_card.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        ModelCard.load(path)


def test_unknown_key_and_newer_schema_are_refused(tmp_path):
    raw = make_card().model_dump(mode="json")
    path = tmp_path / "model_card.json"
    path.write_text(json.dumps({**raw, "treshold": 0.5}))
    with pytest.raises(CheckpointError, match="treshold"):
        ModelCard.load(path)
    path.write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(CheckpointError, match="upgrade medtransfer"):
        ModelCard.load(path)


def test_inconsistent_outputs_and_thresholds_are_refused():
    with pytest.raises(ValidationError, match="num_outputs"):
        make_card(num_outputs=2)
    with pytest.raises(ValidationError, match="unknown classes"):
        make_card(thresholds={"covid": 0.5})
    with pytest.raises(ValidationError, match="ISO"):
        make_card(created="yesterday")


def test_card_module_does_not_import_torch():
    code = "import sys, medtransfer.models.card; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
