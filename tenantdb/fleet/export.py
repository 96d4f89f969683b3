"""Export a tenant: its database now or at a moment, as a SQLite file or an SQL dump, verified.

Both start from a point-in-time restore (every object's hash, the state chain, page count,
``quick_check``), then run ``PRAGMA integrity_check``. A dump is also replayed into a scratch
database, which must dump to exactly the same statements and carry the same
``user_version`` (the migrations applied), before it is renamed into place: a dump that
would not load back is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from tenantdb.errors import IntegrityCheckError, SnapshotError
from tenantdb.localfiles import fsync_dir
from tenantdb.replication.pitr import Progress, RestoredPoint, restore_at
from tenantdb.storage.base import Bucket
from tenantdb.tenants import validate_tenant

__all__ = ["ExportFormat", "ExportResult", "export_tenant", "integrity_problems"]

ExportFormat = Literal["sqlite", "sql"]


@dataclass(frozen=True)
class ExportResult:
    """What was exported: the moment, the file and its size."""

    tenant: str
    point: RestoredPoint
    path: Path
    format: ExportFormat
    size: int


async def export_tenant(
    bucket: Bucket,
    tenant: str,
    dest: Path,
    *,
    prefix: str,
    at: datetime | None = None,
    format: ExportFormat = "sqlite",
    progress: Progress | None = None,
) -> ExportResult:
    """Write ``tenant``'s database as of ``at`` (None: now) to ``dest``, replacing it.

    ``dest`` changes only once the result is verified; on any error it is left as it was.
    """
    validate_tenant(tenant)
    with tempfile.TemporaryDirectory(prefix=".tenantdb-export-", dir=dest.parent) as scratch:
        copy = Path(scratch) / f"{tenant}.sqlite3"
        point = await restore_at(bucket, tenant, copy, prefix=prefix, at=at, progress=progress)
        if problems := await asyncio.to_thread(integrity_problems, copy):
            raise IntegrityCheckError(tenant=tenant, problems=problems)
        if format == "sql":
            dump = Path(scratch) / f"{tenant}.sql"
            await asyncio.to_thread(_write_dump, copy, dump, Path(scratch) / "replay.sqlite3")
            copy = dump
        os.replace(copy, dest)
        fsync_dir(dest.parent)
    return ExportResult(tenant, point, dest, format, dest.stat().st_size)


def integrity_problems(path: Path) -> list[str]:
    """What ``PRAGMA integrity_check`` finds wrong in ``path`` (empty: nothing)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    return [] if rows == ["ok"] else rows


def _statements(conn: sqlite3.Connection) -> Iterator[str]:
    """The dump of ``conn``: its ``user_version`` (which iterdump leaves out), then iterdump."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    yield f"PRAGMA user_version = {int(version)};"
    yield from conn.iterdump()


def _write_dump(database: Path, dump: Path, scratch: Path) -> None:
    """Dump ``database`` to ``dump``, then check that the dump loads back to the same dump."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        with open(dump, "w", encoding="utf-8") as out:
            for statement in _statements(conn):
                out.write(statement + "\n")
            out.flush()
            os.fsync(out.fileno())
        # Autocommit: the dump's own BEGIN and COMMIT frame it.
        with contextlib.closing(sqlite3.connect(scratch, isolation_level=None)) as replay:
            try:
                _replay(dump, replay)
            except sqlite3.Error as exc:
                raise SnapshotError(
                    f"the SQL dump of {database.name} does not load: {exc}"
                ) from exc
            for position, (wrote, loaded) in enumerate(
                zip(_statements(conn), _statements(replay), strict=False), 1
            ):
                if wrote != loaded:
                    raise SnapshotError(
                        f"the SQL dump of {database.name} loads back differently at statement "
                        f"{position}: refusing it"
                    )
            counts = [sum(1 for _ in _statements(c)) for c in (conn, replay)]
            if counts[0] != counts[1]:
                raise SnapshotError(
                    f"the SQL dump of {database.name} loads back to {counts[1]} statements, "
                    f"not {counts[0]}: refusing it"
                )


def _replay(dump: Path, conn: sqlite3.Connection) -> None:
    """Run the statements of ``dump`` one at a time: never the whole file in memory."""
    pending = ""
    with open(dump, encoding="utf-8") as lines:
        for line in lines:
            pending += line
            if sqlite3.complete_statement(pending):
                conn.execute(pending)
                pending = ""
    if pending.strip():
        raise sqlite3.OperationalError("the dump ends inside a statement")
