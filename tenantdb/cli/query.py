"""``tenantdb query`` and ``tenantdb tenants schema``: read-only SQL across tenants.

Both run on restored copies kept in a local cache (``tenantdb.fleet.query``), never on a
machine's files; ``tenants schema`` (and ``migrate status``) only for the tenants whose
lock.json does not record their schema yet. Rows stream out as tenants finish, the tenant
first; a tenant that fails is reported on stderr and the others still answer (exit 1 at
the end).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from tenantdb.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    TIME_HELP,
    Command,
    err,
    out,
    positive_int,
    print_table,
    tenant_arg,
    time_arg,
)
from tenantdb.cli.status import list_tenants
from tenantdb.config import Settings
from tenantdb.fleet.migrate import read_schemas
from tenantdb.fleet.query import QueryResult, query_tenants
from tenantdb.storage import Bucket, describe_bucket, open_bucket

__all__ = [
    "QUERY_COMMANDS",
    "SchemaSeen",
    "add_tenant_selection",
    "configure_schema",
    "run_query",
    "run_schemas",
]

OutputFormat = Literal["table", "csv", "json"]


def add_tenant_selection(parser: argparse.ArgumentParser, *, cache: bool = True) -> None:
    """TENANT..., --all and --parallel; and --cache-dir for the verbs that keep copies."""
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.add_argument("--all", action="store_true", help="every tenant in the bucket")
    parser.add_argument(
        "--parallel",
        type=positive_int,
        default=4,
        metavar="N",
        help="tenants worked on at once (default: 4)",
    )
    if not cache:
        return
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="where restored copies are kept between runs (default: "
        "$XDG_CACHE_HOME/tenantdb/query/<bucket>, else ~/.cache/...)",
    )


def _configure_query(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run one read-only SQL statement on each tenant's database (as the bucket has it "
        "now, or as of --at) and print its rows with the tenant first. SQLite itself "
        "refuses any write. Copies are cached locally and brought up to date by applying "
        "only the log added since the last run."
    )
    parser.add_argument("sql", metavar="SQL", help="the statement, e.g. 'SELECT count(*) FROM t'")
    add_tenant_selection(parser)
    parser.add_argument(
        "--at", type=time_arg, metavar="TIME", help=f"query the state then: {TIME_HELP}"
    )
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default), csv, or json (one object per row, per line)",
    )
    parser.set_defaults(handler=lambda args: asyncio.run(_query(args)))


def configure_schema(sub: Any) -> None:
    """Add ``tenants schema`` to the ``tenants`` subcommands."""
    parser = sub.add_parser(
        "schema",
        help="show each tenant's schema version (the migrations applied)",
        description="Show each tenant's schema version, the number of migrations applied, "
        "as its lock.json records it (one GET per tenant), else its PRAGMA user_version "
        "read from a restored copy (cached as `tenantdb query` does), and how many "
        "tenants are at each version.",
    )
    add_tenant_selection(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(handler=lambda args: asyncio.run(_schema(args)))


def _cache_dir(settings: Settings, chosen: Path | None) -> Path:
    """The cache of this bucket and prefix: copies of two buckets' tenants never mix."""
    if chosen is not None:
        return chosen
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    which = f"{describe_bucket(settings)}\0{settings.prefix}".encode()
    return base / "tenantdb" / "query" / hashlib.sha256(which).hexdigest()[:16]


async def run_query(
    args: argparse.Namespace,
    sql: str,
    emit: Callable[[QueryResult], None],
    *,
    at: datetime | None = None,
) -> int:
    """Run ``sql`` on the tenants the arguments name, handing each answer to ``emit``."""
    if bool(args.tenants) == bool(args.all):
        err("error: name the tenants to query, or pass --all (not both)")
        return EXIT_FAILURE
    settings = Settings.from_env()
    async with open_bucket(settings, create=False) as bucket:
        tenants = await _selected(args, bucket, settings)
        if not tenants:
            return EXIT_OK
        return await _query_each(args, bucket, settings, tenants, sql, emit, at=at)


@dataclass(frozen=True)
class SchemaSeen:
    """A tenant's schema version, and its hash when lock.json records one."""

    tenant: str
    version: int
    hash: str | None = None


async def run_schemas(args: argparse.Namespace, emit: Callable[[SchemaSeen], None]) -> int:
    """Each named tenant's schema to ``emit``: from lock.json (one GET), else from a
    restored copy for the tenants whose lock.json does not record it yet."""
    if bool(args.tenants) == bool(args.all):
        err("error: name the tenants to query, or pass --all (not both)")
        return EXIT_FAILURE
    settings = Settings.from_env()
    code, unrecorded = EXIT_OK, []
    async with open_bucket(settings, create=False) as bucket:
        tenants = await _selected(args, bucket, settings)
        async for seen in read_schemas(
            bucket, tenants, prefix=settings.prefix, parallel=args.parallel
        ):
            if seen.error is not None:
                err(f"error: tenant {seen.tenant}: {seen.error}")
                code = EXIT_FAILURE
            elif seen.schema is None:
                unrecorded.append(seen.tenant)
            else:
                emit(SchemaSeen(seen.tenant, seen.schema.version, seen.schema.hash))

        def from_copy(result: QueryResult) -> None:
            emit(SchemaSeen(result.tenant, int(result.rows[0][0])))

        if unrecorded:
            query = _query_each(
                args, bucket, settings, unrecorded, "PRAGMA user_version", from_copy
            )
            code = max(code, await query)
    return code


async def _selected(args: argparse.Namespace, bucket: Bucket, settings: Settings) -> list[str]:
    """The tenants the arguments name, or every tenant in the bucket (said when none)."""
    tenants: list[str] = args.tenants or await list_tenants(bucket, settings.prefix)
    if not tenants:
        err(f"no tenants under {settings.prefix!r} in the {describe_bucket(settings)}")
    return tenants


async def _query_each(
    args: argparse.Namespace,
    bucket: Bucket,
    settings: Settings,
    tenants: Sequence[str],
    sql: str,
    emit: Callable[[QueryResult], None],
    *,
    at: datetime | None = None,
) -> int:
    code = EXIT_OK
    results = query_tenants(
        bucket,
        tenants,
        sql,
        prefix=settings.prefix,
        cache_dir=_cache_dir(settings, args.cache_dir),
        at=at,
        parallel=args.parallel,
    )
    async for result in results:
        if result.error is not None:
            err(f"error: tenant {result.tenant}: {result.error}")
            code = EXIT_FAILURE
            continue
        if result.truncated:
            err(f"warning: tenant {result.tenant}: only its first {len(result.rows)} rows")
        emit(result)
    return code


def _cell(value: Any) -> Any:
    """A value for CSV and JSON: blobs as hex."""
    return value.hex() if isinstance(value, bytes) else value


async def _query(args: argparse.Namespace) -> int:
    fmt: OutputFormat = args.format
    header: list[tuple[str, ...]] = []
    table: list[tuple[str, ...]] = []

    def emit(result: QueryResult) -> None:
        if not header:
            header.append(("tenant", *result.columns))
            if fmt == "csv":
                _csv_line(header[0])
        if fmt == "json":
            for row in result.rows:
                fields = dict(zip(result.columns, map(_cell, row), strict=True))
                out(json.dumps({"tenant": result.tenant, **fields}, default=str))
        elif fmt == "csv":
            for row in result.rows:
                _csv_line((result.tenant, *map(_cell, row)))
        else:
            table.extend(
                (result.tenant, *("NULL" if v is None else str(_cell(v)) for v in row))
                for row in result.rows
            )

    code = await run_query(args, args.sql, emit, at=args.at)
    if fmt == "table" and header:
        # Tenants finish in any order: the table is sorted by tenant (stable within one).
        print_table([header[0], *sorted(table, key=lambda row: row[0])])
    return code


def _csv_line(cells: Sequence[Any]) -> None:
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(cells)
    out(line.getvalue())


async def _schema(args: argparse.Namespace) -> int:
    versions: dict[str, int] = {}

    def emit(seen: SchemaSeen) -> None:
        versions[seen.tenant] = seen.version

    code = await run_schemas(args, emit)
    counts = Counter(versions.values())
    if args.json:
        summary = {str(v): n for v, n in sorted(counts.items())}
        out(json.dumps({"tenants": dict(sorted(versions.items())), "versions": summary}, indent=2))
        return code
    if versions:
        print_table([("TENANT", "VERSION"), *((t, str(v)) for t, v in sorted(versions.items()))])
        summary_text = ", ".join(f"{n} at version {v}" for v, n in sorted(counts.items()))
        err(f"{len(versions)} tenant(s): {summary_text}")
    return code


QUERY_COMMANDS: dict[str, Command] = {
    "query": Command(
        help="run a read-only SQL statement on every tenant's database",
        configure=_configure_query,
    ),
}
