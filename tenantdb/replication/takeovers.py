"""Takeover records: ``history/<generation>.json``, written by each holder as it takes the lease.

A holder writes its record (``If-None-Match: *``) right after it acquires the lease and
before it uploads anything: the log tail and the snapshot of the lock it took over. The
history (``history.py``) reads them to tell published objects from a fenced holder's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

from tenantdb import clock
from tenantdb.errors import ObjectTooLargeError, PreconditionFailedError, ReplicationError
from tenantdb.parsing import Malformed, bounded_int, bounded_text, load_json, parse_iso_time
from tenantdb.protocol.lease import Lease
from tenantdb.protocol.lockfile import LOCK_MAX_BYTES

__all__ = ["Takeover", "record_takeover", "takeover_key"]

log = logging.getLogger("tenantdb.replication")

# Generations a holder moves past when their takeover keys hold records it did not write.
_TAKEOVER_ATTEMPTS = 3


def takeover_key(prefix: str, tenant: str, generation: int) -> str:
    """The key of the takeover record of ``generation``."""
    return f"{prefix}{tenant}/history/{generation:08d}.json"


@dataclass(frozen=True)
class Takeover:
    """One acquisition of the lease: who took it, when, and where the log stood then."""

    generation: int
    owner: str | None
    region: str | None
    at: datetime
    # The log tail and snapshot key of the lock.json this generation took over.
    tail: int
    snapshot: str | None
    claim: str | None = None
    # A generation this holder held first and left unused, because a record it did not
    # write already sat at that generation's key: that record is to be ignored.
    replaces: int | None = None

    def to_json(self) -> bytes:
        """Serialize for the bucket."""
        fields = {
            "generation": self.generation,
            "owner": self.owner,
            "region": self.region,
            "at": self.at.isoformat(timespec="milliseconds"),
            "tail": self.tail,
            "snapshot": self.snapshot,
            "claim": self.claim,
        }
        if self.replaces is not None:
            fields["replaces"] = self.replaces
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def parse(cls, body: bytes, *, key: str) -> Takeover:
        """Parse a takeover record; ``ReplicationError`` naming ``key`` if it is not one."""

        def refuse(reason: str) -> ReplicationError:
            return ReplicationError(f"takeover record {key} is unusable: {reason}", key=key)

        try:
            data = load_json(body)
        except Malformed as exc:
            raise refuse(exc.reason) from None
        if not isinstance(data, dict):
            raise refuse("not a JSON object")
        generation = bounded_int(data.get("generation"), 1)
        tail = bounded_int(data.get("tail"), 0)
        at = parse_iso_time(data.get("at"))
        texts = {name: data.get(name) for name in ("owner", "region", "snapshot", "claim")}
        if generation is None or tail is None or at is None:
            raise refuse("its generation, tail or time is missing, of a wrong type or out of range")
        if any(v is not None and bounded_text(v) is None for v in texts.values()):
            raise refuse("owner, region, snapshot and claim must be short printable strings")
        if any(name not in data for name in ("owner", "region", "snapshot")):
            raise refuse("owner, region or snapshot is missing")
        if not key.endswith(takeover_key("", "", generation)):
            raise refuse(f"it says generation {generation}, not the one its key names")
        replaces = data.get("replaces")
        if replaces is not None and bounded_int(replaces, 1, generation - 1) is None:
            raise refuse("field 'replaces' is not an earlier generation")
        return cls(
            generation=generation,
            owner=texts["owner"],
            region=texts["region"],
            at=at,
            tail=tail,
            snapshot=texts["snapshot"],
            claim=texts["claim"],
            replaces=replaces,
        )


async def record_takeover(lease: Lease) -> Takeover:
    """Write the takeover record of the generation ``lease`` holds; before any upload of it.

    Idempotent for its holder: a record of this generation with this holder's claim (an
    earlier attempt whose answer was lost) is accepted as it is. A record this holder did
    not write (damaged or forged: only one holder ever has a generation) cannot be
    replaced, as no object is overwritten: the lease moves on to the next generation,
    whose record says it ``replaces`` the one left unused, so that readers ignore the
    foreign record. Refused after a few such moves (``ReplicationError``).
    """
    replaces: int | None = None
    for _ in range(_TAKEOVER_ATTEMPTS):
        record = lease.record
        if record is None or lease.status != "held":
            raise ReplicationError(f"tenant {lease.tenant}: no lease held to record")
        previous = lease.previous
        takeover = Takeover(
            generation=record.generation,
            owner=record.owner,
            region=record.region,
            at=clock.now(),
            tail=previous.log.tail if previous and previous.log else 0,
            snapshot=previous.snapshot.key if previous and previous.snapshot else None,
            claim=record.claim,
            replaces=replaces,
        )
        key = takeover_key(lease.prefix, lease.tenant, record.generation)
        try:
            await lease.bucket.put(key, takeover.to_json(), if_none_match="*")
            return takeover
        except PreconditionFailedError:
            pass
        try:
            existing: Takeover | str = Takeover.parse(
                (await lease.bucket.get(key, max_size=LOCK_MAX_BYTES)).body, key=key
            )
        except (ReplicationError, ObjectTooLargeError) as exc:
            existing = str(exc)
        if isinstance(existing, Takeover) and (existing.claim, existing.tail) == (
            takeover.claim,
            takeover.tail,
        ):
            return existing
        log.error(
            "tenant %s: %s exists and was not written by this holder (%s); leaving "
            "generation %d unused and moving the lease to the next one",
            lease.tenant,
            key,
            "unreadable" if isinstance(existing, str) else "another claim or tail",
            record.generation,
        )
        await lease.advance()
        replaces = record.generation
    raise ReplicationError(
        f"tenant {lease.tenant}: takeover records not written by this holder sit at "
        f"{_TAKEOVER_ATTEMPTS} generations in a row; remove them from "
        f"{takeover_key(lease.prefix, lease.tenant, 1).rsplit('/', 1)[0]}/",
        key=key,
    )
