"""Item 2: a write that hits a full disk leaves the previous checkpoint / report intact and exits 1 with one
clear line (no traceback).

How the disk is filled: as root, a small tmpfs is mounted over the output folder and, at the chosen moment,
filled to the last byte, so the next write fails with ENOSPC, a real full disk. Where mounting is not possible
(not root, no CAP_SYS_ADMIN in a container), the stand-in is ``RLIMIT_FSIZE`` in the child process: writing
past the limit fails with EFBIG (Python ignores SIGXFSZ), which medtransfer treats like a full disk. The test
ids say which one ran ("tmpfs" or "rlimit").
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    Pipeline,
    assert_ok,
    assert_user_error,
    cli,
    cli_cmd,
    cli_env,
    copy_run,
    history,
    sha256,
    temporaries,
    train_args,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[bool]:
    """Mount a ``size_mb`` tmpfs at ``path``; yields True, or False (``path`` a plain folder) when impossible."""
    path.mkdir(parents=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True)
        mounted = proc.returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte (1 MiB, then 4 KiB, then 1-byte writes)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            try:
                while True:
                    fh.write(block)
            except OSError:
                pass
    return filler


#: Run in the child: fill the disk (or lower the file-size limit) right after epoch 1 is checkpointed, then
#: run the real CLI. Trackers.log_epoch is called after the epoch's checkpoint is saved.
CHILD = r"""
import resource, sys
from pathlib import Path
from medtransfer.training import tracking
mode, folder, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
original = tracking.Trackers.log_epoch
def log_epoch(self, row):
    original(self, row)
    if row["epoch"] == 1:
        if mode == "tmpfs":
            from tests.reliability.test_disk_full import fill
            fill(folder)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
tracking.Trackers.log_epoch = log_epoch
from medtransfer.cli import app
app(argv, prog_name="medtransfer")
"""


@pytest.fixture()
def fs(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(output folder, mode): a 160 MiB tmpfs when possible, else a plain folder for the RLIMIT_FSIZE mode."""
    with small_filesystem(tmp_path / "fs", 160) as mounted:
        yield tmp_path / "fs", "tmpfs" if mounted else "rlimit"


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_exits_1(
        pipeline: Pipeline, fs: tuple[Path, str]) -> None:
    from medtransfer.models.checkpoint import peek_training_state
    from medtransfer.models.weights_io import load_safetensors_file

    folder, mode = fs
    run = folder / "run"
    args = train_args(pipeline.data, run)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder), *args], env=cli_env(),
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    line = assert_user_error(proc, "DiskFullError", "could not be written",
                             "no space left" if mode == "tmpfs" else "file-size limit")
    assert "checkpoints" in line  # names the file that could not be written
    assert peek_training_state(run / "checkpoints" / "last")["epoch"] == 1  # intact: its sha256 is verified
    load_safetensors_file(run / "checkpoints" / "best" / "model.safetensors")
    assert not (run / "model.safetensors").exists()
    assert temporaries(run) == []

    with contextlib.suppress(FileNotFoundError):
        (folder / "filler.bin").unlink()  # space again: the same command resumes from that checkpoint
    resumed = cli(*args)
    assert_ok(resumed)
    assert history(run) == history(pipeline.run)
    assert sha256(run / "model.safetensors") == sha256(pipeline.run / "model.safetensors")


def _limit_file_size() -> None:  # preexec_fn of the rlimit mode: 64 KiB, far below the report's size
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.parametrize("mode", ["tmpfs", "rlimit"])
def test_full_disk_while_writing_the_report_keeps_the_previous_report_and_exits_1(
        pipeline: Pipeline, tmp_path: Path, mode: str) -> None:
    with small_filesystem(tmp_path / "fs", 16) as mounted:
        if mode == "tmpfs" and not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the rlimit case covers it")
        run = copy_run(pipeline.run, tmp_path / "fs", drop=("checkpoints", "cache", "model.safetensors"))
        before = {name: (run / name).read_bytes() for name in ("report.html", "report.pdf")}
        if mode == "tmpfs":
            fill(tmp_path / "fs")
        proc = subprocess.run(cli_cmd("--quiet", "report", run), env=cli_env(), capture_output=True, text=True,
                              timeout=600, preexec_fn=_limit_file_size if mode == "rlimit" else None)
        line = assert_user_error(proc, "DiskFullError", "could not be written", "report.html",
                                 "no space left" if mode == "tmpfs" else "file-size limit")
        assert "intact" in line
        assert {name: (run / name).read_bytes() for name in before} == before
        assert temporaries(run) == []
