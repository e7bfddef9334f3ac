"""Packages that share their name with a public function (``mt.audit``, ``mt.explain``, ``mt.adapt``).

``medtransfer/__init__.py`` resolves ``mt.adapt`` lazily to :func:`medtransfer.adapt.site.adapt`, but once anything
imports the package ``medtransfer.adapt`` (a submodule import), Python sets ``medtransfer.adapt`` to the package
module and ``mt.adapt(...)`` would fail with "'module' object is not callable". :func:`make_callable` makes such a
package module callable, forwarding to its function, so ``mt.adapt(...)`` works in any import order while
``medtransfer.adapt.shift`` and the like stay ordinary submodules.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    """A package module that calls ``__call_target__`` ("module:function") when called."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, name = self.__dict__["__call_target__"].partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


def make_callable(package: str, target: str) -> None:
    """Make the (already executing) package ``package`` callable as ``target`` ("module:function")."""
    mod = sys.modules[package]
    mod.__dict__["__call_target__"] = target
    mod.__class__ = _CallablePackage
