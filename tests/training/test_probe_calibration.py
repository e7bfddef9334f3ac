"""A linear probe calibrates on its cached validation features: the same card as a second pass over the images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import medtransfer as mt
from medtransfer.training import calibrate as calibrate_module
from medtransfer.training.calibrate import calibrate
from tests.training.conftest import TINY_OVERRIDES


def test_probe_calibration_reuses_features_and_matches_a_pass_over_the_images(tiny_data: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    passes: list[int] = []
    real = calibrate_module.run_model

    def counting(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate_module, "run_model", counting)
    run = mt.train(tiny_data, overrides=[*TINY_OVERRIDES, "train.strategy=linear-probe", "train.epochs=5"],
                   out=tmp_path / "run")
    assert passes == []  # calibration took the head's logits on the cached features
    assert run.card.training["trained"] == "head only"
    bare = run.card.model_copy(update={"temperature": None, "calibration": None, "thresholds": {}})
    again = calibrate(run.model, run.manifest.split("val"), bare, run.config, cache_dir=run.cache_dir)
    assert passes == [1]  # this one ran the model over the validation images
    assert again.thresholds.keys() == run.card.thresholds.keys()
    for c, t in run.card.thresholds.items():
        assert abs(again.thresholds[c] - t) < 1e-4, (again.thresholds, run.card.thresholds)
    assert (again.temperature is None) == (run.card.temperature is None)
    if run.card.temperature is not None:
        assert np.isclose(again.temperature, run.card.temperature, rtol=1e-3)
