"""Experiment tracking: TensorBoard event files and MLflow calls, per epoch."""

from __future__ import annotations

import sys
import types

import pytest

from medtransfer.config import load_config
from medtransfer.errors import MissingDependency
from medtransfer.training.tracking import Trackers

ROW = {"epoch": 1, "phase": "head", "lr": 1e-3, "train_loss": 0.5, "val_loss": 0.4, "val_auroc": 0.9,
       "seconds": 1.0}


def test_tensorboard_writes_event_files(tmp_path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    t = Trackers(load_config(None, ["train.tensorboard=true"]), tmp_path)
    t.log_epoch(ROW)
    t.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_mlflow_receives_params_and_metrics(tmp_path, monkeypatch) -> None:
    calls: list[tuple] = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda **kw: calls.append(("start", kw))
    fake.log_params = lambda p: calls.append(("params", p))
    fake.log_metric = lambda k, v, step: calls.append(("metric", k, v, step))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    t = Trackers(load_config(None, ["train.mlflow=true"]), tmp_path / "run7")
    t.log_epoch(ROW)
    t.close()
    assert calls[0] == ("start", {"run_name": "run7"})
    params = calls[1][1]
    assert params["model.backbone"] == "efficientnet_lite0" and not any(k.startswith("data.") for k in params)
    assert ("metric", "val_auroc", 0.9, 1) in calls and calls[-1] == ("end",)


def test_missing_extra_names_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # makes "import mlflow" fail
    with pytest.raises(MissingDependency, match=r'pip install "medtransfer\[mlflow\]"'):
        Trackers(load_config(None, ["train.mlflow=true"]), tmp_path)
