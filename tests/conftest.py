"""Test configuration shared by all tests: CPU only, deterministic, a private pseudonymisation salt.

Also the one rule for checks that need something outside the Python environment (a system package such as
Chromium, poppler or pango, or the real data in ``../shared/data``): :func:`skip_or_fail`. Off CI such a
check skips with the reason; on CI (``CI=true``), which installs all of them (``.ci/run``), it fails with
the reason, because there a silent skip would hide a broken install.
"""

from __future__ import annotations

import os
from typing import NoReturn

os.environ.setdefault("MEDTRANSFER_SALT", "test-salt-not-secret")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kermany-cxr-600")
#: Values of the CI variable that mean "this is a CI run" (GitHub Actions and GitLab set CI=true).
CI_TRUE = frozenset({"true", "1", "yes"})


def on_ci() -> bool:
    """True when the environment variable ``CI`` says this is a CI run (``CI=true``, case-insensitive)."""
    return os.environ.get("CI", "").strip().lower() in CI_TRUE


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test with ``reason``, or fail it with ``reason`` when ``CI=true``.

    Use it wherever a check cannot run because a system package or the shared data is missing: on a
    developer's machine that is a skip (the reason says what to install); on CI those are installed on
    purpose, so their absence is a broken CI install that must turn the run red, not a skip nobody reads.

    Args:
        reason: what is missing and how to install or provide it.
    """
    if on_ci():
        pytest.fail(f"{reason} -- CI=true: CI installs the system packages and has the shared data, so this "
                    "must be present there; failing instead of skipping (unset CI to skip locally)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kermany_dir() -> str:
    """The real paediatric chest X-ray subset in ../shared/data; skips (fails under CI=true) when absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        skip_or_fail(f"real-data check: {path} is absent (it lives in the project's shared/ folder)")
    return path
