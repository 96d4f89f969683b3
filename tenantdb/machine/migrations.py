"""The app's schema migrations, applied by ``PRAGMA user_version`` when a holder opens."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from tenantdb.errors import ConfigurationError
from tenantdb.replication.shipper import CONNECTION_PRAGMAS

__all__ = ["Migration", "apply_migrations"]

Migration = str | Callable[[sqlite3.Connection], None]


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
