"""The page hashes of a cleanly closed database file, kept beside it for the next start.

A holder that closes its file with every commit published (an idle stop, any clean stop)
writes the hashes the shipper holds to ``<tenant>.sqlite3.tenantdb-pages``, bound to the
file's identity as ``os.stat`` gives it (device, inode, size, mtime and ctime in ns). The
next start of the tenant takes them (and deletes the file: they serve one start) instead of
hashing every page, which at 256 MiB is most of a wake's time. Anything that does not
match exactly (another process wrote the file, a crash, a damaged or foreign sidecar, a
file moved or copied) means no kept hashes, and the caller hashes the file as before.

The sidecar is local, written by this code, but read as untrusted: a fixed header, the
hashes, and a sha256 of both; its length must be what the database file's size implies.
Layout (little-endian): magic (16 bytes), page size (u32), pages (u32), state (u64), then
st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns (u64 each), 8 bytes per page, sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from pathlib import Path

from tenantdb.errors import ReplicationError
from tenantdb.localfiles import write_atomically
from tenantdb.replication.checksum import PageHashes, check_page_size, format_state

__all__ = ["keep_hashes", "take_kept_hashes"]

log = logging.getLogger("tenantdb")

_MAGIC = b"tenantdb-pages\x00\x01"
_HEADER = struct.Struct("<16sIIQ5Q")
_DIGEST = 32


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.tenantdb-pages")


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when anything writes, replaces or moves the file."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def keep_hashes(path: Path, hashes: PageHashes) -> None:
    """Keep ``hashes`` beside ``path``, which the caller has closed and they describe.

    Nothing is kept (and a sidecar there is removed) if the file has a journal or WAL,
    or its size is not the hashes' pages: then they may not be the file's.
    """
    sidecar = _sidecar(path)
    try:
        sidecar.unlink(missing_ok=True)
        if any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-journal")):
            return
        st = os.stat(path)
        if st.st_size != hashes.db_pages * hashes.page_size:
            return
        header = _HEADER.pack(
            _MAGIC, hashes.page_size, hashes.db_pages, hashes.state, *_identity(st)
        )
        body = header + hashes.hashes_bytes()
        write_atomically(sidecar, body + hashlib.sha256(body).digest())
    except OSError as exc:
        # Only the next start's speed depends on it: it hashes the file instead.
        log.warning("could not keep the page hashes of %s: %s", path, exc)


def take_kept_hashes(path: Path) -> PageHashes | None:
    """The hashes kept beside ``path`` if the file is still exactly what they describe.

    The sidecar is removed either way: the caller is about to open the file, and from
    then on only a new ``keep_hashes`` can vouch for it.
    """
    sidecar = _sidecar(path)
    try:
        return _read(path, sidecar)
    except FileNotFoundError:
        return None
    except (OSError, ReplicationError) as exc:
        log.info("not using the kept page hashes of %s (hashing it instead): %s", path, exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            sidecar.unlink(missing_ok=True)


def _read(path: Path, sidecar: Path) -> PageHashes:
    """Parse ``sidecar`` whole and check it against ``path``; ReplicationError if it differs."""
    st = os.stat(path)
    with open(sidecar, "rb") as f:
        # At most what a sidecar of this file can be: its length is checked below.
        data = f.read(_HEADER.size + st.st_size // 512 * 8 + _DIGEST + 1)
    if len(data) < _HEADER.size + _DIGEST:
        raise ReplicationError(f"{sidecar} is {len(data)} bytes, shorter than its header")
    magic, page_size, db_pages, state, *identity = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise ReplicationError(f"{sidecar} is not a page-hash file of this version")
    if reason := check_page_size(page_size):
        raise ReplicationError(f"{sidecar}: {reason}")
    if len(data) != _HEADER.size + 8 * db_pages + _DIGEST:
        raise ReplicationError(f"{sidecar} is {len(data)} bytes, not that of {db_pages} pages")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ReplicationError(f"{sidecar} does not match its checksum")
    if tuple(identity) != _identity(st):
        raise ReplicationError(f"{path} changed since its page hashes were kept")
    if st.st_size != db_pages * page_size:
        raise ReplicationError(f"{path} is {st.st_size} bytes, not {db_pages} pages")
    hashes = PageHashes.from_hashes_bytes(page_size, body[_HEADER.size :])
    if hashes.state != state:
        raise ReplicationError(
            f"{sidecar}: its hashes make state {format_state(hashes.state)}, "
            f"not {format_state(state)}"
        )
    return hashes
