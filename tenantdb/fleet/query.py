"""Query every tenant: one read-only SQL statement on each tenant's restored copy.

Copies live in a local cache directory, one file per tenant with a small note of what it
holds (snapshot key, log base and tail). A later run brings a copy up to date as a standby
does (``Follower``): a copy whose note says it already has the state lock.json names, in
a file unchanged since, is used as it is (one GET, nothing hashed); otherwise only the log
objects added since are fetched, each checked to chain onto the copy's page hashes,
measured from the file; anything else (a new snapshot, a copy that does not check out) is
restored whole. ``at`` restores each tenant as of a moment into
a scratch file instead.

Read-only is SQLite's: each copy is opened ``mode=ro`` with ``PRAGMA query_only``, so any
statement that would write fails in SQLite itself, whatever its text. Tenants run a few at
a time; a tenant that fails is reported in its result and does not stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tenantdb.errors import LocalDiskError, TenantDBError
from tenantdb.fleet.errors import UnknownTenantError
from tenantdb.localfiles import write_atomically
from tenantdb.protocol.lease import read_lock
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.follower import Follower
from tenantdb.replication.pitr import restore_at
from tenantdb.replication.restore import hash_file
from tenantdb.storage.base import Bucket
from tenantdb.tenants import validate_tenant

__all__ = ["QueryResult", "query_tenants"]

# Rows kept per tenant: a query's result is held in memory before it is printed.
DEFAULT_MAX_ROWS = 10_000
_NOTE_MAX_BYTES = 4096


@dataclass(frozen=True)
class QueryResult:
    """One tenant's answer: its columns and rows, or why there are none."""

    tenant: str
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    error: str | None = None
    # More rows than ``max_rows`` came back: the rest were left out.
    truncated: bool = False


async def query_tenants(
    bucket: Bucket,
    tenants: Sequence[str],
    sql: str,
    *,
    prefix: str,
    cache_dir: Path,
    at: datetime | None = None,
    parallel: int = 4,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> AsyncIterator[QueryResult]:
    """Run ``sql`` read-only on each tenant; yield each result as it is ready."""
    for tenant in tenants:
        validate_tenant(tenant)  # it names a file of the cache
    cache_dir.mkdir(parents=True, exist_ok=True)
    gate = asyncio.Semaphore(parallel)

    async def one(tenant: str) -> QueryResult:
        async with gate:
            try:
                with _copy_of(cache_dir, tenant, at) as (path, scratch):
                    if scratch:
                        await restore_at(bucket, tenant, path, prefix=prefix, at=at)
                    else:
                        await _catch_up(bucket, tenant, path, prefix=prefix)
                    return await asyncio.to_thread(_run, tenant, path, sql, max_rows)
            except (TenantDBError, sqlite3.Error, OSError) as exc:
                return QueryResult(tenant, error=str(exc) or type(exc).__name__)

    with _locked(cache_dir):
        tasks = [asyncio.ensure_future(one(tenant)) for tenant in tenants]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """One query at a time per cache: copies are updated in place."""
    with open(cache_dir / ".lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LocalDiskError(
                f"another tenantdb query is using the cache {cache_dir}", operation="query"
            ) from None
        yield


@contextlib.contextmanager
def _copy_of(cache_dir: Path, tenant: str, at: datetime | None) -> Iterator[tuple[Path, bool]]:
    """The tenant's cached copy, or a scratch file (True) for a moment in the past."""
    if at is None:
        yield cache_dir / f"{tenant}.sqlite3", False
        return
    with tempfile.TemporaryDirectory(prefix=".query-", dir=cache_dir) as scratch:
        yield Path(scratch) / f"{tenant}.sqlite3", True


async def _catch_up(bucket: Bucket, tenant: str, path: Path, *, prefix: str) -> None:
    """Bring the cached copy to what lock.json names now, applying only what it lacks."""
    key = f"{prefix}{tenant}/lock.json"
    observed = await read_lock(bucket, tenant, key)
    if observed is None:
        raise UnknownTenantError(f"no tenant {tenant}: no {key} in the bucket", tenant=tenant)
    record = observed.record
    note_path = path.with_suffix(".json")
    note = _read_note(note_path)
    if note is not None and note.holds(record) and note.describes(path):
        return  # the common warm case: nothing new, and no page of the copy re-hashed
    follower = Follower(bucket, tenant, path, prefix=prefix)
    if note is not None and path.is_file():
        try:
            hashes = await asyncio.to_thread(hash_file, path)
        except (TenantDBError, OSError):
            hashes = None
        if hashes is not None:
            follower.resume(note.snapshot, note.base, note.tail, hashes)
    # Forgotten first: a copy interrupted while being written is restored next time.
    note_path.unlink(missing_ok=True)
    await follower.catch_up(record)
    await asyncio.to_thread(write_atomically, note_path, _Note.of(record, path).encode())


@dataclass(frozen=True)
class _Note:
    """What a cached copy holds (checked when it was written) and the file it was then."""

    snapshot: str | None
    base: int | None
    tail: int
    state: str | None
    # None in a note written before notes named the file (it is then hashed once more).
    size: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, record: LockRecord, path: Path) -> _Note:
        """The note for ``path``, just made exactly what ``record`` names."""
        log, stat = record.log, path.stat()
        return cls(
            snapshot=record.snapshot.key if record.snapshot else None,
            base=log.base if log else None,
            tail=log.tail if log else 0,
            state=log.state if log else None,
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
        )

    def encode(self) -> bytes:
        """The note as written beside the copy."""
        return json.dumps(dataclasses.asdict(self)).encode()

    def holds(self, record: LockRecord) -> bool:
        """Whether the copy already is what ``record`` names: the same state after the
        same tail (a log's state is a digest of the database it describes)."""
        log = record.log
        if log is None:
            snapshot = record.snapshot.key if record.snapshot else None
            return self.state is None and self.snapshot == snapshot
        return (self.tail, self.state) == (log.tail, log.state)

    def describes(self, path: Path) -> bool:
        """Whether ``path`` is still the file the note was written for."""
        try:
            stat = path.stat()
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == (self.size, self.mtime_ns)


def _read_note(path: Path) -> _Note | None:
    """What the cached copy holds, by its note; None if there is none or it is not ours."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_NOTE_MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= _NOTE_MAX_BYTES else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    snapshot, base, tail, state = (data.get(k) for k in ("snapshot", "base", "tail", "state"))
    size, mtime_ns = data.get("size"), data.get("mtime_ns")
    if not (snapshot is None or isinstance(snapshot, str)):
        return None
    if not (state is None or isinstance(state, str)):
        return None
    if not (base is None or type(base) is int):
        return None
    if type(tail) is not int or not all(n is None or type(n) is int for n in (size, mtime_ns)):
        return None
    return _Note(snapshot, base, tail, state, size, mtime_ns)


def _run(tenant: str, path: Path, sql: str, max_rows: int) -> QueryResult:
    """Run ``sql`` on the copy at ``path``, which SQLite itself keeps from being written."""
    # immutable: no -wal or -shm is made beside the copy, and nothing is written to it.
    uri = f"file:{quote(str(path))}?mode=ro&immutable=1"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
        # The one write a read-only database allows is a new file: ATTACH creates one.
        conn.set_authorizer(_authorize)
        cursor = conn.execute(sql)
        columns = tuple(d[0] for d in cursor.description or ())
        rows = cursor.fetchmany(max_rows + 1)
    finally:
        conn.close()
    return QueryResult(tenant, columns, tuple(rows[:max_rows]), truncated=len(rows) > max_rows)


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: str | None) -> int:
    """Refuse ATTACH, DETACH and turning query_only off; reading pragmas stays allowed."""
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() == "query_only" and arg2:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK
