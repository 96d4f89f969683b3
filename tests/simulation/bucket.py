"""The simulated bucket: S3's conditional-write semantics in memory, with seeded faults.

One ``SimBucket`` holds the objects; each machine talks to it through its own
``BucketView`` (the Bucket protocol), so that one machine's calls can be paused (a pause
past the TTL) or cut off (a crash) while the others go on, and so that every landed write
is recorded with the machine that sent it.

Each attempt of a call may, as the current ``FaultPlan`` draws it from a seeded
``random.Random``: fail before it lands (503), be refused with SlowDown (503), land and
lose its answer (the write is applied, then a transient error is raised), or be delayed.
Transient errors are retried inside the view as the real backends retry them
(``with_retries``), so a retried write meets its own landed first attempt, as on S3.
The bucket's clock (``Date`` and ``Last-Modified``) is the simulation's true wall clock
plus a skew the schedule sets. Every attempt and its outcome goes into ``trace``.
Objects can be damaged at rest or planted (hostile objects).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar

from tenantdb.errors import (
    BucketConfigurationError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
)
from tenantdb.storage.base import ObjectInfo, RetryPolicy, SmallObject, with_retries

__all__ = ["BucketView", "FaultPlan", "LandedWrite", "SimBucket"]

T = TypeVar("T")
FaultKind = Literal["fail_before", "slow_down", "lose_answer", "delay"]
FAULT_KINDS: tuple[FaultKind, ...] = ("fail_before", "slow_down", "lose_answer", "delay")
LATENCY = (0.0005, 0.004)  # the range of a request's round trip, in seconds
SIM_RETRY = RetryPolicy(attempts=6, base_delay=0.005, max_delay=0.05)
_WRITES = frozenset({"put", "upload", "delete"})


@dataclass(frozen=True)
class FaultPlan:
    """The chance of each fault per attempt; ``delay`` answers wait up to ``max_delay``."""

    fail_before: float = 0.0
    slow_down: float = 0.0
    lose_answer: float = 0.0
    delay: float = 0.0
    max_delay: float = 0.05

    def draw(self, rng: random.Random, operation: str) -> FaultKind | None:
        """The fault for one attempt of ``operation`` (lost answers only for writes)."""
        roll = rng.random()
        for kind in FAULT_KINDS:
            if kind == "lose_answer" and operation not in _WRITES:
                continue
            chance: float = getattr(self, kind)
            if roll < chance:
                return kind
            roll -= chance
        return None


NO_FAULTS = FaultPlan()


@dataclass
class _Object:
    body: bytes
    etag: str
    last_modified: datetime
    created: float = 0.0  # when its key first appeared, on the true clock (list lag)


@dataclass(frozen=True)
class LandedWrite:
    """A write the bucket applied: who sent it, when (bucket clock), and what it was."""

    client: str
    operation: str
    key: str
    etag: str | None  # None for a delete
    at: datetime
    body: bytes | None


@dataclass
class SimBucket:
    """The objects and their history, shared by every machine's view."""

    rng: random.Random = field(default_factory=lambda: random.Random(0))
    plan: FaultPlan = NO_FAULTS
    skew: timedelta = timedelta(0)
    objects: dict[str, _Object] = field(default_factory=dict)
    landed: list[LandedWrite] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    # (6) Attempts by (client, simulated second), and the largest body one answer handed
    # to each client in memory.
    rates: Counter[tuple[str, int]] = field(default_factory=Counter)
    largest_body: dict[str, int] = field(default_factory=dict)
    uncapped: dict[str, str] = field(default_factory=dict)  # client -> a key read uncapped
    # (5) Writes that replaced an object without naming its ETag (If-Match): "client op key".
    overwrites: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.time  # the true wall clock, as Unix time
    epoch: float = 0.0  # subtracted from ``clock`` in the trace
    trace: list[str] = field(default_factory=list)
    # A LIST leaves out keys created less than this many seconds ago: Tigris is strongly
    # consistent within a region, eventually consistent across regions for a Global
    # bucket (https://www.tigrisdata.com/docs/concepts/consistency/), so a fault here.
    list_lag: float = 0.0
    _etags: int = 0

    def now(self) -> datetime:
        """The bucket's clock: what it sends as ``Date`` and stamps as ``Last-Modified``."""
        return datetime.fromtimestamp(self.clock(), UTC) + self.skew

    def view(self, client: str) -> BucketView:
        """A Bucket for one machine (or tool) named ``client``."""
        return BucketView(self, client)

    def copy_objects(self) -> dict[str, _Object]:
        """The objects as they are now (later writes and damage do not change the copy)."""
        return {
            key: _Object(o.body, o.etag, o.last_modified, o.created)
            for key, o in self.objects.items()
        }

    def damage(self, key: str) -> None:
        """Flip a byte of a stored object in place, as a disk that rots would (same ETag)."""
        obj = self.objects[key]
        body = bytearray(obj.body or b"\0")
        body[len(body) // 2] ^= 0x5A
        obj.body = bytes(body)
        self.faults["damage"] += 1

    def plant(self, key: str, body: bytes) -> None:
        """Store a hostile object written by no machine."""
        self._store("hostile", "put", key, body)
        self.faults["hostile"] += 1

    def _info(self, key: str, obj: _Object) -> ObjectInfo:
        return ObjectInfo(
            key=key,
            etag=obj.etag,
            size=len(obj.body),
            last_modified=obj.last_modified,
            server_date=self.now(),
        )

    def _store(self, client: str, operation: str, key: str, body: bytes) -> ObjectInfo:
        self._etags += 1
        digest = hashlib.md5(body + self._etags.to_bytes(8, "big")).hexdigest()
        # S3 stamps Last-Modified to the second, which the lease's granularity allows for.
        stamp = self.now().replace(microsecond=0)
        old = self.objects.get(key)
        created = old.created if old is not None else self.clock()
        obj = self.objects[key] = _Object(body, f'"{digest}"', stamp, created)
        self.landed.append(LandedWrite(client, operation, key, obj.etag, stamp, body))
        return self._info(key, obj)

    def _get(self, key: str, operation: str) -> _Object:
        obj = self.objects.get(key)
        if obj is None:
            raise ObjectNotFoundError(f"no object {key!r}", key=key, operation=operation)
        return obj

    def _check_size(self, key: str, obj: _Object, limit: int | None, operation: str) -> None:
        if limit is not None and len(obj.body) > limit:
            raise ObjectTooLargeError(key=key, size=len(obj.body), limit=limit, operation=operation)

    def _put(
        self,
        client: str,
        operation: str,
        key: str,
        body: bytes,
        if_match: str | None,
        if_none_match: str | None,
    ) -> ObjectInfo:
        current = self.objects.get(key)
        if if_none_match == "*" and current is not None:
            raise PreconditionFailedError(
                f"{key!r} already exists (If-None-Match: *)", key=key, operation=operation
            )
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailedError(
                f"{key!r} changed since it was read (If-Match)", key=key, operation=operation
            )
        if current is not None and if_match is None:
            self.overwrites.append(f"{client} {operation} {key}")
        return self._store(client, operation, key, body)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        seen_by = self.clock() - self.list_lag
        found = [(k, o) for k, o in sorted(self.objects.items()) if k.startswith(prefix)]
        listed = [self._info(k, o) for k, o in found if o.created <= seen_by]
        if len(listed) < len(found):
            self.faults["list_lag"] += 1
        return listed

    def _delete(self, client: str, key: str, if_match: str | None) -> None:
        current = self.objects.get(key)
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailedError(
                f"{key!r} does not exist or changed (If-Match)", key=key, operation="delete"
            )
        if current is not None:
            del self.objects[key]
            self.landed.append(LandedWrite(client, "delete", key, None, self.now(), None))


def _digest(result: object) -> str:
    """A short, stable digest of an answer for the trace."""
    return hashlib.sha256(repr(result).encode()).hexdigest()[:12]


def _check_key(key: str) -> None:
    # The keys S3 and the local bucket both accept; tenantdb never makes any other.
    if not key or "\x00" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise BucketConfigurationError(f"invalid object key {key!r}", key=key)


class BucketView:
    """One machine's connection to the simulated bucket: the Bucket protocol."""

    kind: Literal["local"] = "local"  # no multipart ETags, no HTTP dates to the second

    def __init__(self, sim: SimBucket, client: str) -> None:
        self.sim = sim
        self.client = client
        self.retry = SIM_RETRY
        self._running = asyncio.Event()
        self._running.set()
        self.cut_off = False
        # Called once, right after this machine's next lock.json write lands (and before
        # its answer is back): where a process stopped then hurts a lease the most.
        self.after_landing: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"BucketView({self.client!r})"

    def pause(self) -> None:
        """Hold every call of this machine before it reaches the bucket, until ``resume``."""
        self._running.clear()

    def resume(self) -> None:
        """Let held calls go on (they then reach the bucket, late)."""
        self._running.set()

    def cut(self) -> None:
        """The machine is gone: none of its calls reaches the bucket any more."""
        self.cut_off = True
        self._running.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def _call(self, operation: str, key: str, apply: Callable[[], T]) -> T:
        if operation != "list":
            _check_key(key)
        return await with_retries(
            lambda: self._attempt(operation, key, apply),
            policy=self.retry,
            what=f"{self.client} {operation} {key}",
        )

    async def _attempt(self, operation: str, key: str, apply: Callable[[], T]) -> T:
        await self._running.wait()
        if self.cut_off:
            raise StorageError(f"{self.client} is gone", key=key, operation=operation)
        sim = self.sim
        sim.requests += 1
        sim.rates[self.client, int(sim.clock() - sim.epoch)] += 1
        await asyncio.sleep(sim.rng.uniform(*LATENCY) / 2)  # the request on its way
        await self._running.wait()
        if self.cut_off:
            raise StorageError(f"{self.client} is gone", key=key, operation=operation)
        fault = sim.plan.draw(sim.rng, operation)
        if fault is not None:
            sim.faults[fault] += 1
        if fault == "delay":
            await asyncio.sleep(sim.rng.uniform(0, sim.plan.max_delay))
            await self._running.wait()  # paused while the answer was on its way
            if self.cut_off:
                raise StorageError(f"{self.client} is gone", key=key, operation=operation)
        line = f"{sim.clock() - sim.epoch:.6f} {self.client} {operation} {key} {fault or '-'}"
        if fault in ("fail_before", "slow_down"):
            sim.trace.append(line)
            reason = "503 SlowDown" if fault == "slow_down" else "503 Service Unavailable"
            raise TransientStorageError(f"{reason} ({operation} {key!r})", key=key)
        try:
            result = apply()
        except StorageError as exc:
            sim.trace.append(f"{line} {type(exc).__name__}")
            raise
        sim.trace.append(f"{line} {_digest(result)}")
        if self.after_landing is not None and operation == "put" and key.endswith("lock.json"):
            hook, self.after_landing = self.after_landing, None
            hook()
        await asyncio.sleep(sim.rng.uniform(*LATENCY) / 2)  # the answer on its way
        if self.cut_off:
            raise StorageError(f"{self.client} is gone", key=key, operation=operation)
        if fault == "lose_answer":
            raise TransientStorageError(
                f"connection reset after the {operation} of {key!r} landed", key=key
            )
        if isinstance(result, SmallObject):
            held = sim.largest_body.get(self.client, 0)
            sim.largest_body[self.client] = max(held, len(result.body))
        return result

    async def get(self, key: str, *, max_size: int | None = None) -> SmallObject:
        """Read a small object whole; ObjectTooLargeError, unread, if above ``max_size``."""

        def read() -> SmallObject:
            obj = self.sim._get(key, "get")
            self.sim._check_size(key, obj, max_size, "get")
            return SmallObject(self.sim._info(key, obj), obj.body)

        if max_size is None:
            self.sim.uncapped.setdefault(self.client, key)
        return await self._call("get", key, read)

    async def get_if_changed(
        self, key: str, etag: str, *, max_size: int | None = None
    ) -> SmallObject | None:
        """Read a small object whole unless its ETag is still ``etag``: None then, no body."""

        def read() -> SmallObject | None:
            obj = self.sim._get(key, "get")
            if obj.etag == etag:
                return None
            self.sim._check_size(key, obj, max_size, "get")
            return SmallObject(self.sim._info(key, obj), obj.body)

        if max_size is None:
            self.sim.uncapped.setdefault(self.client, key)
        return await self._call("get", key, read)

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        if_none_match: Literal["*"] | None = None,
    ) -> ObjectInfo:
        """Write a small object, optionally only if its ETag matches or it does not exist."""
        return await self._call(
            "put",
            key,
            lambda: self.sim._put(self.client, "put", key, body, if_match, if_none_match),
        )

    async def head(self, key: str) -> ObjectInfo:
        """Describe an object without reading it."""
        return await self._call(
            "head", key, lambda: self.sim._info(key, self.sim._get(key, "head"))
        )

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object; deleting a missing object is not an error."""
        await self._call("delete", key, lambda: self.sim._delete(self.client, key, if_match))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """List the objects whose keys start with ``prefix``, sorted by key (but those
        created within the bucket's ``list_lag``)."""
        return await self._call("list", prefix, lambda: self.sim._list(prefix))

    async def download_file(
        self, key: str, dest: Path, *, max_size: int | None = None
    ) -> ObjectInfo:
        """Write an object into ``dest``; ObjectTooLargeError before opening it if too big."""

        def download() -> tuple[ObjectInfo, bytes]:
            obj = self.sim._get(key, "download")
            self.sim._check_size(key, obj, max_size, "download")
            return self.sim._info(key, obj), obj.body

        info, body = await self._call("download", key, download)
        await asyncio.to_thread(dest.write_bytes, body)
        return info

    async def upload_file(
        self, key: str, src: Path, *, if_none_match: Literal["*"] | None = None
    ) -> ObjectInfo:
        """Store the bytes of ``src`` as a new object, optionally only if absent."""
        _check_key(key)
        body = await asyncio.to_thread(src.read_bytes)
        return await self._call(
            "upload",
            key,
            lambda: self.sim._put(self.client, "upload", key, body, None, if_none_match),
        )
