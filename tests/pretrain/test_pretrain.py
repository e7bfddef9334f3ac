"""Self-supervised pretraining (issue 21 item 1): views, the three methods, the folder as a weights source for
``train``, resume after a crash, refusals, the CLI, and the transfer audit comparing sources (tiny 48 px DICOMs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer import faults
from medtransfer.audit.transfer import audit_transfer
from medtransfer.cli import app
from medtransfer.config import PretrainConfig, load_config
from medtransfer.errors import CheckpointError, ConfigError, RunDirError
from medtransfer.models.backbones import read_weights_file
from medtransfer.models.classifier import get_path
from medtransfer.pretrain.run import pretrain
from medtransfer.pretrain.source import resolve_weights
from medtransfer.pretrain.views import random_views
from medtransfer.training.run import build_run_model
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

TINY_PT = ["input.size=[48, 48]", "pretrain.epochs=2", "pretrain.batch_size=8", "train.num_workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("pt") / "data")


@pytest.fixture(scope="module")
def simclr(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pt-simclr") / "pt"
    pretrain(data, out=out, overrides=TINY_PT)
    return out


# -- views ---------------------------------------------------------------------------------------------------
def test_views_without_augmentation_are_the_image_and_views_are_reproducible() -> None:
    x = torch.randn(3, 1, 32, 32)
    off = PretrainConfig(crop_scale=(1.0, 1.0), rotation=0, intensity=0, blur=0, noise=0)
    assert torch.allclose(random_views(x, off, torch.Generator().manual_seed(0)), x, atol=1e-5)
    on = PretrainConfig()
    a = random_views(x, on, torch.Generator().manual_seed(1))
    b = random_views(x, on, torch.Generator().manual_seed(1))
    c = random_views(x, on, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c)


def test_views_never_flip_left_and_right_unless_asked() -> None:
    x = torch.zeros(64, 1, 32, 32)
    x[..., :12] = 3.0  # a bright left third (the heart's side in a PA chest film is the image's right)
    cfg = PretrainConfig(intensity=0, blur=0, noise=0)
    v = random_views(x, cfg, torch.Generator().manual_seed(0))
    assert bool((v[..., :16].mean(dim=(1, 2, 3)) > v[..., 16:].mean(dim=(1, 2, 3))).all())
    flipped = random_views(x, cfg.model_copy(update={"flip": True}), torch.Generator().manual_seed(0))
    assert bool((flipped[..., :16].mean(dim=(1, 2, 3)) < flipped[..., 16:].mean(dim=(1, 2, 3))).any())


# -- the folder ------------------------------------------------------------------------------------------------
def test_pretraining_writes_a_weights_source_that_train_starts_from(data: Path, simclr: Path, tmp_path: Path) -> None:
    info = json.loads((simclr / "pretrain.json").read_text())
    assert info["method"] == "simclr" and info["backbone"] == "efficientnet_lite0" and info["epochs"] == 2
    assert info["images"] == 40 and (simclr / "history.csv").read_text().count("\n") == 3
    # the exported first conv is RGB whose sum over channels is the pretrained grey filter
    state = read_weights_file(simclr / "backbone.safetensors")
    key = info["first_conv"]["key"]
    assert state[key].shape[1] == 3
    cfg = load_config(None, [*TINY_OVERRIDES, f"model.weights={simclr}"])
    model = build_run_model(cfg, ["normal", "pneumonia"], "binary")
    grey = get_path(model.backbone, key.rsplit(".", 1)[0]).weight
    assert torch.allclose(grey, state[key].sum(dim=1, keepdim=True), atol=1e-6)
    # ... and every other backbone tensor is what pretraining learned, not ImageNet's
    imagenet = build_run_model(load_config(None, TINY_OVERRIDES), ["normal", "pneumonia"], "binary")
    mine = model.backbone.state_dict()
    moved = [k for k, v in state.items() if k != key and not torch.equal(v, imagenet.backbone.state_dict()[k])]
    assert moved and all(torch.equal(mine[k], state[k]) for k in state if k != key)
    run = mt.train(data, overrides=[*TINY_OVERRIDES, f"model.weights={simclr}"], out=tmp_path / "ft")
    assert run.card.weights["pretraining"]["method"] == "simclr"
    assert "self-supervised pretraining (simclr, 40 images" in run.card.weights["source"]


@pytest.mark.parametrize("method", ["byol", "dino"])
def test_byol_and_dino_train_the_encoder(data: Path, tmp_path: Path, method: str) -> None:
    result = pretrain(data, out=tmp_path / method, overrides=[*TINY_PT, "pretrain.epochs=1",
                                                              f"pretrain.method={method}"])
    assert result.method == method and np.isfinite(result.history["loss"]).all()
    before = build_run_model(load_config(None, TINY_OVERRIDES), ["a", "b"], "binary").backbone.state_dict()
    after = read_weights_file(result.weights)
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if v.shape == before[k].shape)


def test_a_listing_leaves_out_the_test_split(data: Path, tmp_path: Path) -> None:
    m = mt.index_scans(data)
    listing = tmp_path / "images.csv"
    m.df[["path", "split"]].to_csv(listing, index=False)
    result = pretrain(data, out=tmp_path / "pt", labels=listing, overrides=[*TINY_PT, "pretrain.epochs=1"])
    used = set(mt.Manifest.load(tmp_path / "pt").df["path"])
    assert result.images == len(m) - int((m.df["split"] == "test").sum())
    assert used.isdisjoint(set(m.df.loc[m.df["split"] == "test", "path"]))


def test_a_killed_pretraining_resumes_where_it_stopped(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    overrides = [*TINY_PT, "pretrain.epochs=3"]
    with faults.arm("step", nth=12), pytest.raises(faults.InjectedFault):  # 5 steps an epoch: dies in epoch 3
        pretrain(data, out=out, overrides=overrides)
    assert not (out / "pretrain.json").exists()
    with pytest.raises(CheckpointError, match="has not finished.*--resume"):
        resolve_weights(str(out), "efficientnet_lite0")
    result = pretrain(data, out=out, overrides=overrides)  # the same command again resumes it
    assert list(result.history["epoch"]) == [1, 2, 3] and list(result.history["attempt"]) == [0, 0, 1]
    with pytest.raises(RunDirError, match="already holds a finished pretraining"):
        pretrain(data, out=out, overrides=overrides)


def test_refusals_name_the_fix(simclr: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained for backbone 'efficientnet_lite0', not 'resnet18'.*--backbone"):
        resolve_weights(str(simclr), "resnet18")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="written by 'medtransfer pretrain'"):
        resolve_weights(str(tmp_path / "empty"), "efficientnet_lite0")
    tampered = tmp_path / "tampered"
    shutil.copytree(simclr, tampered)
    with open(tampered / "backbone.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_weights(str(tampered), "efficientnet_lite0")
    assert resolve_weights("imagenet", "efficientnet_lite0") == ("imagenet", None)


def test_cli_pretrains_and_says_how_to_fine_tune(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pretrain", str(data), "--out", str(tmp_path / "pt"), "--epochs", "1",
                                      "--batch-size", "8", "--image-size", "48", "--method", "byol",
                                      "--set", "train.num_workers=0"])
    assert result.exit_code == 0, result.output
    assert "pretrained efficientnet_lite0 with byol on 40 images" in result.output
    assert f"--weights {tmp_path / 'pt'}" in result.output


# -- the audit compares sources --------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_transfer_audit_compares_imagenet_ssl_and_scratch(data: Path, simclr: Path, tmp_path: Path) -> None:
    cfg = load_config(None, TINY_OVERRIDES)
    manifest = mt.index_scans(data)
    result = audit_transfer(manifest, config=cfg, strategies=("scratch", "linear-probe"), fractions=(0.5, 1.0),
                            seeds=1, budget_epochs=1, n_boot=20, out=tmp_path / "audit", sources={"ssl": str(simclr)})
    assert set(result.cells["strategy"]) == {"scratch", "linear-probe", "linear-probe@ssl"}
    assert set(result.curve["strategy"]) == {"scratch", "linear-probe", "linear-probe@ssl"}
    assert result.cells["test_auroc"].notna().all()
    assert "linear-probe@ssl" in result.summary["data_efficiency"]
    with pytest.raises(ConfigError, match="neither an existing weights file"):
        audit_transfer(manifest, config=cfg, strategies=("linear-probe",), fractions=(1.0,), seeds=1,
                       budget_epochs=1, out=tmp_path / "a2", sources={"bad": "no/such/thing"})


def test_audit_cli_source_must_be_name_equals_spec(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", str(data), "--out", str(tmp_path / "a"), "--source", "runs/pt",
                                      "--no-shortcuts"])
    assert result.exit_code == 2 and "expected NAME=SPEC" in result.output
