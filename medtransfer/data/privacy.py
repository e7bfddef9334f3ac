"""Pseudonymisation: salted hashes instead of identifiers.

PatientID, StudyInstanceUID and file paths are replaced by ``HMAC-SHA256(salt, value)`` truncated to
12 hex digits. The salt is a secret that never goes into outputs (otherwise low-entropy IDs such as
hospital numbers could be brute-forced from the manifest). It comes from, in order:
``$MEDTRANSFER_SALT``, or a per-user secret file ``~/.config/medtransfer/salt`` created once with 32
random bytes. The same machine therefore gives the same keys on every run (re-indexing and resuming are
stable), while keys from two sites cannot be linked unless they share the salt on purpose.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from medtransfer import io

_SALT_ENV = "MEDTRANSFER_SALT"

#: DICOM attributes that identify a person or an encounter. They are never copied to any output.
PHI_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "AccessionNumber",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StudyID",
)


@functools.lru_cache(maxsize=1)
def get_salt() -> bytes:
    """The pseudonymisation secret (see the module docstring for where it comes from)."""
    env = os.environ.get(_SALT_ENV)
    if env:
        return env.encode("utf-8")
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = home / "medtransfer" / "salt"
    if path.is_file():
        return path.read_bytes()
    salt = secrets.token_hex(32).encode("ascii")
    try:
        io.write_bytes(path, salt)
        os.chmod(path, 0o600)
    except OSError:  # read-only home: keep a per-process salt rather than fail
        pass
    return salt


def pseudonym(value: str, *, kind: str = "id", length: int = 12) -> str:
    """Stable pseudonymous key for ``value``: HMAC-SHA256 with the salt, ``kind`` separating namespaces.

    Examples:
        >>> len(pseudonym("12345", kind="patient"))
        12
    """
    digest = hmac.new(get_salt(), f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:length]
