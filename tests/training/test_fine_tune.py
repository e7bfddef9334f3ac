"""The transfer engine end to end on tiny real DICOM files: strategies, run dir, load_run, prediction."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

import medtransfer as mt
from medtransfer.config import load_config
from medtransfer.training.fine_tune import plan_phases
from tests.training.conftest import TINY_OVERRIDES


def test_plan_phases() -> None:
    assert [(p.name, p.start, p.end, p.frozen) for p in plan_phases("gradual", 5, 2)] == [
        ("head", 0, 2, True), ("all", 2, 5, False)]
    assert [p.name for p in plan_phases("linear-probe", 5, 2)] == ["head"]
    assert [p.name for p in plan_phases("fine-tune", 5, 2)] == ["all"]
    assert [p.name for p in plan_phases("gradual", 2, 5)] == ["head"]


@pytest.mark.parametrize("strategy", ["linear-probe", "fine-tune", "gradual"])
def test_train_writes_run_dir(tiny_data, tmp_path, strategy: str) -> None:
    rows: list[dict] = []
    out = tmp_path / "run"
    run = mt.train(tiny_data, config=None, overrides=[*TINY_OVERRIDES, f"train.strategy={strategy}"], out=out,
                   on_epoch=rows.append)
    for name in ("config.yaml", "manifest.csv", "quarantine.csv", "model.safetensors", "model_card.json",
                 "history.csv", "checkpoints/last", "checkpoints/best/model.safetensors"):
        assert (out / name).exists(), name
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == len(rows) == 3
    assert hist["val_auroc"].notna().all()
    card = json.loads((out / "model_card.json").read_text())
    assert card["strategy"] == strategy and card["classes"] == ["normal", "pneumonia"]
    assert card["training"]["best_epoch"] == int(hist["val_auroc"].idxmax()) + 1
    # the saved model is the best-validation one: its val AUROC equals the best history entry
    loaded = mt.load_run(out)
    assert loaded.card.input.size == (48, 48)
    assert isinstance(loaded.model, torch.nn.Module)
    assert run.history["val_auroc"].max() == pytest.approx(hist["val_auroc"].max())


def test_linear_probe_learns_and_predict_matches(tiny_data, tmp_path) -> None:
    out = tmp_path / "lp"
    overrides = [*TINY_OVERRIDES, "train.strategy=linear-probe", "train.epochs=30", "train.lr=0.01",
                 "train.patience=30"]
    run = mt.train(tiny_data, overrides=overrides, out=out)
    assert run.history["val_auroc"].max() >= 0.8, run.history
    # predict() on files equals predict() on the same images preprocessed by the dataset
    test = run.manifest.split("test")
    paths = [str(run.manifest.abspath(r)[0]) for _, r in test.df.iterrows()]
    by_path = run.predict(paths)
    from medtransfer.data.dataset import ScanDataset

    ds = ScanDataset(test, run.card.input, train=False)
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    by_tensor = run.predict(x)
    np.testing.assert_allclose(by_path["p_pneumonia"], by_tensor["p_pneumonia"], rtol=1e-5, atol=1e-6)
    assert list(by_path.columns) == ["case_id", "file", "p_pneumonia", "pred_pneumonia", "predicted", "error"]
    assert list(by_tensor.columns) == ["p_pneumonia", "pred_pneumonia", "predicted"]
    assert (by_path["predicted"] == by_tensor["predicted"]).all() and (by_path["file"] == paths).all()


def test_same_seed_same_weights(tiny_data, tmp_path) -> None:
    digests = []
    for name in ("a", "b"):
        mt.train(tiny_data, overrides=[*TINY_OVERRIDES, "train.epochs=2"], out=tmp_path / name)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_config_presets_load() -> None:
    from medtransfer.config import resolve_config_path

    chex = load_config(resolve_config_path("chexnet"))
    assert chex.model.backbone == "densenet121" and chex.train.optimizer == "adam" and chex.train.lr == 1e-3
    assert chex.train.scheduler == "plateau" and chex.train.plateau_factor == 0.1
    assert load_config(resolve_config_path("quickstart")).model.backbone == "efficientnet_lite0"
    assert load_config(resolve_config_path("linear-probe")).train.strategy == "linear-probe"
    with pytest.raises(mt.ConfigError, match="did you mean 'quickstart'"):
        resolve_config_path("quickstrat")


def _bn_means(state: dict[str, torch.Tensor]) -> torch.Tensor:
    means = [v.flatten() for k, v in sorted(state.items()) if k.endswith("running_mean")]
    assert len(means) > 40, "expected EfficientNet-Lite0's BatchNorm layers"
    return torch.cat(means)


@pytest.mark.parametrize(("bn", "kept"), [("auto", True), ("train", False)])
def test_gradual_keeps_pretrained_bn_statistics_unless_asked(tiny_data, tmp_path, bn: str, kept: bool) -> None:
    # The head phase is fitted on features made with the ImageNet running statistics; updating them when the
    # backbone unfreezes changed every feature under the head (measured: val AUROC 0.81 -> 0.62 after one
    # epoch at LR 0 on the sample data). 'auto' keeps them for gradual from pretrained weights.
    from safetensors.torch import load_file

    before = _bn_means(mt.build_model("efficientnet_lite0", ["normal", "pneumonia"], in_channels=1).state_dict())
    mt.train(tiny_data, overrides=[*TINY_OVERRIDES, "train.strategy=gradual", f"train.bn={bn}"], out=tmp_path / bn)
    # the last checkpoint has been through the unfrozen epochs (the best one may be the head epoch)
    (state_file,) = (tmp_path / bn / "checkpoints" / "last").glob("training_state.*.safetensors")
    state = load_file(str(state_file))
    after = _bn_means({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    assert torch.equal(before, after) is kept


def test_scratch_training_recomputes_bn_statistics_so_scores_are_not_constant(tiny_data, tmp_path) -> None:
    # Momentum-averaged BatchNorm statistics after a few steps from random init are mostly (0, 1): measured on
    # the demo data, an eval-mode scratch EfficientNet then gave every image the same score (AUROC exactly 0.5).
    overrides = [*TINY_OVERRIDES, "train.strategy=fine-tune", "model.weights=none", "train.epochs=2"]
    run = mt.train(tiny_data, overrides=overrides, out=tmp_path / "scratch")
    test = run.manifest.split(["val", "test"])
    scores = run.predict([str(test.abspath(r)[0]) for _, r in test.df.iterrows()])["p_pneumonia"].to_numpy()
    assert np.unique(np.round(scores, 6)).size > len(scores) // 2, scores


def test_frozen_only_warning_and_what_was_trained() -> None:
    from medtransfer.training.fine_tune import frozen_only_warning, trained_parts

    msg = frozen_only_warning("gradual", 2, 2)
    assert msg is not None and "never unfrozen" in msg and "linear probe" in msg and "above 2" in msg
    assert frozen_only_warning("gradual", 3, 2) is None
    assert frozen_only_warning("linear-probe", 2, 2) is None  # asked for, nothing to warn about
    assert trained_parts(["head", "head"]) == "head only"
    assert trained_parts(["head", "all"]) == "head then full network"
    assert trained_parts(["all"]) == "full network"


def test_a_quickstart_run_that_never_unfreezes_says_so(tiny_data, caplog) -> None:
    # quickstart's freeze_epochs is 2: `--epochs 2` trains only the head, and used to say nothing about it
    import logging

    from medtransfer.data.discovery import index_scans
    from medtransfer.training.fine_tune import fine_tune

    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("train.epochs", "train.freeze_epochs"))]
    cfg = load_config("quickstart", [*tiny, "train.epochs=2"])
    manifest = index_scans(tiny_data, config=cfg.data)
    model = mt.build_model("efficientnet_lite0", manifest.classes, task=manifest.task, in_channels=1)
    with caplog.at_level(logging.WARNING, logger="medtransfer.training.fine_tune"):
        fit = fine_tune(model, manifest, cfg)
    assert fit.trained == "head only"
    assert list(fit.history["phase"]) == ["head", "head"]
    assert "train.epochs=2 <= train.freeze_epochs=2: the backbone is never unfrozen" in caplog.text, caplog.text
    assert "linear probe" in caplog.text and "--epochs" in caplog.text
