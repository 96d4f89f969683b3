"""The processes a test run started, found through /proc: what Ctrl-C must not leave behind.

Servers of the tests run in their own sessions (moto, the dev clusters' machines), so a Ctrl-C
in the terminal does not reach them; and a test process that dies without its teardown (an
xdist worker killed by its controller) orphans them. ``descendants`` finds them all by parent
id, wherever they sit in the tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["descendants", "direct_children", "kill_descendants", "parent_of"]

_PROC = Path("/proc")


def parent_of(pid: int) -> int | None:
    """The parent id of ``pid``, or None if it is gone (or /proc cannot say)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: the fields follow its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1])


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid``, children before grandchildren."""
    if not _PROC.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            parent = parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(0), [])
        found += below
        pending += below
    return found


def kill_descendants(sig: int = signal.SIGKILL, *, spare: frozenset[int] = frozenset()) -> None:
    """Send ``sig`` to every process below this one, except those in ``spare``."""
    for pid in descendants(os.getpid()):
        if pid in spare:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def direct_children() -> list[int]:
    """The living children of this process."""
    me = os.getpid()
    return [pid for pid in descendants(me) if parent_of(pid) == me]
