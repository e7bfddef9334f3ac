"""Safe checkpoints: model roundtrip, hostile files, bit-exact training-state resume."""

from __future__ import annotations

import json
import math
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from medtransfer.errors import CheckpointError
from medtransfer.models import checkpoint as ck
from medtransfer.models.card import ModelCard
from medtransfer.models.classifier import build_model
from tests.models.test_card import make_card

torch.set_num_threads(2)


# -- trained models ---------------------------------------------------------------------------------------
@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached torchvision weights and no downloads: loading must not need pretrained weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "1")


def _resnet_run(tmp_path: Path, classes=("a", "b", "c")) -> tuple[nn.Module, ModelCard, Path]:
    torch.manual_seed(0)
    model = build_model("resnet18", list(classes), task="multiclass", weights="none")
    card = make_card(backbone="resnet18", task="multiclass", classes=list(classes), num_outputs=len(classes))
    run = tmp_path / "run"
    ck.save_model(model, run, card)
    return model, card, run


def test_save_load_model_roundtrip_gives_identical_outputs(tmp_path, offline):
    model, card, run = _resnet_run(tmp_path)
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors", "model_card.json"]
    loaded, loaded_card = ck.load_model(run)
    assert loaded_card == card and not loaded.training
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_mismatched_shapes_are_refused_naming_the_tensor(tmp_path, offline):
    _, card, run = _resnet_run(tmp_path, classes=("a", "b"))
    three = make_card(backbone="resnet18", task="multiclass", classes=["a", "b", "c"], num_outputs=3)
    three.save(run / "model_card.json")  # the card now disagrees with the weights
    with pytest.raises(CheckpointError, match=r"head\.1\.weight: file \(2, 512\) vs model \(3, 512\)"):
        ck.load_model(run)


def test_card_that_does_not_describe_the_model_is_refused_at_save(tmp_path):
    model = build_model("efficientnet_lite0", ["a", "b"], weights="none")
    with pytest.raises(CheckpointError, match="build the card from this model"):
        ck.save_model(model, tmp_path, make_card(backbone="resnet18"))


def test_unknown_backbone_in_run_dir_is_refused(tmp_path, offline):
    _, card, run = _resnet_run(tmp_path)
    raw = json.loads((run / "model_card.json").read_text())
    raw["backbone"] = "resnet1000"
    (run / "model_card.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown backbone 'resnet1000'"):
        ck.load_model(run)


def test_pickle_given_as_a_checkpoint_is_refused_with_the_explanation(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="pickles are never loaded") as info:
        ck.load_model(pt)
    assert "safetensors + JSON" in str(info.value)
    run = tmp_path / "run"
    run.mkdir()
    make_card().save(run / "model_card.json")
    os.replace(pt, run / "model.pth")
    with pytest.raises(CheckpointError, match="pickles are never loaded"):
        ck.load_model(run)
    no_suffix = tmp_path / "weights"
    torch.save({"w": torch.zeros(1)}, no_suffix)  # a zip container, whatever its name
    with pytest.raises(CheckpointError, match="pickle"):
        ck.refuse_pickle(no_suffix)


# -- hostile safetensors ------------------------------------------------------------------------------------
def _valid_safetensors(path: Path) -> bytes:
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path))
    return path.read_bytes()


def _hostile_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = _valid_safetensors(tmp_path / "good.safetensors")
    n = struct.unpack("<Q", good[:8])[0]
    header = good[8:8 + n]
    return {
        "header longer than file": (struct.pack("<Q", 10_000) + header, "larger than the file"),
        "oversized header": (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "exceeds"),
        "not json": (struct.pack("<Q", 8) + b"garbage!" + b"\0" * 24, "not JSON"),
        "truncated data": (good[:8 + n + 5], "outside"),
        "too short": (b"\x01\x02", "shorter"),
        "pickle in disguise": (_pickle_bytes(tmp_path), "pickle"),
    }


def _pickle_bytes(tmp_path: Path) -> bytes:
    torch.save({"w": torch.zeros(3)}, tmp_path / "p.pt")
    return (tmp_path / "p.pt").read_bytes()


def test_corrupt_safetensors_files_are_refused(tmp_path):
    _valid_safetensors(tmp_path / "good.safetensors")
    assert torch.equal(ck.load_safetensors_file(tmp_path / "good.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    for name, (data, match) in _hostile_files(tmp_path).items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=match):
            ck.load_safetensors_file(path)


def test_corrupt_model_safetensors_in_a_run_dir_is_refused(tmp_path, offline):
    _, _, run = _resnet_run(tmp_path)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(CheckpointError, match="larger than the file"):
        ck.load_model(run)


# -- training state -------------------------------------------------------------------------------------------
class Warmup:
    """A callable-object lambda, like medtransfer's WarmupCosine: LambdaLR saves its __dict__."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / (self.warmup + 1)) * 0.5 * (1 + math.cos(math.pi * step / 20))


def _cosine_fn(step: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / 20))


SCHEDULERS = {
    "lambda-object": lambda opt: LambdaLR(opt, Warmup(3)),
    "lambda-function": lambda opt: LambdaLR(opt, _cosine_fn),
    "sequential": lambda opt: SequentialLR(opt, [LinearLR(opt, 0.1, total_iters=3), CosineAnnealingLR(opt, 10)],
                                           milestones=[3]),
    "onecycle": lambda opt: OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=12, pct_start=0.3),
    "plateau": lambda opt: ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0),
}


def _setup(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    groups = [{"params": model[0].parameters(), "lr": 0.01, "name": "body"},
              {"params": list(model[1].parameters()) + list(model[4].parameters()), "lr": 0.02, "name": "head"}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    return model, opt, SCHEDULERS[kind](opt)


def _steps(model, opt, sched, n: int) -> list[list[float]]:
    lrs = []
    model.train()
    for _ in range(n):
        x = torch.randn(16, 4) + float(np.random.rand()) + random.random()  # every RNG matters
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(sched, ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return lrs


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path, kind):
    random.seed(1)
    np.random.seed(1)
    model, opt, sched = _setup(kind)
    _steps(model, opt, sched, 4)
    ck.save_training_state(tmp_path / "last", model=model, optimizer=opt, scheduler=sched, epoch=2, step=4,
                           rng={"loader": torch.Generator().manual_seed(5).get_state()},
                           extra={"best_metric": -math.inf, "history": [{"epoch": 1, "val_auroc": 0.5}]})
    lrs_a = _steps(model, opt, sched, 5)
    params_a = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    random.seed(9)
    np.random.seed(9)
    model_b, opt_b, sched_b = _setup(kind)
    state = ck.load_training_state(tmp_path / "last", model_b, opt_b, sched_b)
    assert state["epoch"] == 2 and state["step"] == 4
    assert state["extra"] == {"best_metric": -math.inf, "history": [{"epoch": 1, "val_auroc": 0.5}]}
    assert torch.equal(state["rng"]["loader"], torch.Generator().manual_seed(5).get_state())
    lrs_b = _steps(model_b, opt_b, sched_b, 5)
    assert lrs_b == lrs_a
    assert all(torch.equal(a, b) for a, b in zip(params_a, model_b.parameters(), strict=True))


def test_training_state_files_and_keys(tmp_path):
    model, opt, sched = _setup("plateau")
    _steps(model, opt, sched, 2)
    d = tmp_path / "last"
    assert not ck.training_state_exists(d)
    ck.save_training_state(d, model=model, optimizer=opt, scheduler=sched, epoch=1, step=2)
    ck.save_training_state(d, model=model, optimizer=opt, scheduler=sched, epoch=2, step=4)
    files = sorted(p.name for p in d.iterdir())
    assert len(files) == 2 and files[1] == "training_state.json"  # the old tensors file is gone
    doc = json.loads((d / "training_state.json").read_text())
    assert doc["tensors_file"] == files[0] and doc["epoch"] == 2
    keys = ck.load_safetensors_file(d / files[0]).keys()
    assert "optim.state.0.exp_avg" in keys and "model.1.running_mean" in keys and "rng.torch_cpu" in keys
    assert doc["scheduler"]["mode_worse"] == {"__float__": "-inf"}  # non-finite floats survive JSON
    peek = ck.peek_training_state(d)
    assert peek["epoch"] == 2 and peek["scheduler_class"] == "ReduceLROnPlateau"


def test_tampered_or_incomplete_training_state_is_refused(tmp_path):
    model, opt, sched = _setup("onecycle")
    d = tmp_path / "last"
    ck.save_training_state(d, model=model, optimizer=opt, scheduler=sched, epoch=1, step=0)
    tensors = next(d.glob("training_state.*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        ck.load_training_state(d, model, opt, sched)
    tensors.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        ck.peek_training_state(d)


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    model, opt, sched = _setup("lambda-object")
    ck.save_training_state(tmp_path, model=model, optimizer=opt, scheduler=sched, epoch=1, step=0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="saved optimizer is AdamW"):
        ck.load_training_state(tmp_path, model, sgd)
