"""Kill training with SIGKILL mid-epoch, resume, and get exactly the uninterrupted result (CPU, same seed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from medtransfer import faults
from tests.training.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _train_cmd(data, out, strategy: str, *, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "medtransfer.cli", "--quiet", "train"]
    if resume:
        cmd += ["--resume", "--out", str(out)]
    else:
        cmd += [str(data), "--out", str(out)]
        for item in [*TINY_OVERRIDES, f"train.strategy={strategy}", "train.augment.enabled=true"]:
            cmd += ["--set", item]
    return cmd


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# 20 training cases / batch 8 = 3 steps per epoch. fine-tune: step 5 is in the middle of epoch 2.
# gradual: the head epoch on cached features makes 17 passes (51 steps, MIN_HEAD_STEPS), so step 53 is in the
# middle of epoch 2, the first unfrozen epoch.
@pytest.mark.parametrize(("strategy", "kill_step"), [("fine-tune", 5), ("gradual", 53)])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_data, tmp_path, strategy: str,
                                                             kill_step: int) -> None:
    env = {**os.environ, "MEDTRANSFER_SALT": "test-salt-not-secret"}
    clean = tmp_path / "clean"
    subprocess.run(_train_cmd(tiny_data, clean, strategy), env=env, check=True, capture_output=True)

    crashed = tmp_path / "crashed"
    proc = subprocess.run(_train_cmd(tiny_data, crashed, strategy),
                          env={**env, **faults.subprocess_env("step", nth=kill_step)}, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    state = json.loads((crashed / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["epoch"] == 1  # killed during epoch 2
    assert not (crashed / "model.safetensors").exists()
    leftovers = [p.name for p in crashed.rglob(".tmp-*")]
    assert not [n for n in leftovers if not n.startswith(".tmp-")], leftovers

    resumed = subprocess.run(_train_cmd(tiny_data, crashed, strategy, resume=True), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]

    h_clean = pd.read_csv(clean / "history.csv").drop(columns=["seconds", "attempt"])
    h_resumed = pd.read_csv(crashed / "history.csv").drop(columns=["seconds", "attempt"])
    pd.testing.assert_frame_equal(h_clean, h_resumed)
    assert list(pd.read_csv(clean / "history.csv")["attempt"]) == [0, 0, 0]
    assert list(pd.read_csv(crashed / "history.csv")["attempt"]) == [0, 1, 1]  # epoch 2 ran again after the kill
    assert _digest(clean / "model.safetensors") == _digest(crashed / "model.safetensors")


def test_second_train_in_same_run_dir_is_refused(tiny_data, tmp_path) -> None:
    from medtransfer.errors import RunDirError
    from medtransfer.training.run import run_lock

    with run_lock(tmp_path / "r"), pytest.raises(RunDirError, match="in use by another"), run_lock(tmp_path / "r"):
        pass
