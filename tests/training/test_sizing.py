"""Input size fitted to the data: 28-px scans are not upsampled to 224; an explicit size always wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtransfer.config import RunConfig, apply_overrides, load_config
from medtransfer.data.manifest import Manifest
from medtransfer.training.sizing import choose_input_size, should_fit
from tests.factories import chest_like, write_png


def _manifest(rows: list[int], cols: list[int] | None = None) -> Manifest:
    cols = cols or rows
    n = len(rows)
    df = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "patient_key": [f"p{i}" for i in range(n)],
                       "path": [f"{i}.png" for i in range(n)], "label": ["a", "b"] * (n // 2) + ["a"] * (n % 2),
                       "split": "train", "rows": rows, "cols": cols})
    return Manifest(df, ["a", "b"], "binary", Path("."))


@pytest.mark.parametrize(("median", "expected"), [(28, 64), (20, 64), (64, 128), (100, 224), (224, 224), (1024, 224)])
def test_preset_size_is_a_ceiling_lowered_to_twice_the_median_source(median: int, expected: int) -> None:
    cfg = load_config("quickstart")
    assert should_fit(cfg)
    choice = choose_input_size(cfg, _manifest([median - 2, median, median, median + 2, median]))
    assert choice.size == (expected, expected)
    assert choice.changed == (expected != 224)
    assert f"{median}x{median}" in choice.reason
    if choice.changed:
        assert "--image-size" in choice.reason and "224x224" in choice.reason


@pytest.mark.parametrize("overrides", [["input.size=[224, 224]"], ["input.size=[224, 224]", "model.dropout=0.1"]])
def test_an_explicit_size_is_used_as_given(overrides: list[str]) -> None:
    cfg = load_config("quickstart", overrides)
    assert not should_fit(cfg)
    assert choose_input_size(cfg, _manifest([28] * 4)).size == (224, 224)
    # the Python API: a RunConfig built with a size keeps it through further overrides
    api = apply_overrides(RunConfig.model_validate({"input": {"size": [96, 96]}}), ["train.epochs=2"])
    assert not should_fit(api) and choose_input_size(api, _manifest([28] * 4)).size == (96, 96)
    assert should_fit(apply_overrides(RunConfig(), ["train.epochs=2"]))


def test_flag_forces_or_forbids_fitting_and_presets_with_a_fixed_size_keep_it() -> None:
    assert choose_input_size(load_config("chexnet"), _manifest([28] * 4)).size == (224, 224)  # as published
    forced = load_config("chexnet", ["data.fit_input_size=true"])
    assert choose_input_size(forced, _manifest([28] * 4)).size == (64, 64)
    never = load_config("quickstart", ["data.fit_input_size=false"])
    assert choose_input_size(never, _manifest([28] * 4)).size == (224, 224)
    vit = choose_input_size(load_config("quickstart"), _manifest([28] * 4), fixed_input_size=True)
    assert vit.size == (224, 224) and "accepts no other size" in vit.reason


def test_unknown_source_sizes_and_non_square_sources() -> None:
    cfg = load_config("quickstart")
    unknown = choose_input_size(cfg, _manifest([0, 0]))
    assert unknown.size == (224, 224) and "unknown" in unknown.reason
    wide = choose_input_size(cfg, _manifest([30] * 4, [60] * 4))  # the longer side decides: 2 x 60 -> 128
    assert wide.size == (128, 128)


def test_training_on_28px_scans_fits_the_size_records_why_and_resumes(tmp_path: Path) -> None:
    """End to end: the run trains at 64 px, config.yaml says so, the card says why, and re-running the same
    command on an interrupted run is recognised as the same configuration."""
    from medtransfer.config import dump_config
    from medtransfer.training.run import _same_config, resolve_input_spec, train

    rng = np.random.default_rng(0)
    rows = []
    for label in ("normal", "pneumonia"):
        for i in range(8):
            img = chest_like(28, seed=int(rng.integers(1 << 30)), dtype=np.uint8, max_value=255)
            if label == "pneumonia":
                img[8:16, 6:12] = 250
            write_png(tmp_path / "data" / label / f"{i}.png", img)
            rows.append(label)
    overrides = ["train.epochs=2", "train.freeze_epochs=1", "train.batch_size=8", "train.augment.enabled=false",
                 "data.val_fraction=0.25", "data.test_fraction=0.25", "eval.n_boot=0"]
    run = train(tmp_path / "data", config="quickstart", overrides=overrides, out=tmp_path / "run")
    assert tuple(run.card.input.size) == (64, 64)
    choice = run.card.training["input_size"]
    assert choice["size"] == [64, 64] and choice["configured"] == [224, 224] and choice["median_source"] == [28, 28]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "fit_input_size: false" in saved and json.loads((tmp_path / "run" / "input_size.json").read_text())
    def as_prepared(cfg: RunConfig) -> RunConfig:  # what _prepare compares: data folder and normalisation resolved
        data = cfg.data.model_copy(update={"data_dir": tmp_path / "data", "labels": None})
        return cfg.model_copy(update={"data": data, "input": resolve_input_spec(cfg)})

    assert _same_config(saved, as_prepared(load_config("quickstart", overrides)))
    assert not _same_config(saved, as_prepared(load_config("quickstart", [*overrides[1:], "train.epochs=3"])))
    assert not _same_config(saved, as_prepared(load_config("quickstart", [*overrides, "input.size=[96, 96]"])))
    assert dump_config(run.config) == saved
