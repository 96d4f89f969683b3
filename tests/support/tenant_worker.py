"""A machine in a process, driven over stdin, for multi-process lease tests.

Run as ``python -m tests.support.tenant_worker`` with the usual tenantdb environment
(TENANT_ID, FLY_MACHINE_ID, TENANTDB_DATA_DIR, bucket variables). It prints one JSON
object per line: every state change (``{"state": ..., "generation": ..., "owner": ...}``)
and the answer to each command. Commands, one per line on stdin:

    inc N        insert N rows into the counter table (acknowledged with the new count)
    count        print the number of rows
    sync         ship every commit so far to the bucket's log
    checkpoint   ship, then publish a snapshot unless the newest one holds everything
    publish      try a checkpoint and report the result (used after SIGCONT)
    stop         graceful shutdown: final publish and release
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from tenantdb.errors import TenantDBError
from tenantdb.machine.database import TenantDB

MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY, at TEXT DEFAULT CURRENT_TIMESTAMP)"]


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def watch(tdb: TenantDB) -> None:
    last = None
    while True:
        record = tdb.lease.record if tdb._lease else None
        now = (tdb.state, record.generation if record else None)
        if now != last:
            holder = tdb.holder
            emit(
                state=tdb.state,
                generation=now[1],
                owner=holder.owner if holder else None,
            )
            last = now
        await asyncio.sleep(0.02)


async def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    tdb = TenantDB.from_env(migrations=MIGRATIONS)
    try:
        await tdb.start(standby=True)
    except TenantDBError as exc:
        emit(state="failed", error=str(exc), kind=type(exc).__name__)
        return
    watcher = asyncio.create_task(watch(tdb))
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        command, *args = (line.split() or ["stop"]) if line else ["stop"]
        try:
            if command == "inc":
                async with tdb.connection() as db:
                    await db.executemany("INSERT INTO hits DEFAULT VALUES", [()] * int(args[0]))
                    await db.commit()
                emit(ok="inc", count=await count(tdb))
            elif command == "count":
                emit(ok="count", count=await count(tdb))
            elif command == "sync":
                await tdb.sync()
                emit(ok="sync")
            elif command in ("checkpoint", "publish"):
                emit(ok=command, published=await tdb.checkpoint())
            elif command == "stop":
                break
        except TenantDBError as exc:
            emit(error=str(exc), kind=type(exc).__name__)
    await tdb.stop()
    watcher.cancel()
    emit(state="exited")


async def count(tdb: TenantDB) -> int:
    async with tdb.connection() as db, db.execute("SELECT count(*) FROM hits") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    asyncio.run(main())
