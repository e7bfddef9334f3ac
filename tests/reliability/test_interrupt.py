"""Item 3: Ctrl-C during training keeps a resumable checkpoint, exits cleanly (130, no traceback) and prints
the resume command, which then finishes the run with the uninterrupted run's weights.

Ctrl-C is simulated as a terminal sends it: SIGINT to the whole process group. No ``--out`` is given, so the
printed command must name the default ``runs/<timestamp>`` folder rather than a placeholder.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import TINY, Pipeline, assert_ok, cli_cmd, cli_env, history, sha256

pytestmark = pytest.mark.slow


@pytest.mark.xfail(strict=False, reason=(
    "open defect (2026-11-30): passes alone (47 s), but in two full-suite runs (-n 2) the child exited 0 with an "
    "empty stderr, i.e. no 'epoch   1' line reached the loop and no SIGINT was sent; cause not yet found. The "
    "assertion message now carries the child's stdout to find it."))
def test_ctrl_c_during_training_saves_a_checkpoint_and_prints_a_working_resume_command(
        pipeline: Pipeline, tmp_path: Path) -> None:
    from medtransfer.models.checkpoint import peek_training_state

    args = ["--quiet", "train", str(pipeline.data)] + [a for item in TINY for a in ("--set", item)]
    proc = subprocess.Popen(cli_cmd(*args), cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch   1"):  # printed once epoch 1 is checkpointed; epoch 2 is running
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=300)
        out = "".join(seen) + out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, f"stdout: {out[-2000:]!r}\nstderr: {err[-2000:]!r}"
    assert "Traceback" not in out + err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted; continue with: ")]
    assert len(lines) == 1, err[-3000:]
    command = shlex.split(lines[0].removeprefix("interrupted; continue with: "))
    assert command[:4] == ["medtransfer", "train", "--resume", "--out"] and command[4].startswith("runs/")

    run = tmp_path / command[4]
    state = peek_training_state(run / "checkpoints" / "last")  # complete and verified (sha256)
    assert state["epoch"] in (1, 2)
    assert not (run / "model_card.json").exists()

    resumed = subprocess.run(cli_cmd("--quiet", *command[1:]), cwd=tmp_path, env=cli_env(), capture_output=True,
                             text=True, timeout=600)
    assert_ok(resumed)
    assert history(run) == history(pipeline.run)
    assert sha256(run / "model.safetensors") == sha256(pipeline.run / "model.safetensors")
