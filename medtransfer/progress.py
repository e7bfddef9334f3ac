"""Progress for long work, on stderr, switched off with ``progress=False`` / ``--quiet``.

Two displays, chosen from where stderr goes:

- **a terminal** (also tmux, screen, Jupyter): rich progress bars with ETA. While a bar is live, log records
  written to the terminal's stderr are routed through rich so they print *above* the bar instead of being glued
  onto it. When a ``progress_bar`` block ends its bars are erased and printed once as finished rows, ending with
  a newline: what is printed next starts on its own line and no bar is ever reprinted. Blocks may nest (a
  feature pass inside an evaluation): the inner block's rows join the outer display and leave it when done.
- **anything else** (stderr piped to a file, CI logs, ``TERM=dumb``): plain lines, no carriage returns and no
  escape codes. A task prints a line when it starts, at least every :data:`PLAIN_INTERVAL_S` seconds while it
  runs, even inside one slow step (a background ticker), and when it ends::

      features (train): 120/480 images, 25%, elapsed 0:31, ETA 1:33

  A 7-minute frozen-feature pass in ``train ... > log 2>&1`` therefore leaves a line every 30 s rather than
  nothing. ``MEDTRANSFER_PROGRESS_INTERVAL`` (seconds) overrides the interval (tests use 0.5), and
  ``TTY_INTERACTIVE=0`` asks for these lines even where stderr looks like a terminal.

Library functions take ``progress: bool`` and use :func:`progress_bar` / :func:`track`; they never print results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two plain progress lines of a running task (off a terminal).
PLAIN_INTERVAL_S = 30.0
#: Environment variable that overrides :data:`PLAIN_INTERVAL_S` (seconds, > 0).
INTERVAL_ENV = "MEDTRANSFER_PROGRESS_INTERVAL"

_console = Console(stderr=True)
_lock = threading.RLock()
# When a plain progress line (or a heartbeat, or a log record through the CLI's handler) last reached stderr,
# and the last task described: what heartbeat() watches.
_last_output = [time.monotonic()]
_last_task = [""]
_live: Progress | None = None  # the outermost live rich display; nested blocks add their rows to it


def plain_interval() -> float:
    """Seconds between plain progress lines: ``$MEDTRANSFER_PROGRESS_INTERVAL`` or :data:`PLAIN_INTERVAL_S`."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
            if value > 0:
                return value
        except ValueError:
            pass
        logger.warning("%s=%r is not a positive number of seconds; using %g", INTERVAL_ENV, raw, PLAIN_INTERVAL_S)
    return PLAIN_INTERVAL_S


def is_live_terminal(console: Console | None = None) -> bool:
    """Whether ``console`` (default: stderr) can show live bars: a real terminal that is not ``TERM=dumb``.

    Checked at each call (stderr may be redirected after import). ``TTY_INTERACTIVE=0`` forces plain lines and
    ``=1`` bars (rich's convention): a CI that sets ``FORCE_COLOR`` looks like a terminal to rich.
    """
    c = console or _console
    forced = os.environ.get("TTY_INTERACTIVE")
    if forced in ("0", "1"):
        return forced == "1"
    return c.is_jupyter or (c.is_terminal and not c.is_dumb_terminal)


def format_duration(seconds: float) -> str:
    """``0:31``, ``7:07``, ``1:02:03``: minutes:seconds, with hours when needed."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class _NullProgress:
    """Stand-in with the same methods as the real displays that does nothing (``progress=False``)."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None

    def advance(self, *args: object, **kwargs: object) -> None:
        return None

    def remove_task(self, *args: object, **kwargs: object) -> None:
        return None


# -- plain lines (off a terminal) -----------------------------------------------------------------------------


@dataclass
class _PlainTask:
    description: str
    total: float | None
    unit: str
    info: str
    start: float
    completed: float = 0.0
    last_line: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)


class _PlainProgress:
    """Timed plain lines: one when a task starts, then at least every ``interval`` s, one when it ends."""

    def __init__(self, interval: float, stream: Any = None) -> None:
        self.interval = interval
        self._stream = stream
        self._tasks: dict[int, _PlainTask] = {}
        self._next_id = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Lines come from advance() when it is time, and from this ticker when a single step (one batch of a
        # big backbone) outlasts the interval: the log shows the job is alive, not only that it progresses.
        self._ticker = threading.Thread(target=self._tick, name="medtransfer-progress", daemon=True)
        self._ticker.start()

    # the same methods as rich's Progress, so callers never branch on the display
    def add_task(self, description: str, total: float | None = None, *, unit: str = "steps", info: str = "",
                 **fields: Any) -> int:
        with self._lock:
            tid = self._next_id
            self._next_id += 1
            task = _PlainTask(str(description), total, unit, str(info), time.monotonic(), fields=dict(fields))
            self._tasks[tid] = task
            self._emit(task, final=False)
        return tid

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, info: str | None = None,
               **fields: Any) -> None:
        with self._lock:
            task = self._tasks.get(int(task_id))
            if task is None:
                return
            if total is not None:
                task.total = total
            if completed is not None:
                task.completed = completed
            if advance:
                task.completed += advance
            if description is not None:
                task.description = str(description)
            if info is not None:
                task.info = str(info)
            task.fields.update(fields)
            if time.monotonic() - task.last_line >= self.interval:
                self._emit(task, final=False)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        with self._lock:
            task = self._tasks.pop(int(task_id), None)
            if task is not None:
                self._emit(task, final=True)

    def close(self) -> None:
        """Stop the ticker and print the last line of every task still open."""
        self._stop.set()
        self._ticker.join(timeout=5)
        with self._lock:
            for tid in list(self._tasks):
                self._emit(self._tasks.pop(tid), final=True)

    def _tick(self) -> None:
        wait = min(1.0, self.interval / 4)
        while not self._stop.wait(wait):
            with self._lock:
                now = time.monotonic()
                for task in self._tasks.values():
                    if now - task.last_line >= self.interval:
                        self._emit(task, final=False)

    def _emit(self, task: _PlainTask, *, final: bool) -> None:
        now = time.monotonic()
        task.last_line = now
        line = plain_line(task.description, task.completed, task.total, now - task.start, unit=task.unit,
                          info=task.info, final=final)
        stream = self._stream or sys.stderr
        note_output()
        _last_task[0] = task.description
        with _lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):  # a closed or full stream must not kill the job it reports on
                pass


def note_output() -> None:
    """Record that something was just written to stderr (the heartbeat then stays quiet for an interval)."""
    _last_output[0] = time.monotonic()


@contextlib.contextmanager
def heartbeat(label: str, enabled: bool = True, *, stream: Any = None) -> Iterator[None]:
    """Off a terminal, never leave a log silent for long: while the block runs, a line
    ``<label>: working, elapsed 3:05 (last: features (train))`` whenever nothing reached stderr for
    :func:`plain_interval` seconds.

    Progress displays cover the long loops; this covers everything between them (loading weights, a
    bootstrap, writing a report), so a piped job shows a line at least every interval, whatever it is doing.
    No-op on a terminal (the live bars show life) and when ``enabled`` is False (``--quiet``).
    """
    if not enabled or is_live_terminal():
        yield
        return
    interval = plain_interval()
    start = time.monotonic()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(min(1.0, interval / 4)):
            now = time.monotonic()
            if now - _last_output[0] < interval:
                continue
            last = f" (last: {_last_task[0]})" if _last_task[0] else ""
            note_output()
            with _lock:
                try:
                    out = stream or sys.stderr
                    out.write(f"{label}: working, elapsed {format_duration(now - start)}{last}\n")
                    out.flush()
                except (OSError, ValueError):
                    pass

    note_output()
    thread = threading.Thread(target=beat, name="medtransfer-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def plain_line(description: str, completed: float, total: float | None, elapsed: float, *, unit: str = "steps",
               info: str = "", final: bool = False) -> str:
    """One progress line: ``features (train): 120/480 images, 25%, elapsed 0:31, ETA 1:33[, info]``.

    The ETA assumes the remaining steps take as long as the ones done; it is left out before the first step
    and on the last line, which says ``done`` instead.
    """
    done = int(completed)
    parts = []
    if total:
        parts += [f"{done}/{int(total)} {unit}", f"{int(100 * min(completed, total) / total)}%"]
    else:
        parts.append(f"{done} {unit}")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if final:
        parts.append("done" if not total or completed >= total else "stopped")
    elif total and completed > 0:
        parts.append(f"ETA {format_duration(elapsed / completed * max(0.0, total - completed))}")
    elif total:
        parts.append("ETA unknown")
    if info:
        parts.append(info)
    return f"{description}: " + ", ".join(parts)


# -- rich bars (on a terminal) --------------------------------------------------------------------------------


class _RichBlock:
    """One ``progress_bar`` block's view of the live display: the tasks it added, and how they end."""

    def __init__(self, progress: Progress, transient: bool) -> None:
        self._progress = progress
        self._transient = transient
        self._ids: list[TaskID] = []

    def add_task(self, description: str, total: float | None = None, *, unit: str = "steps", info: str = "",
                 **fields: Any) -> TaskID:
        # escaped: rich reads "[head]" in "epoch 1/8 [head]" as a style tag and drops it
        tid = self._progress.add_task(escape(str(description)), total=total, unit=unit, info=escape(str(info)),
                                      **fields)
        self._ids.append(tid)
        return tid

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        for key in ("description", "info"):
            if kwargs.get(key) is not None:
                kwargs[key] = escape(str(kwargs[key]))
        self._progress.update(task_id, **kwargs)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self._progress.advance(task_id, advance)

    def remove_task(self, task_id: TaskID) -> None:
        if task_id in self._ids:
            self._finish([task_id])

    def close(self) -> None:
        self._finish(list(self._ids))

    def _finish(self, ids: list[TaskID]) -> None:
        # Finished rows are printed once as static text (above any display still live) and leave the live
        # display, so they can never be redrawn or reprinted further down.
        tasks = [t for t in self._progress.tasks if t.id in ids]
        if tasks and not self._transient:
            self._progress.console.print(self._progress.make_tasks_table(tasks))
        for tid in ids:
            with contextlib.suppress(KeyError):
                self._progress.remove_task(tid)
            self._ids.remove(tid)


def _new_rich_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,  # the live area is erased at the end; finished rows are printed by _RichBlock
        redirect_stdout=True,
        redirect_stderr=True,
    )


@contextlib.contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Route logging handlers that write to the console's terminal through rich while a bar is live.

    The CLI's handler holds the real stderr, which rich's own redirection (of ``sys.stderr``) cannot see: its
    lines would land in the middle of the bar. Restored on exit.
    """
    real = console.file
    targets = {id(real), id(getattr(real, "rich_proxied_file", real))}
    handlers = [h for h in {*logging.getLogger().handlers, *logging.getLogger("medtransfer").handlers}
                if type(h) is logging.StreamHandler and id(h.stream) in targets]
    saved = [(h, h.setStream(FileProxy(console, h.stream))) for h in handlers]
    try:
        yield
    finally:
        for h, stream in saved:
            proxy = h.stream
            with contextlib.suppress(Exception):
                proxy.flush()
            h.setStream(stream)


# -- the public helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def progress_bar(enabled: bool = True, *, transient: bool = False,
                 console: Console | None = None) -> Iterator[Any]:
    """A progress display for one piece of work, or a no-op when ``enabled`` is False.

    The object yielded has rich's ``add_task(description, total=..., unit=..., info=...)``, ``update(task,
    advance=..., info=...)``, ``advance(task, n)`` and ``remove_task(task)``. ``unit`` names what is counted
    (``images``, ``batches``); ``info`` is free text (loss, val AUROC).

    Args:
        enabled: False gives a display that does nothing (``--quiet``).
        transient: on a terminal, erase the bars at the end instead of leaving the finished rows (for work whose
            caller prints its own summary line, such as an epoch). Plain lines are never taken back.
        console: where to draw (default: stderr); tests pass their own.

    Examples:
        >>> with progress_bar(False) as bar:
        ...     task = bar.add_task("features (train)", total=480, unit="images")
        ...     bar.advance(task, 32)
    """
    global _live
    if not enabled:
        yield _NullProgress()
        return
    c = console or _console
    if not is_live_terminal(c):
        plain = _PlainProgress(plain_interval(), stream=console.file if console is not None else None)
        try:
            yield plain
        finally:
            plain.close()
        return
    with _lock:
        outer = _live if _live is not None and _live.console is c else None
    if outer is not None:  # nested: share the live display
        block = _RichBlock(outer, transient)
        try:
            yield block
        finally:
            block.close()
        return
    live = _new_rich_progress(c)
    block = _RichBlock(live, transient)
    with _lock:
        _live = live
    try:
        with live, _logs_above(c):
            try:
                yield block
            finally:
                block.close()
    finally:
        with _lock:
            _live = None


def track(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None,
          unit: str = "items", transient: bool = False) -> Iterator[T]:
    """Iterate ``items`` with a :func:`progress_bar` task that advances by one per item.

    Examples:
        >>> [x for x in track([1, 2, 3], "reading headers", enabled=False, unit="files")]
        [1, 2, 3]
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(enabled, transient=transient) as bar:
        task = bar.add_task(description, total=total, unit=unit, info="")
        for item in items:
            yield item
            bar.advance(task)
