"""Making the local file the tenant's newest data before a new holder opens it.

The file next to the database (``<tenant>.sqlite3.tenantdb.json``) records the lease
generation its data belongs to: a machine that held the tenant last may continue from its
own file (it may hold writes a failed final publish never uploaded); any other takes the
standby's warm copy, the local file if it is exactly what the bucket has, or a restore.
Whether a file is what the bucket has is proved by the page hashes a clean close kept
beside it (``kept_hashes``) when they still describe it, else by hashing every page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from tenantdb import clock
from tenantdb.errors import TenantDBError
from tenantdb.localfiles import remove_database, write_atomically
from tenantdb.machine.context import Machine
from tenantdb.machine.kept_hashes import take_kept_hashes
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.protocol.snapshot import file_sha256
from tenantdb.replication.checksum import PageHashes, database_page_size, format_state
from tenantdb.replication.follower import Follower
from tenantdb.replication.restore import restore_database

__all__ = ["DEFAULT_PAGE_SIZE", "local_generation", "mark_generation", "prepare_local_file"]

log = logging.getLogger("tenantdb")

# SQLite's default page size, for a database that has no page yet.
DEFAULT_PAGE_SIZE = 4096


def _state_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.tenantdb.json")


def local_generation(tenant: str, path: Path) -> int | None:
    """The lease generation the data in ``path`` belongs to, if known for certain."""
    state_file = _state_file(path)
    try:
        generation = json.loads(state_file.read_bytes())["generation"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("tenant %s: ignoring unreadable %s: %s", tenant, state_file, exc)
        return None
    return generation if type(generation) is int else None


def mark_generation(path: Path, generation: int) -> None:
    """Record that the data in ``path`` belongs to ``generation`` (0: to no holding of ours)."""
    write_atomically(_state_file(path), json.dumps({"generation": generation}).encode())


async def prepare_local_file(
    machine: Machine, previous: LockRecord | None, follower: Follower | None
) -> PageHashes | None:
    """Make ``machine.path`` hold the tenant's newest data before it is opened.

    ``follower`` is the warm copy of a standby that just took over. Returns the page
    hashes of the file when it is what the bucket has, or None when it is newer (writes a
    failed final publish never shipped): a snapshot is due then.
    """
    path, tenant = machine.path, machine.tenant
    record = machine.lease.record
    held_generation = record.generation if record else None
    generation = await asyncio.to_thread(local_generation, tenant, path)
    exists = path.exists()
    # Taken (and removed) whichever way the file is made ready: only a clean close of
    # the file opened below may vouch for it again.
    kept = await asyncio.to_thread(take_kept_hashes, path) if exists else None
    hashes: PageHashes | None
    # An earlier attempt of this very holding made the file, and may have published from
    # it (its answer lost): a file made anew would not follow the log it published.
    made_in_this_holding = exists and held_generation is not None and generation == held_generation
    if made_in_this_holding or (
        previous is not None
        and exists
        and generation == previous.generation
        and machine.settings.machine_id in (previous.owner, previous.last_owner)
    ):
        # This holding made the file, or nobody acquired since this machine last held the
        # lease: the local file is the newest data, including writes a failed final
        # publish never uploaded.
        log.info("tenant %s: continuing from the local file %s", tenant, path)
        hashes = None
        if previous is not None and previous.released == "idle":
            # An idle stop published everything before it released: the file should be
            # exactly what the bucket has. Checked (by the hashes its close kept, else
            # page by page), so that waking does not upload the whole database as a new
            # snapshot every time.
            hashes = await asyncio.to_thread(_matching_local, path, previous, kept)
    elif previous is None:
        if exists:
            aside = path.with_name(f"{path.name}.orphaned-{int(clock.wall())}")
            log.warning(
                "tenant %s: the bucket has no lock.json but %s exists; moved it to %s",
                tenant,
                path,
                aside,
            )
            for suffix in ("", "-wal", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        await asyncio.to_thread(remove_database, path)
        hashes = PageHashes(DEFAULT_PAGE_SIZE)
        log.info("tenant %s: new tenant, creating its database", tenant)
    elif previous.snapshot is None and previous.log is None:
        await asyncio.to_thread(remove_database, path)
        hashes = PageHashes(DEFAULT_PAGE_SIZE)
        log.info("tenant %s: nothing published yet, starting empty", tenant)
    elif follower is not None and (hashes := await _caught_up(tenant, follower, previous)):
        log.info(
            "tenant %s: took over with the standby's copy (%d log objects applied while "
            "following, %d restore(s))",
            tenant,
            follower.applied,
            follower.restores,
        )
    elif exists and (hashes := await asyncio.to_thread(_matching_local, path, previous, kept)):
        log.info("tenant %s: the local file is what the bucket has", tenant)
    else:
        started = clock.monotonic()
        with machine.metrics.timing("restore"):
            hashes = await restore_database(
                machine.lease.bucket, previous, path, prefix=machine.settings.prefix
            )
        log.info(
            "tenant %s: restored %d pages in %.2fs",
            tenant,
            hashes.db_pages,
            clock.monotonic() - started,
        )
    await asyncio.to_thread(mark_generation, path, held_generation or 0)
    return hashes


async def _caught_up(tenant: str, follower: Follower, previous: LockRecord) -> PageHashes | None:
    """The standby's copy brought to ``previous`` (the segments it lacks), or None.

    Only a copy the follower vouches for is used: its in-memory page hashes are those of
    what it wrote, and they must be what ``previous`` records.
    """
    try:
        await follower.catch_up(previous)
    except TenantDBError as exc:
        log.warning("tenant %s: the standby's copy cannot be used: %s", tenant, exc)
        return None
    return follower.hashes(previous)


def _matching_local(path: Path, previous: LockRecord, kept: PageHashes | None) -> PageHashes | None:
    """The page hashes of ``path`` if it is exactly what ``previous`` points at.

    ``kept`` are the hashes a clean close kept for the file as it still is: they spare
    reading it when they are ``previous``'s state; else every page is hashed.
    """
    if any(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-journal")):
        return None
    if previous.log is not None:
        wanted = (previous.log.state, previous.log.db_pages)
        if kept is not None and (format_state(kept.state), kept.db_pages) == wanted:
            return kept
        hashes = PageHashes.of_file(path, database_page_size(path))
        return hashes if (format_state(hashes.state), hashes.db_pages) == wanted else None
    hashes = PageHashes.of_file(path, database_page_size(path))
    snapshot = previous.snapshot
    return hashes if snapshot and file_sha256(path) == snapshot.sha256 else None
