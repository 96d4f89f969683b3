"""The app's schema migrations, applied by ``PRAGMA user_version`` when a holder opens."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from tenantdb.errors import ConfigurationError
from tenantdb.protocol.lockfile import SchemaVersion
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

__all__ = ["Migration", "apply_migrations", "schema_of"]

Migration = str | Callable[[sqlite3.Connection], None]


def schema_of(migrations: Sequence[Migration]) -> SchemaVersion:
    """The schema a database has once ``migrations`` ran: their count and their hash.

    A script is hashed by its text, a callable by its module-qualified name (its code may
    change without its effect changing); each item is length-prefixed, so no two lists
    hash alike by shifting text between items.
    """
    digest = hashlib.sha256()
    for migration in migrations:
        if isinstance(migration, str):
            item = b"sql:" + migration.encode("utf-8", "surrogatepass")
        else:
            # A partial or a callable object has no __qualname__ of its own: its type's.
            module = getattr(migration, "__module__", None) or type(migration).__module__
            qualname = getattr(migration, "__qualname__", None) or type(migration).__qualname__
            item = f"python:{module}.{qualname}".encode("utf-8", "surrogatepass")
        digest.update(len(item).to_bytes(8, "big") + item)
    return SchemaVersion(len(migrations), digest.hexdigest()[:16])


def apply_migrations(path: Path, migrations: Sequence[Migration]) -> int:
    """Bring ``path`` up to ``len(migrations)`` by ``PRAGMA user_version``; return how many ran.

    Each migration runs in its own transaction together with the version bump.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # In WAL mode a migration cut short by a crash leaves no hot rollback journal, and
        # only the log shipper may checkpoint its frames.
        for pragma in CONNECTION_PRAGMAS:
            conn.execute(pragma)
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(migrations):
            advice = (
                "no migrations were given: pass the app's list, as in "
                "TenantDBMiddleware(app, migrations=MIGRATIONS) or "
                "TenantDB.from_env(migrations=MIGRATIONS)"
                if not migrations
                else f"only {len(migrations)} migrations were given: pass the app's whole "
                "list (an older release of the app cannot open a newer database)"
            )
            raise ConfigurationError(f"{path} is at schema version {version}, but {advice}")
        for number, migration in enumerate(migrations[version:], start=version + 1):
            try:
                if isinstance(migration, str):
                    # One script, so executescript() cannot commit half of it.
                    conn.executescript(
                        f"BEGIN IMMEDIATE;\n{migration}\n;PRAGMA user_version = {number:d};COMMIT;"
                    )
                else:
                    conn.execute("BEGIN IMMEDIATE")
                    migration(conn)
                    conn.execute(f"PRAGMA user_version = {number:d}")
                    conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return len(migrations) - version
    finally:
        conn.close()
