"""Test configuration shared by all tests: CPU only, deterministic, a private pseudonymisation salt."""

from __future__ import annotations

import os

os.environ.setdefault("MEDTRANSFER_SALT", "test-salt-not-secret")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "kermany-cxr-600")


@pytest.fixture(scope="session")
def kermany_dir():
    """The real paediatric chest X-ray subset in ../shared/data, or skip with the reason."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"real-data check skipped: {path} is absent (it lives in the project's shared/ folder)")
    return path
