"""``mt.audit``, ``mt.explain`` and ``mt.adapt`` are functions that share their names with packages: they must
stay callable when the package was imported first (which sets ``medtransfer.<name>`` to the package module)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("name", "submodule", "target"), [
    ("audit", "medtransfer.audit.transfer", "medtransfer.audit.run:audit"),
    ("explain", "medtransfer.explain.regions", "medtransfer.explain.saliency:explain"),
    ("adapt", "medtransfer.adapt.shift", "medtransfer.adapt.site:adapt"),
])
def test_public_function_stays_callable_after_its_package_is_imported(name: str, submodule: str,
                                                                      target: str) -> None:
    code = (f"import {submodule}, inspect, importlib\nimport medtransfer as mt\nf = mt.{name}\n"
            f"assert callable(f), type(f)\nmod, fn = {target!r}.split(':')\n"
            "real = getattr(importlib.import_module(mod), fn)\n"
            "assert f is real or f.__call_target__ == " + repr(target) + "\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
