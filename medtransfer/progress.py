"""Progress bars (rich) for long work, on stderr, switched off with ``progress=False`` / ``--quiet``.

Library functions take ``progress: bool`` and use these helpers; they never print results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


class _NullProgress:
    """Stand-in with the same methods as rich's Progress that does nothing."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None

    def advance(self, *args: object, **kwargs: object) -> None:
        return None

    def remove_task(self, *args: object, **kwargs: object) -> None:
        return None


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | _NullProgress]:
    """A rich Progress with ETA and a free-text ``info`` field (loss, val AUROC), or a no-op."""
    if not enabled:
        yield _NullProgress()
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console,
        transient=False,
    )
    with bar:
        yield bar
