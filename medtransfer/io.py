"""Atomic file writes: a final name never holds a half-written file.

Every output medtransfer writes (manifests, checkpoints, reports, PNGs) goes through these helpers:
the content is written to a temporary file in the same folder, flushed and fsynced, then renamed over
the final name (``os.replace`` is atomic on POSIX and Windows). A crash or a full disk leaves the previous
version intact and at most a ``.tmp-<name>.<pid>.*`` file behind, which the next successful write of that
name deletes (once process ``pid`` is gone).

A write that fails because the disk, the quota or the file-size limit is full raises
:class:`~medtransfer.errors.DiskFullError` naming the file (the CLI prints it as one line and exits 1),
whichever library did the writing: safetensors reports it as ``SafetensorError("... (os error 28)")``,
not as an ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from medtransfer import faults
from medtransfer.errors import DiskFullError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it

#: errno values that mean "no room for this write": disk full, quota exceeded, file-size limit (RLIMIT_FSIZE).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Libraries that write through Rust (safetensors) report the OS error in their message only.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")

def disk_full_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` when it means the disk/quota/file-size limit is full, else None."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None:
        match = _RUST_OS_ERROR.search(str(exc))
        code = int(match.group(1)) if match else None
    return code if code in DISK_FULL_ERRNOS else None


def disk_full_error(path: str | os.PathLike[str], code: int) -> DiskFullError:
    """The DiskFullError for a failed write of ``path`` (errno ``code``), saying what to do."""
    what = "the file-size limit (ulimit -f) was reached" if code == errno.EFBIG else (
        "the disk quota is exceeded" if code == errno.EDQUOT else "no space left on the device")
    return DiskFullError(f"{path}: could not be written: {what}. The previous version of the file, if any, "
                         "is intact. Free some space (or write to another folder) and run the command again.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    Use it for libraries that insist on writing to a path themselves (safetensors, matplotlib,
    pandas). On any exception the temporary file is removed and ``path`` is untouched.

    ``durable=False`` is for caches whose entries are checked when read and can be made again (decoded
    images): the rename is still atomic (no reader sees half a file), but there is no fsync of the file and
    its folder and no sweep for other writers' stale temporaries. A cache of thousands of small files then
    costs what writing them costs, not thousands of fsyncs plus a scan of the whole folder per file.

    Examples:
        >>> with atomic_path("out/model.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, str(tmp))
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.{os.getpid()}.", dir=final.parent)
    except OSError as exc:
        code = disk_full_errno(exc)
        if code is not None:
            raise disk_full_error(final, code) from exc
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        faults.point("write", final)  # the crash tests' worst moment: data written, not yet renamed
        if tmp.exists():  # mkstemp makes 0600; give the final file the mode a plain open() would (umask)
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
        if durable:
            _fsync_dir(final.parent)
            _remove_stale_temporaries(final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        code = disk_full_errno(exc) if not isinstance(exc, DiskFullError) else None
        if code is not None:
            raise disk_full_error(final, code) from exc
        raise


def _remove_stale_temporaries(final: Path) -> None:
    """Delete ``.tmp-<name>.<pid>.*`` left beside ``final`` by writers that died (killed, power cut).

    The temporary's name carries its writer's process id, so a write still in progress in a live process is
    never touched.
    """
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe on POSIX only (on Windows it terminates)
        return
    prefix = f".tmp-{final.name}."
    for leftover in final.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary file for writing; rename it to ``path`` when the block ends without error."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:  # noqa: SIM117
        yield fh


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path`` and return the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` and return the path."""
    fh: BinaryIO
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (NaN written as null)."""
    text = json.dumps(_nan_to_none(obj), indent=2, sort_keys=True, allow_nan=False, default=_json_default)
    return write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths show up in metric dicts; write them as plain JSON.
    if hasattr(obj, "tolist"):
        return _nan_to_none(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return _nan_to_none(obj.item())
    return obj


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform/filesystem
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
