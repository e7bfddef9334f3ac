"""Optional dependencies: one helper that names the extra to install (TorchIO's pattern)."""

from __future__ import annotations

import importlib
from types import ModuleType

from medtransfer.errors import MissingDependency


def require(module: str, *, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependency` naming the extra that provides it.

    Args:
        module: importable module name, e.g. ``"weasyprint"``.
        extra: the medtransfer extra that installs it, e.g. ``"pdf"``.
        purpose: what the user was trying to do, for the message.

    Examples:
        >>> np = require("numpy", extra="dev")
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        what = f" for {purpose}" if purpose else ""
        raise MissingDependency(
            f"'{module}' is needed{what} but is not installed. "
            f'Install it with: pip install "medtransfer[{extra}]"'
        ) from exc


def available(module: str) -> bool:
    """True when ``module`` can be imported (without raising on failure)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
