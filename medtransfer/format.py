"""Formatting of numbers for the report, the checks and the console: one place decides how a value or an interval reads.

Every function returns :data:`NOT_PROVIDED` for a missing value rather than inventing one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

NOT_PROVIDED = "not provided"


def is_num(v: Any) -> bool:
    """True for a finite int/float (NaN, None, text: False)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def num(v: Any, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, or :data:`NOT_PROVIDED`."""
    return f"{float(v):.{digits}f}" if is_num(v) else NOT_PROVIDED


def with_ci(v: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """``0.812 (0.701–0.903)``; the point alone when the CI is missing; :data:`NOT_PROVIDED` when all are."""
    if not is_num(v):
        return NOT_PROVIDED
    if is_num(lo) and is_num(hi):
        return f"{v:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"
    return f"{v:.{digits}f} (no CI)"


def pct(v: Any) -> str:
    """``41.7%`` or :data:`NOT_PROVIDED`."""
    return f"{100 * float(v):.1f}%" if is_num(v) else NOT_PROVIDED


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with absolute paths reduced to their last component (``/data/site/cxr`` -> ``cxr``)."""
    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, str) and (v.startswith(("/", "~", "\\")) or (len(v) > 2 and v[1] == ":" and v[2] in "/\\")):
            return f"<{Path(v.replace(chr(92), '/')).name}>"
        return v
    return walk(config)
