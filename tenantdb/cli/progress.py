"""Progress bars of the ``tenantdb`` command's long jobs, on stderr, on terminals only.

The one module that imports ``rich``. A transfer reports ``(bytes done, bytes total)``,
a job over many tenants ``(tenants done, tenants)``, through a plain callback, so the code
that does the work knows nothing of terminals; when
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
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["ProgressCallback", "count_progress", "transfer_progress"]

ProgressCallback = Callable[[int, int], None]


@contextmanager
def transfer_progress(description: str) -> Iterator[ProgressCallback | None]:
    """Draw one progress bar on stderr for the block; yield its callback, or None off a tty."""
    columns = (DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with _bar(description, columns) as report:
        yield report


@contextmanager
def count_progress(description: str) -> Iterator[ProgressCallback | None]:
    """``transfer_progress`` for a count of items (tenants), not bytes.

    Lines printed meanwhile go above the bar: messages always, result lines when stdout is
    the terminal too (into a pipe or a file they go straight on).
    """
    columns = (MofNCompleteColumn(), TimeRemainingColumn())
    with _bar(description, columns, lines_above=True) as report:
        yield report


@contextmanager
def _bar(
    description: str, columns: tuple[ProgressColumn, ...], *, lines_above: bool = False
) -> Iterator[ProgressCallback | None]:
    if not sys.stderr.isatty():
        yield None
        return
    console = Console(file=sys.stderr)
    # transient: the bar goes away when done, leaving the command's own result lines.
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        *columns,
        console=console,
        transient=True,
        redirect_stdout=lines_above and sys.stdout.isatty(),
        redirect_stderr=lines_above,
    )
    with progress:
        task = progress.add_task(description, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total or None)

        yield report
