"""Fault points for the crash tests: named places in production code where a test can make the process fail.

Production code marks a point with one call, ``faults.point("write", path)`` (in :func:`medtransfer.io.atomic_path`,
after the temporary file is written and fsynced, before it is renamed: the worst moment for a crash) or
``faults.point("step")`` (in :class:`medtransfer.training.loop.Stepper`, just before each optimiser step). A point
is a no-op unless a test armed it, and this module is the only one that knows how faults are armed:

- in-process, :func:`arm` arms a point for the duration of a ``with`` block (it raises :class:`InjectedFault`,
  or runs the ``action`` you give, at the N-th matching hit) and restores the previous state on exit;
- in a subprocess (the CLI killed with a real SIGKILL), the environment does it: :func:`subprocess_env` gives
  the variables, read here once, on the first hit of any point, never at import and never by other modules.

==========  ==================================  =====================================================
point       environment variable                value
==========  ==================================  =====================================================
``write``   ``MEDTRANSFER_FAULT_KILL_IN_WRITE``  ``PATTERN[:N]``: SIGKILL at the N-th (default first)
                                                atomic write of a file whose name matches the fnmatch
                                                ``PATTERN``
``step``    ``MEDTRANSFER_FAULT_KILL_AT_STEP``   ``N``: SIGKILL just before the N-th optimiser step
==========  ==================================  =====================================================

Under torchrun, ``MEDTRANSFER_FAULT_RANK=R`` arms these only in the process of global rank R, and only in the
group's first start (``TORCHELASTIC_RESTART_COUNT`` 0), so that a group restarted by the agent runs clean.

Hits are counted per process from the moment a fault is armed (for the environment: from process start). The
variables are never set outside tests.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath

#: The environment variable that arms each point in a subprocess (all start with :data:`ENV_PREFIX`).
ENV_PREFIX = "MEDTRANSFER_FAULT_"
_ENV = {"write": ENV_PREFIX + "KILL_IN_WRITE", "step": ENV_PREFIX + "KILL_AT_STEP"}
_RANK_ENV = ENV_PREFIX + "RANK"
#: The fault points production code may call.
POINTS = tuple(_ENV)


class InjectedFault(BaseException):
    """Raised by an in-process armed point. A BaseException, like KeyboardInterrupt, so that ``except
    Exception`` handlers in the code under test do not swallow the simulated crash."""


@dataclass
class _Fault:
    """One armed point: fire ``action`` at the ``nth`` hit whose subject's name matches ``match``."""

    match: str | None
    nth: int
    action: Callable[[], None]
    hits: int = 0


_lock = threading.Lock()
_armed: dict[str, _Fault] | None = None  # None until the environment has been read (first hit of any point)


def point(name: str, subject: str | os.PathLike[str] | None = None) -> None:
    """Mark fault point ``name``; does nothing unless a test armed it.

    Args:
        name: one of :data:`POINTS`.
        subject: what the point is about (the final path of a write); an armed fault with a ``match`` pattern
            counts only hits whose subject's file name matches it.
    """
    armed = _armed if _armed is not None else _read_environment()
    if not armed:
        return
    fault = armed.get(name)
    if fault is None:
        return
    if fault.match is not None and (subject is None or not fnmatch.fnmatch(PurePath(subject).name, fault.match)):
        return
    with _lock:
        fault.hits += 1
        fire = fault.hits == fault.nth
    if fire:
        fault.action()


@contextlib.contextmanager
def arm(name: str, *, match: str | None = None, nth: int = 1,
        action: Callable[[], None] | None = None) -> Iterator[None]:
    """Arm point ``name`` in this process for the ``with`` block; the previous state is restored on exit.

    Args:
        name: one of :data:`POINTS`.
        match: fnmatch pattern on the subject's file name (``"*.png"``); None counts every hit.
        nth: fire at this matching hit (1 = the first), counted from arming.
        action: what firing does; by default it raises :class:`InjectedFault`.

    Examples:
        >>> with faults.arm("write", match="model_card.json"), pytest.raises(faults.InjectedFault):  # doctest: +SKIP
        ...     io.write_json(run / "model_card.json", card)
    """
    _check(name, nth)
    global _armed
    armed = _armed if _armed is not None else _read_environment()
    saved = dict(armed)
    with _lock:
        _armed = {**armed, name: _Fault(match, nth, action or _raise)}
    try:
        yield
    finally:
        with _lock:
            _armed = saved


def subprocess_env(name: str, *, match: str | None = None, nth: int = 1, rank: int | None = None) -> dict[str, str]:
    """The environment variables that make a child process SIGKILL itself at the ``nth`` hit of point ``name``.

    ``rank``: under torchrun, only the process of that global rank, in the group's first start.

    Examples:
        >>> subprocess.run(cmd, env={**os.environ, **faults.subprocess_env("step", nth=3)})  # doctest: +SKIP
    """
    _check(name, nth)
    if name == "write":
        if not match:
            raise ValueError("the 'write' point needs match= (an fnmatch pattern on the file name, e.g. '*.png')")
        return {_ENV[name]: f"{match}:{nth}", **({} if rank is None else {_RANK_ENV: str(rank)})}
    if match is not None:
        raise ValueError(f"the {name!r} point has no subject to match; give nth= only")
    return {_ENV[name]: str(nth), **({} if rank is None else {_RANK_ENV: str(rank)})}


def _check(name: str, nth: int) -> None:
    if name not in _ENV:
        raise ValueError(f"unknown fault point {name!r}; choose from {list(POINTS)}")
    if nth < 1:
        raise ValueError(f"nth={nth}: hits are counted from 1")


def _raise() -> None:
    raise InjectedFault("fault injected by medtransfer.faults.arm")


def _kill() -> None:
    # A real SIGKILL: no handler, no cleanup, no flush, exactly like a power cut or the OOM killer.
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _read_environment() -> dict[str, _Fault]:
    """Arm the points named by the environment (once per process) and return what is armed."""
    global _armed
    with _lock:
        if _armed is None:
            _armed = _parse_environment(os.environ)
        return _armed


def _parse_environment(env: Mapping[str, str]) -> dict[str, _Fault]:
    armed: dict[str, _Fault] = {}
    only = env.get(_RANK_ENV, "")
    if only and (env.get("RANK", "0") != only or env.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0")):
        return armed  # armed for another rank, or for the first start only
    write = env.get(_ENV["write"], "")
    if write:
        pattern, _, nth = write.partition(":")
        if not pattern or not (nth or "1").isdigit() or int(nth or 1) < 1:
            raise ValueError(f"{_ENV['write']}={write!r}: expected PATTERN[:N], e.g. 'model_card.json' or '*.png:2'")
        armed["write"] = _Fault(pattern, int(nth or 1), _kill)
    step = env.get(_ENV["step"], "")
    if step:
        if not step.isdigit():
            raise ValueError(f"{_ENV['step']}={step!r}: expected a step number (1 = the first optimiser step)")
        if int(step):  # 0 means "off", as before
            armed["step"] = _Fault(None, int(step), _kill)
    return armed
