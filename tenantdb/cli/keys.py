"""``tenantdb keys``: the tenants' wrapped data keys: check them, re-wrap them after a rotation.

A rotation of the key-encryption key: put the new key first in TENANTDB_ENCRYPTION_KEY
(``new:…,old:…``) on every machine, run ``tenantdb keys rotate`` (each tenant's key object
is rewritten under the new key with If-Match, resumable: a tenant already under it is
skipped), then drop the old key. The data itself is never re-encrypted: only the data keys
are wrapped anew.

Turning encryption on for existing tenants: ``tenantdb keys seal`` republishes each tenant
no machine holds as a fresh, sealed snapshot (under its lease, as a rollback does), so
``tenantdb status`` shows no plaintext left in the history lock.json names.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tenantdb.cli.checks import CheckResult
from tenantdb.cli.common import EXIT_FAILURE, EXIT_OK, Command, err, out, tenant_arg
from tenantdb.cli.status import list_tenants, read_status
from tenantdb.config import Settings
from tenantdb.crypto import Keyring, Refused, rewrap_data_key, unwrap_data_key
from tenantdb.errors import (
    ConfigurationError,
    DataKeyError,
    LeaseHeldError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TenantDBError,
)
from tenantdb.replication.rollback import republish
from tenantdb.storage import Bucket, describe_bucket, open_bucket
from tenantdb.storage.data_keys import KEY_OBJECT, key_object_body, parse_key_object

__all__ = ["KEYS_COMMANDS", "KeyState", "encryption_check", "rotate_key"]

_PARALLEL = 8
# The doctor opens at most this many tenants' keys: enough to catch a wrong or missing key.
_DOCTOR_SAMPLE = 50

Outcome = Literal["rotated", "current", "absent"]


@dataclass(frozen=True)
class KeyState:
    """What one tenant's key object says: wrapped by ``kek_id``, or absent."""

    tenant: str
    kek_id: str | None


def _keyring(settings: Settings) -> Keyring:
    if settings.encryption_keys is None:
        raise ConfigurationError(
            "encryption is off: set TENANTDB_ENCRYPTION_KEY (id:base64,…; the first wraps)",
            variable="TENANTDB_ENCRYPTION_KEY",
        )
    return settings.encryption_keys


async def rotate_key(bucket: Bucket, keyring: Keyring, tenant: str, *, prefix: str) -> Outcome:
    """Re-wrap ``tenant``'s data key under the keyring's first key; what was done."""
    key = f"{prefix}{tenant}/{KEY_OBJECT}"
    for _ in range(3):  # a concurrent rotation's write: read it again and judge that one
        try:
            found = await bucket.get(key, max_size=4096)
        except ObjectNotFoundError:
            return "absent"
        wrapped = parse_key_object(found.body, tenant=tenant, key=key)
        if wrapped.kek_id == keyring.wrapping_id:
            return "current"
        since = wrapped.since or found.info.last_modified.isoformat()
        try:
            rewrapped = rewrap_data_key(keyring, tenant, key, wrapped, since=since)
        except Refused as exc:
            raise DataKeyError(
                f"tenant {tenant}: its data key {key} cannot be unwrapped: {exc.reason}",
                tenant=tenant,
                key=key,
                key_id=wrapped.kek_id,
            ) from None
        try:
            await bucket.put(key, key_object_body(tenant, rewrapped), if_match=found.info.etag)
        except PreconditionFailedError:
            continue
        return "rotated"
    raise DataKeyError(
        f"tenant {tenant}: its data key {key} kept changing during the rotation; run it again",
        tenant=tenant,
        key=key,
    )


def _configure_rotate(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Re-wrap each tenant's data key under the first key of TENANTDB_ENCRYPTION_KEY, one "
        "small object per tenant (If-Match: a concurrent change is read again). Resumable: "
        "tenants already under that key are skipped. Without TENANT, every tenant."
    )
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.set_defaults(handler=lambda args: asyncio.run(_rotate(args.tenants)))


async def _rotate(chosen: Sequence[str]) -> int:
    settings = Settings.from_env()
    keyring, prefix = _keyring(settings), settings.prefix
    async with open_bucket(settings, create=False) as bucket:
        tenants = list(chosen) or await list_tenants(bucket, prefix)
        limit = asyncio.Semaphore(_PARALLEL)
        counts: dict[str, int] = {"rotated": 0, "current": 0, "absent": 0, "failed": 0}

        async def one(tenant: str) -> None:
            async with limit:
                try:
                    outcome = await rotate_key(bucket, keyring, tenant, prefix=prefix)
                except DataKeyError as exc:
                    counts["failed"] += 1
                    err(f"error: {exc}")
                    return
            counts[outcome] += 1
            if outcome == "rotated":
                err(f"tenant {tenant}: data key re-wrapped under key id {keyring.wrapping_id!r}")

        await asyncio.gather(*(one(t) for t in tenants))
    out(
        f"{counts['rotated']} re-wrapped, {counts['current']} already under key id "
        f"{keyring.wrapping_id!r}, {counts['absent']} without a data key, "
        f"{counts['failed']} failed (of {len(tenants)} in the {describe_bucket(settings)})"
    )
    return EXIT_FAILURE if counts["failed"] else EXIT_OK


async def encryption_check(bucket: Bucket, settings: Settings) -> CheckResult:
    """The doctor's check: the tenants' data keys open with the configured keys."""
    keyring = _keyring(settings)
    tenants = await list_tenants(bucket, settings.prefix)
    if settings.tenant and settings.tenant not in tenants:
        tenants.insert(0, settings.tenant)
    sample = tenants[:_DOCTOR_SAMPLE]
    states: list[KeyState] = []
    for tenant in sample:
        key = f"{settings.prefix}{tenant}/{KEY_OBJECT}"
        try:
            found = await bucket.get(key, max_size=4096)
        except ObjectNotFoundError:
            states.append(KeyState(tenant, None))
            continue
        try:
            wrapped = parse_key_object(found.body, tenant=tenant, key=key)
            unwrap_data_key(keyring, tenant, key, wrapped)
        except DataKeyError as exc:
            return CheckResult("encryption", "fail", str(exc), "restore the key object")
        except Refused as exc:
            return CheckResult(
                "encryption",
                "fail",
                f"tenant {tenant}: its data key {key} cannot be unwrapped: {exc.reason}",
                f"put the key with id {wrapped.kek_id!r} in TENANTDB_ENCRYPTION_KEY "
                "(id:base64, the wrapping key first)",
            )
        states.append(KeyState(tenant, wrapped.kek_id))
    older = sorted({s.kek_id for s in states if s.kek_id and s.kek_id != keyring.wrapping_id})
    detail = (
        f"key id {keyring.wrapping_id!r} wraps; the data keys of {len(sample)} of "
        f"{len(tenants)} tenant(s) open"
    )
    if older:
        return CheckResult(
            "encryption",
            "warn",
            f"{detail}; some are still wrapped by key id(s) {', '.join(older)}",
            "run `tenantdb keys rotate` before removing those keys",
        )
    return CheckResult("encryption", "pass", detail)


def _configure_seal(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Turn encryption on for existing tenants now: for each TENANT no machine holds, take "
        "its lease as a rollback does, restore it, publish it as its newest snapshot sealed "
        "under its data key, release. A tenant a machine holds is refused (its next snapshot "
        "is sealed anyway). The older plaintext objects stay restorable until retention "
        "removes them."
    )
    parser.add_argument("tenants", nargs="+", type=tenant_arg, metavar="TENANT")
    parser.set_defaults(handler=lambda args: asyncio.run(_seal(args.tenants)))


async def _seal(tenants: Sequence[str]) -> int:
    settings = Settings.from_env()
    _keyring(settings)
    failed = 0
    async with open_bucket(settings, create=False) as bucket:
        with tempfile.TemporaryDirectory(prefix="tenantdb-seal-") as scratch:
            for tenant in tenants:  # one at a time: each restores a whole database
                try:
                    if await read_status(bucket, tenant, prefix=settings.prefix) is None:
                        raise ConfigurationError("no such tenant (no lock.json in the bucket)")
                    result = await republish(
                        settings, bucket, tenant, "seal", at=None, work_dir=Path(scratch)
                    )
                except LeaseHeldError as exc:
                    failed += 1
                    err(
                        f"error: tenant {tenant}: not sealed: machine {exc.owner} holds the "
                        "lease. Its next snapshot is sealed anyway; to have one sooner, lower "
                        "TENANTDB_CHECKPOINT_INTERVAL or restart the machine, or stop it and "
                        "run this again"
                    )
                    continue
                except TenantDBError as exc:
                    failed += 1
                    err(f"error: tenant {tenant}: not sealed: {exc}")
                    continue
                out(
                    f"tenant {tenant}: sealed snapshot {result.snapshot} published as "
                    f"generation {result.generation}"
                )
    err(
        "older plaintext snapshots and segments stay restorable until retention removes "
        "them (`tenantdb status` counts those lock.json still names)"
    )
    return EXIT_FAILURE if failed else EXIT_OK


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    rotate = sub.add_parser(
        "rotate", help="re-wrap every tenant's data key under the newest key-encryption key"
    )
    _configure_rotate(rotate)
    seal = sub.add_parser(
        "seal", help="publish tenants no machine holds as a fresh snapshot sealed under their key"
    )
    _configure_seal(seal)


KEYS_COMMANDS: dict[str, Command] = {
    "keys": Command(
        help="encryption at rest: re-wrap the tenants' data keys (rotate), seal tenants (seal)",
        configure=_configure_keys,
    ),
}
