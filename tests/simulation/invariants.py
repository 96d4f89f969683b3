"""The simulation's invariants: each a named function that raises ``InvariantViolated``."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tenantdb.errors import (
    ListingBehindError,
    ObjectNotFoundError,
    PointInTimeError,
    ReplicationError,
    TenantDBError,
)
from tenantdb.machine.supervisor import Health
from tenantdb.protocol.lockfile import LockRecord
from tenantdb.replication.checksum import format_state
from tenantdb.replication.packs import decode_pack
from tenantdb.replication.segment import SEGMENT_MAX_BYTES, chunk_key, parse_chunk_key, segment_key
from tests.simulation.bucket import LandedWrite

__all__ = [
    "INVARIANTS",
    "InvariantViolated",
    "LockVersion",
    "acknowledged_writes_survive",
    "lock_versions",
    "nothing_overwritten",
    "one_live_lease_at_a_time",
    "one_machine_serves_at_a_time",
    "only_holders_publish",
    "restore_failure_is_named",
    "restore_matches_model",
    "serving_has_its_loops",
    "standby_copies_are_published_states",
    "work_stays_bounded",
]

INVARIANTS = (
    "acknowledged_writes_survive",
    "restore_matches_model",
    "one_live_lease_at_a_time",
    "one_machine_serves_at_a_time",
    "only_holders_publish",
    "serving_has_its_loops",
    "published_objects_present",
    "standby_copies_are_published_states",
    "work_stays_bounded",
)
# (6) The bounds on each machine's work (docs/guarantees.md says why these numbers). A
# holder publishes at most once per 50 ms sync interval or per group of client writes,
# renews every TTL/3, a standby polls every 50 ms, each request retried at most 6 times,
# and a collection deletes one object a request: the busiest machine of seeds 1-700 made
# 145 attempts in a simulated second. A standby that polls without waiting makes ~440.
REQUESTS_PER_SECOND = 300
# Loop callbacks of one machine in a simulated second; the busiest of seeds 1-700 ran 1055.
# A loop that polls without waiting runs one every iteration: 20,000 a simulated second.
CALLBACKS_PER_SECOND = 5000
# The most one answer hands a machine in memory: a log object's cap (snapshots go to
# files). Each read whole must ask for a cap the reader knows, never trust the object.
BODY_BYTES = SEGMENT_MAX_BYTES
# The longest one callback of a machine may hold the event loop, in seconds of CPU time
# (a thread's work aside): the only bound not on the virtual clock, so generous (seen:
# up to 150 ms, 250 ms for the first run in a process, which imports modules).
BLOCKED_SECONDS = 1.0
# A lock.json write lands a little after the standby judged the old lease expired; the
# bucket's clock and this one are the same clock here, so only scheduling jitter is allowed.
_ORDER_SLACK = 0.05
_SEGMENT_GENERATION = re.compile(r"/log/(\d{8})/")
# How restore.py and pitr.py name a segment they need and cannot find.
_MISSING_SEGMENT = re.compile(r"\bsegment \S+ .*?\bis missing\b")
_SNAPSHOT_GENERATION = re.compile(r"/(\d{1,12})-\d{1,12}-[^/]*\.sqlite3$")


class InvariantViolated(AssertionError):
    """An invariant does not hold: which one, and what was seen."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")


def acknowledged_writes_survive(acked: Iterable[str], found: set[str], where: str) -> None:
    """(1) Every write acknowledged (its ``sync()`` returned) is in ``found``, the tokens of
    a later holder's database or of a restore."""
    missing = sorted(set(acked) - found)
    if missing:
        raise InvariantViolated(
            "acknowledged_writes_survive",
            f"{where} lacks {len(missing)} acknowledged write(s): {_short(missing)}",
        )


def restore_matches_model(
    required: set[str], forbidden: set[str], found: set[str], where: str
) -> None:
    """(2) A restore as of T holds every write acknowledged by T, and none begun after T."""
    missing = sorted(required - found)
    if missing:
        raise InvariantViolated(
            "restore_matches_model",
            f"{where} is older than its moment: it lacks {len(missing)} write(s) "
            f"acknowledged by then: {_short(missing)}",
        )
    extra = sorted(forbidden & found)
    if extra:
        raise InvariantViolated(
            "restore_matches_model", f"{where} holds writes begun after its moment: {_short(extra)}"
        )


def restore_failure_is_named(exc: BaseException, where: str, *, collectable: bool) -> str:
    """(2) A restore that fails does so with a TenantDBError naming a key or an index, or
    refuses a moment outside the history (before its start, or one the bucket's clock has
    not reached); the kind of failure. (5) It never finds an object it needs missing,
    unless its moment is older than the retention (``collectable``): garbage collection
    is the only deleter, and it keeps what every restore within the retention reads."""
    missing = isinstance(exc, (ObjectNotFoundError, ListingBehindError)) or (
        isinstance(exc, TenantDBError) and _MISSING_SEGMENT.search(str(exc))
    )
    if missing and collectable:
        return "refused_collected"
    if missing:
        raise InvariantViolated(
            "published_objects_present", f"{where} needs an object the bucket lacks: {exc}"
        ) from exc
    if isinstance(exc, PointInTimeError):
        if "future" in str(exc):
            return "refused_future"
        if exc.earliest is None or exc.at < exc.earliest:
            return "refused_before_history"
    if isinstance(exc, TenantDBError):
        text = str(exc)
        if getattr(exc, "key", "") or "/" in text or "index" in text or "segment" in text:
            return "failed_named"
    raise InvariantViolated(
        "restore_matches_model",
        f"{where} failed without naming a key or index: {type(exc).__name__}: {exc}",
    ) from exc


@dataclass(frozen=True)
class LockVersion:
    """One landed write of lock.json: who it names as holder, and when it landed."""

    client: str
    owner: str | None
    claim: str | None
    generation: int
    ttl: float
    at: datetime
    # Where its log stood: the tail and the state after it (None: no log).
    position: tuple[int, str] | None = None


def lock_versions(landed: Iterable[LandedWrite], key: str) -> list[LockVersion]:
    """The versions of lock.json in landing order (deletes and unparsable bodies skipped)."""
    versions = []
    for write in landed:
        if write.key != key or write.body is None:
            continue
        try:
            data = json.loads(write.body)
            log = data.get("log")
            versions.append(
                LockVersion(
                    write.client,
                    data["owner"],
                    data.get("claim"),
                    int(data["generation"]),
                    float(data["ttl_seconds"]),
                    write.at,
                    _position(log, data.get("snapshot")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return versions


def _position(log: dict[str, Any] | None, snapshot: object) -> tuple[int, str] | None:
    """Where a landed lock.json's log stood: its tail and the state after it. With no log
    and no snapshot (a new tenant's first lock), the empty database at tail 0."""
    if log:
        return int(log["tail"]), str(log["state"])
    return (0, format_state(0)) if snapshot is None else None


def standby_copies_are_published_states(
    copies: dict[str, tuple[int, str]], versions: Iterable[LockVersion]
) -> None:
    """(1) Every standby's copy that its follower vouches for is exactly a state the log
    had: the state some landed lock.json recorded after the same tail (a copy may lag, it
    may never hold what was not published)."""
    published = {v.position for v in versions if v.position is not None}
    for machine, position in sorted(copies.items()):
        if position not in published:
            tail, state = position
            raise InvariantViolated(
                "standby_copies_are_published_states",
                f"{machine}'s standby copy is at tail {tail} in state {state}, which no "
                "published lock.json recorded",
            )


def one_live_lease_at_a_time(versions: list[LockVersion]) -> None:
    """(3) lock.json never names a new holder while the previous holder's lease is live on
    the bucket's clock (a release, owner None, ends it at once)."""
    for before, after in itertools.pairwise(versions):
        if before.owner is None or (before.owner, before.claim) == (after.owner, after.claim):
            continue
        if after.owner is None and after.client == before.owner:
            continue  # the holder's own release
        held_for = (after.at - before.at).total_seconds()
        if held_for < before.ttl - _ORDER_SLACK:
            raise InvariantViolated(
                "one_live_lease_at_a_time",
                f"{after.client} wrote lock.json naming {after.owner} (generation "
                f"{after.generation}) {held_for:.2f}s after {before.owner}'s lease of "
                f"{before.ttl:g}s was renewed (generation {before.generation})",
            )


def only_holders_publish(
    record: LockRecord,
    writers: Mapping[str, LandedWrite],
    holders: Mapping[int, str],
    carried: Mapping[str, bytes],
    prefix: str,
) -> None:
    """(3) Every object the published lock.json names was written by the machine that held
    the generation in its key, or is, byte for byte, a segment an earlier lock.json carried
    inline (a later holder uploads those). ``writers``: key -> its last landed write;
    ``holders``: generation -> owner; ``carried``: key -> the bytes lock.json carried."""
    keys: list[tuple[str, int]] = []
    if (log := record.log) is not None:
        # A segment lock.json carries inline is published by lock.json itself, whatever
        # sits at its key (its upload may still be under way, or refused).
        keys += [
            (chunk_key(prefix, record.tenant, c), c.generation)
            for c in log.chunks()
            if c.merged or log.inline_segment(c.first) is None
        ]
    if record.snapshot is not None and (m := _SNAPSHOT_GENERATION.search(record.snapshot.key)):
        keys.append((record.snapshot.key, int(m[1])))
    for key, generation in keys:
        landed = writers.get(key)
        if landed is None:
            continue  # collected, or never uploaded (then a restore names it)
        if landed.client == holders.get(generation):
            continue
        if landed.body is not None and carried.get(key) == landed.body:
            continue
        if landed.body is not None and _carried_pack(key, landed.body, carried, prefix, record):
            continue
        raise InvariantViolated(
            "only_holders_publish",
            f"lock.json (generation {record.generation}) names {key}, written by "
            f"{landed.client}, but generation {generation} was held by "
            f"{holders.get(generation)} and no lock.json carried these bytes",
        )


def _carried_pack(
    key: str, body: bytes, carried: Mapping[str, bytes], prefix: str, record: LockRecord
) -> bool:
    """Whether ``body`` at ``key`` is a pack of segments that lock.json carried, each byte
    for byte (a later holder packs what the lock it took over carried)."""
    chunk = parse_chunk_key(key)
    if chunk is None or chunk.pack is None:
        return False
    try:
        bodies = decode_pack(
            body, key=key, tenant=record.tenant, first=chunk.first, last=chunk.last
        )
    except ReplicationError:
        return False
    return all(
        carried.get(segment_key(prefix, record.tenant, chunk.generation, index)) == segment
        for index, segment in enumerate(bodies, chunk.first)
    )


def nothing_overwritten(overwrites: Sequence[str]) -> None:
    """(5) No machine replaces an object unless it names the version it replaces (If-Match:
    ``lock.json``'s CAS, a key object's rewrap): a published object is never overwritten.
    ``overwrites``: "machine operation key" of each write that replaced one without."""
    if overwrites:
        raise InvariantViolated(
            "published_objects_present",
            f"an object was overwritten without If-Match: {overwrites[0]}",
        )


def serving_has_its_loops(machines: Mapping[str, tuple[str, Health]]) -> None:
    """(4) A machine in state ``serving`` has every task that state needs running."""
    for name, (state, health) in machines.items():
        if state != "serving":
            continue
        dead = [r for r in health.reasons if "task is not running" in r]
        if dead:
            raise InvariantViolated("serving_has_its_loops", f"{name} serves, but {dead}")


def _short(tokens: list[str]) -> list[str]:
    """The first few tokens, each cut to its name (large ones carry padding)."""
    return [token[:24] for token in tokens[:5]]


def one_machine_serves_at_a_time(overlap: tuple[float, list[str]] | None) -> None:
    """(3) No two machines ever serve at once, each judging its lease on its own clock:
    the one whose lease the other took over would serve stale reads and take writes."""
    if overlap is not None:
        at, machines = overlap
        raise InvariantViolated(
            "one_machine_serves_at_a_time",
            f"{' and '.join(machines)} both served at +{at:.3f}s",
        )


def work_stays_bounded(
    requests: Mapping[tuple[str, int], int],
    callbacks: Mapping[tuple[str, int], int],
    bodies: Mapping[str, int],
    uncapped: Mapping[str, str],
    longest: tuple[float, str],
) -> None:
    """(6) No machine makes more than REQUESTS_PER_SECOND bucket attempts or runs more
    than CALLBACKS_PER_SECOND loop callbacks in a simulated second, reads an object whole
    without a size cap or gets more than BODY_BYTES from one answer, or holds the loop
    longer than BLOCKED_SECONDS. ``requests`` and ``callbacks``: counts by (machine,
    simulated second); ``uncapped``: machine -> a key it read whole with no cap."""
    if uncapped:
        machine, key = min(uncapped.items())
        raise InvariantViolated(
            "work_stays_bounded",
            f"{machine} read {key} whole with no size cap: its memory is the object's to set",
        )
    for what, counts, bound in (
        ("bucket attempts", requests, REQUESTS_PER_SECOND),
        ("loop callbacks", callbacks, CALLBACKS_PER_SECOND),
    ):
        for (machine, second), count in counts.items():
            if count > bound:
                raise InvariantViolated(
                    "work_stays_bounded",
                    f"{machine} made {count} {what} in simulated second {second} (bound {bound})",
                )
    for machine, size in bodies.items():
        if size > BODY_BYTES:
            raise InvariantViolated(
                "work_stays_bounded",
                f"{machine} got a {size}-byte body in memory (bound {BODY_BYTES})",
            )
    took, callback = longest
    if took > BLOCKED_SECONDS:
        raise InvariantViolated(
            "work_stays_bounded",
            f"a callback held the event loop {took:.3f}s (bound {BLOCKED_SECONDS:g}s): {callback}",
        )
