"""Exceptions that medtransfer raises for problems a user can fix.

Every message says what was received, what was expected and what to do. The CLI turns a
:class:`MedtransferError` into one line on stderr and exit code 1; anything else is a bug.
Messages never carry PHI: they name files by their path relative to the data folder (the user's
own working files) and patients by pseudonymous keys only.
"""

from __future__ import annotations


class MedtransferError(Exception):
    """Base class: a problem the user can fix (bad path, bad config, unreadable data)."""


class ConfigError(MedtransferError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class ScanReadError(MedtransferError):
    """One scan could not be read or decoded.

    Args:
        path: the file (or series folder) that failed, as the user should see it.
        reason: why, and what to do about it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ManifestError(MedtransferError, ValueError):
    """The scan folder or labels CSV cannot form a valid manifest (missing rows, leakage, no cases)."""


class DatasetLayoutError(ManifestError):
    """A public dataset's folder does not hold the files its adapter reads (``medtransfer datasets prepare``).

    The message names the expected file(s), the folder searched and where the dataset is distributed.
    """


class WeightsUnavailable(MedtransferError):
    """Pretrained weights are not available locally and cannot be downloaded."""


class CheckpointError(MedtransferError):
    """A checkpoint or model card is missing, corrupt, unsafe or inconsistent."""


class RunDirError(MedtransferError):
    """A run directory is missing files, or is locked by another process."""


class ExportError(MedtransferError):
    """A run could not be exported, or an exported model does not reproduce the run's probabilities."""


class DiskFullError(MedtransferError, OSError):
    """An output could not be written: the disk (or quota, or file-size limit) is full.

    Raised by the atomic writers in :mod:`medtransfer.io`, so the previous version of the file is intact.
    It is an ``OSError`` too, so code that tolerates failed writes (the image cache) keeps doing so.
    """


class MissingDependency(MedtransferError, ImportError):
    """An optional dependency is needed for a feature; the message names the extra to install."""
