"""The data directory: one process per directory (an flock), and its id, the lease claim."""

from __future__ import annotations

import contextlib
import fcntl
import re
from pathlib import Path
from typing import IO

from tenantdb import clock
from tenantdb.errors import DataDirLockedError, LocalDiskError
from tenantdb.localfiles import write_atomically

__all__ = ["DataDirLock"]

_CLAIM = re.compile(r"[0-9a-f]{32}")


class DataDirLock:
    """An exclusive flock on the data directory: one tenantdb process per directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ``DataDirLockedError`` if another process has it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.directory / ".tenantdb.lock", "ab")  # noqa: SIM115
        except OSError as exc:
            raise LocalDiskError(
                f"data directory {str(self.directory.absolute())!r} cannot be used: "
                f"{exc.filename}: {exc.strerror or exc}; set TENANTDB_DATA_DIR to a "
                "writable directory",
                operation="open",
            ) from exc
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise DataDirLockedError(str(self.directory.resolve())) from None
        self._file = lock_file

    def claim(self) -> str:
        """This directory's id, the lease claim of whichever process holds its lock.

        Holding the lock proves every earlier process of this directory is gone, so a lease
        held under this claim may be taken back at once after a crash.
        """
        path = self.directory / ".tenantdb.id"
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text().strip()
            if _CLAIM.fullmatch(text):
                return text
        value = clock.token_hex(16)
        write_atomically(path, value.encode())
        return value

    def release(self) -> None:
        """Let the next process have the directory."""
        if self._file is not None:
            self._file.close()
            self._file = None
