"""Item 9: two ``train`` commands on one run directory: the second is refused (lock file) with one clear
line, touches nothing, and the first carries on. A killed holder's lock dies with it (fcntl)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import Pipeline, assert_user_error, cli, cli_cmd, cli_env, train_args

pytestmark = pytest.mark.slow


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first train command ended (exit {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.glob("*.*"))
            if p.is_file() and p.name != ".lock"}


def test_a_second_train_on_a_busy_run_directory_is_refused(pipeline: Pipeline, tmp_path: Path) -> None:
    from medtransfer.training.run import run_lock

    run = tmp_path / "run"
    first = subprocess.Popen(cli_cmd(*train_args(pipeline.data, run, "train.epochs=500", "train.patience=1000")),
                             env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = run / ".lock"
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "it took the lock", first)
        # input_size.json is the last file written before training starts (after manifest.json and config.yaml)
        _wait_for(lambda: (run / "input_size.json").is_file(), "it indexed the data and chose the size", first)
        before = _snapshot(run)

        for args in (train_args(pipeline.data, run), ["--quiet", "train", "--resume", "--out", str(run)]):
            line = assert_user_error(cli(*args), "RunDirError", "in use by another medtransfer process")
            assert str(lock) in line

        assert _snapshot(run) == before  # the refused commands wrote nothing
        assert first.poll() is None  # and the first one is still training
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    with run_lock(run):  # the killed holder's lock went with it
        pass
