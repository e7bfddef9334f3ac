"""SHA-256 digests: one implementation for files (weights, checkpoints, reports) and for settings.

Files are read in 1 MiB blocks and the digest is memoised on (resolved path, size, mtime), so hashing the
same weights file for the model card, the report and a checkpoint check costs one read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any


def sha256_file(path: str | os.PathLike[str], *, memoise: bool = True) -> str:
    """Hex SHA-256 of a file's bytes.

    Args:
        path: the file.
        memoise: reuse the digest of a file with the same resolved path, size and modification time; pass
            False where the digest is an integrity check that must read the bytes (checkpoint verification).
    """
    if not memoise:
        return _sha256_read(str(path))
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return _sha256_read(path)


def _sha256_read(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any, length: int = 64) -> str:
    """Hex SHA-256 (first ``length`` characters) of ``obj`` as canonical JSON (sorted keys; str() for the rest).

    Used to key settings (audit cells, demo stages): equal settings give equal keys on any machine.
    """
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
