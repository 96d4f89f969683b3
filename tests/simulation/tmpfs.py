"""A real full disk: each machine's data directory on a small tmpfs of its own.

With ``TENANTDB_SIM_REAL_DISK_FULL=1``, ``python -m tests.simulation`` first moves its
process into a user and mount namespace of its own (Linux, no privileges needed where
unprivileged user namespaces are allowed), where it may mount. Each machine's data
directory is then a tmpfs of ``DISK_BYTES``, and a ``disk_full`` step fills it with a
ballast file: SQLite's WAL appends and tenantdb's file writes meet ENOSPC from the
filesystem itself, not SQLite's page limit. A tmpfs counts whole pages, so the same
files leave the same room: runs stay deterministic.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

__all__ = ["DISK_BYTES", "enter_namespace", "fill", "mount_disk", "unmount_disk"]

DISK_BYTES = 32 << 20  # a machine's disk: its database, WAL and snapshot copies fit
_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_MS_REC, _MS_PRIVATE = 1 << 14, 1 << 18
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def enter_namespace() -> None:
    """Make this (single-threaded) process root of a user and mount namespace of its own,
    its mounts private to it; OSError where the kernel does not allow it."""
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")


def mount_disk(path: Path) -> None:
    """Mount a tmpfs of DISK_BYTES at ``path`` (created)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={DISK_BYTES}".encode()
    _check(_libc.mount(b"tmpfs", bytes(path), b"tmpfs", 0, options), f"mount {path}")


def unmount_disk(path: Path) -> None:
    """Unmount the tmpfs at ``path`` (its files go with it)."""
    _check(_libc.umount2(bytes(path), _MNT_DETACH), f"umount {path}")


def fill(path: Path) -> Path:
    """Fill the filesystem of ``path`` to the last byte with a ballast file; its path."""
    ballast = path / "ballast"
    stat = os.statvfs(path)
    with open(ballast, "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize))
    return ballast
