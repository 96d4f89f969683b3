"""Progress bars of the ``tenantdb`` command's long transfers, on stderr, on terminals only.

The one module that imports ``rich``. A transfer reports ``(bytes done, bytes total)``
through a plain callback, so the code that downloads knows nothing of terminals; when
stderr is not a terminal (a pipe, a log file, CI) the callback is None and nothing is
drawn, so scripts and logs see no control characters.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["ProgressCallback", "transfer_progress"]

ProgressCallback = Callable[[int, int], None]


@contextmanager
def transfer_progress(description: str) -> Iterator[ProgressCallback | None]:
    """Draw one progress bar on stderr for the block; yield its callback, or None off a tty."""
    if not sys.stderr.isatty():
        yield None
        return
    console = Console(file=sys.stderr)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # transient: the bar goes away when done, leaving the command's own result lines.
    progress = Progress(
        *columns, console=console, transient=True, redirect_stdout=False, redirect_stderr=False
    )
    with progress:
        task = progress.add_task(description, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield report
