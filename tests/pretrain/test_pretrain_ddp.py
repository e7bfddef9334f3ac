"""Self-supervised pretraining under torchrun: 2 CPU processes with gloo (DDP, SimCLR's negatives gathered from
both ranks), rank 0 alone writing, the result a weights source like one process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medtransfer.pretrain.source import resolve_weights
from tests.training.conftest import make_tiny_dataset
from tests.training.test_ddp import _env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("ptddp") / "data")


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_two_processes_pretrain_one_folder(tiny_data: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / "pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "medtransfer", "pretrain", str(tiny_data), "--out", str(out), "--epochs", "2", "--batch-size", "8",
           "--image-size", "48", "--method", method, "--set", "train.num_workers=0"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "pretrain.json").read_text())
    assert info["epochs"] == 2 and info["images"] == 40 and info["method"] == method
    assert (out / "history.csv").read_text().count("\n") == 3  # rank 0 alone wrote it: one row per epoch
    path, summary = resolve_weights(str(out), "efficientnet_lite0")
    assert Path(path).is_file() and summary["method"] == method
