"""``tenantdb keys``: the tenants' wrapped data keys: check them, re-wrap them after a rotation.

A rotation of the key-encryption key: put the new key first in TENANTDB_ENCRYPTION_KEY
(``new:…,old:…``) on every machine, run ``tenantdb keys rotate`` (each tenant's key object
is rewritten under the new key with If-Match, resumable: a tenant already under it is
skipped), then drop the old key. The data itself is never re-encrypted: only the data keys
are wrapped anew.

Replacing a tenant's data key: ``tenantdb keys rotate --data TENANT`` adds a new data key to
its key object (If-Match), which seals from then on; the older ones keep opening the history
sealed with them until retention removes it. ``--reseal`` also republishes the tenant as a
fresh snapshot under the new key, when no machine holds it.

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
from tenantdb.crypto import Keyring, Refused, unwrap_data_key
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
from tenantdb.storage.data_keys import (
    KEY_OBJECT,
    KEY_OBJECT_MAX,
    key_object_body,
    parse_key_object,
    rewrap_all,
)
from tenantdb.storage.encrypted import EncryptedBucket

__all__ = ["KEYS_COMMANDS", "KeyState", "encryption_check", "rotate_key"]

_PARALLEL = 8
# The doctor opens at most this many tenants' keys: enough to catch a wrong or missing key.
_DOCTOR_SAMPLE = 50

Outcome = Literal["rotated", "current", "absent"]


@dataclass(frozen=True)
class KeyState:
    """What one tenant's key object says: its data keys wrapped by ``kek_ids``; () if absent."""

    tenant: str
    kek_ids: tuple[str, ...]


def _keyring(settings: Settings) -> Keyring:
    if settings.encryption_keys is None:
        raise ConfigurationError(
            "encryption is off: set TENANTDB_ENCRYPTION_KEY (id:base64,…; the first wraps)",
            variable="TENANTDB_ENCRYPTION_KEY",
        )
    return settings.encryption_keys


async def rotate_key(bucket: Bucket, keyring: Keyring, tenant: str, *, prefix: str) -> Outcome:
    """Re-wrap ``tenant``'s data keys under the keyring's first key; what was done."""
    key = f"{prefix}{tenant}/{KEY_OBJECT}"
    for _ in range(3):  # a concurrent rotation's write: read it again and judge that one
        try:
            found = await bucket.get(key, max_size=KEY_OBJECT_MAX)
        except ObjectNotFoundError:
            return "absent"
        wrapped = parse_key_object(found.body, tenant=tenant, key=key)
        if all(one.kek_id == keyring.wrapping_id for one in wrapped):
            return "current"
        since = wrapped[0].since or found.info.last_modified.isoformat()
        rewrapped = rewrap_all(keyring, tenant, key, wrapped, since=since)
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
        "Re-wrap each tenant's data keys under the first key of TENANTDB_ENCRYPTION_KEY, one "
        "small object per tenant (If-Match: a concurrent change is read again). Resumable: "
        "tenants already under that key are skipped. Without TENANT, every tenant. "
        "With --data, replace each named TENANT's data key instead: a new one is added to its "
        "key object and seals everything written from then on (a machine holding the tenant "
        "switches within 5 minutes); the older keys keep opening the history sealed "
        "with them until retention removes it. --reseal also publishes each tenant no "
        "machine holds as a fresh snapshot under its new key: its current state then needs "
        "no older key."
    )
    parser.add_argument("tenants", nargs="*", type=tenant_arg, metavar="TENANT")
    parser.add_argument(
        "--data",
        action="store_true",
        help="replace the named tenants' data keys (not the key-encryption key's wrapping)",
    )
    parser.add_argument(
        "--reseal",
        action="store_true",
        help="with --data: also publish each tenant no machine holds as a fresh snapshot "
        "sealed under its new key (under its lease, as a rollback does)",
    )
    parser.set_defaults(handler=_rotate_command)


def _rotate_command(args: argparse.Namespace) -> int:
    if not args.data:
        if args.reseal:
            err("error: --reseal goes with --data (replacing data keys)")
            return EXIT_FAILURE
        return asyncio.run(_rotate(args.tenants))
    if not args.tenants:
        err("error: --data replaces the data keys of the tenants named: name at least one")
        return EXIT_FAILURE
    return asyncio.run(_replace(args.tenants, reseal=args.reseal))


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
            found = await bucket.get(key, max_size=KEY_OBJECT_MAX)
        except ObjectNotFoundError:
            states.append(KeyState(tenant, ()))
            continue
        try:
            wrapped = parse_key_object(found.body, tenant=tenant, key=key)
        except DataKeyError as exc:
            return CheckResult("encryption", "fail", str(exc), "restore the key object")
        for one in wrapped:
            try:
                unwrap_data_key(keyring, tenant, key, one)
            except Refused as exc:
                return CheckResult(
                    "encryption",
                    "fail",
                    f"tenant {tenant}: its data key {key} cannot be unwrapped: {exc.reason}",
                    f"put the key with id {one.kek_id!r} in TENANTDB_ENCRYPTION_KEY "
                    "(id:base64, the wrapping key first)",
                )
        states.append(KeyState(tenant, tuple(one.kek_id for one in wrapped)))
    older = sorted({k for s in states for k in s.kek_ids if k != keyring.wrapping_id})
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


async def _replace(tenants: Sequence[str], *, reseal: bool) -> int:
    settings = Settings.from_env()
    _keyring(settings)
    failed = 0
    async with open_bucket(settings, create=False) as bucket:
        if not isinstance(bucket, EncryptedBucket):
            raise ConfigurationError("encryption is on but the bucket does not seal")
        with tempfile.TemporaryDirectory(prefix="tenantdb-reseal-") as scratch:
            for tenant in tenants:
                try:
                    replaced = await bucket.keys.replace(tenant)
                except TenantDBError as exc:
                    failed += 1
                    err(f"error: tenant {tenant}: data key not replaced: {exc}")
                    continue
                if replaced.added:
                    out(
                        f"tenant {tenant}: data key {replaced.new} added (replacing data key "
                        f"{replaced.old}); it seals from now on"
                    )
                else:
                    out(
                        f"tenant {tenant}: data key {replaced.new} was added meanwhile "
                        f"(by a concurrent replacement, or this one's write landed unheard); "
                        "none added"
                    )
                if reseal and not await _republish(settings, bucket, tenant, "reseal", scratch):
                    failed += 1
    err(
        "older data keys stay in each key object and open the history sealed with them "
        "until retention removes it; a machine holding a tenant switches to the new key within "
        "5 minutes (at its next snapshot, or its first write 5 minutes after its last check)"
    )
    return EXIT_FAILURE if failed else EXIT_OK


async def _republish(
    settings: Settings, bucket: Bucket, tenant: str, role: Literal["seal", "reseal"], scratch: str
) -> bool:
    """Publish ``tenant`` as a fresh snapshot sealed under its newest data key, under its
    lease (refused, naming the holder, while a machine holds it); whether it was."""
    verb = "sealed" if role == "seal" else "resealed"
    try:
        if await read_status(bucket, tenant, prefix=settings.prefix) is None:
            raise ConfigurationError("no such tenant (no lock.json in the bucket)")
        result = await republish(settings, bucket, tenant, role, at=None, work_dir=Path(scratch))
    except LeaseHeldError as exc:
        err(
            f"error: tenant {tenant}: not {verb}: machine {exc.owner} holds the lease. Its "
            "next snapshot is sealed with the tenant's newest data key anyway; to have one "
            "sooner, lower TENANTDB_CHECKPOINT_INTERVAL or restart the machine, or stop it and "
            "run this again"
        )
        return False
    except TenantDBError as exc:
        err(f"error: tenant {tenant}: not {verb}: {exc}")
        return False
    out(
        f"tenant {tenant}: {verb} snapshot {result.snapshot} published as generation "
        f"{result.generation}"
    )
    return True


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
                if not await _republish(settings, bucket, tenant, "seal", scratch):
                    failed += 1
    err(
        "older plaintext snapshots and segments stay restorable until retention removes "
        "them (`tenantdb status` counts those lock.json still names)"
    )
    return EXIT_FAILURE if failed else EXIT_OK


def _configure_keys(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    rotate = sub.add_parser(
        "rotate",
        help="re-wrap every tenant's data keys under the newest key-encryption key; with "
        "--data, replace the named tenants' data keys",
    )
    _configure_rotate(rotate)
    seal = sub.add_parser(
        "seal", help="publish tenants no machine holds as a fresh snapshot sealed under their key"
    )
    _configure_seal(seal)


KEYS_COMMANDS: dict[str, Command] = {
    "keys": Command(
        help="encryption at rest: re-wrap or replace the tenants' data keys (rotate), seal "
        "tenants (seal)",
        configure=_configure_keys,
    ),
}
