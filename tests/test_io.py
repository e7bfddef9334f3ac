"""Atomic writes: a failed write leaves the previous file untouched; a finished one has the usual mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtransfer import io


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = io.write_text(tmp_path / "report.html", "old")
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk went away")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_written_file_mode_follows_the_umask_not_mkstemp(tmp_path: Path) -> None:
    path = io.write_text(tmp_path / "a.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    # mkstemp creates 0600; readers in the same group (a hospital's shared project folder) need the normal mode
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
