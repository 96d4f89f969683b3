"""Encryption at rest: what sealing costs, each figure encrypted vs not in the same run.

On moto's S3 server (its own process), through tenantdb's own ``S3Bucket``. Every figure is
measured in **interleaved pairs**: one plain, one sealed, back to back, the order flipping
each pair (ABBA), so that the shared machine's drift hits both ways alike. Each figure then
gives two estimates of the overhead, and a verdict against the goal (<= 1.10x):

- the **median of the pairs' ratios** (sealed / plain), with its interquartile range: the
  typical overhead, robust to a pair a stall hit;
- the **min-of-N ratio** (the fastest sealed over the fastest plain): the cost with the
  least interference, as both ways' best runs are the least disturbed;
- **met** when both are within the goal, **missed** when even the lower quartile of the
  ratios is above it (three pairs in four worse than the goal), else **within noise** (the
  spread is wider than the question: more ``--rounds``); no verdict under 5 pairs.

The figures:

- restore download: ``download_file`` of a ``--size-mib`` MiB snapshot (a real SQLite
  file of random rows) through ``EncryptedBucket`` (ranged parallel GETs of the sealed
  object, then opened in place chunk by chunk) vs the same bucket without it, ``--rounds``
  pairs;
- shipping: ``put`` of 64 segment-sized bodies (256 KiB of random bytes each, with
  ``If-None-Match: *``), each body sealed and plain in turn, 64 x ``--rounds`` pairs;
- durable write: a commit then ``TenantDB.sync()`` (the segment published by its CAS on
  lock.json, sealed inline there) on two running tenants, one sealed, one plain, written
  in turn, 100 x ``--rounds`` pairs;
- CPU: one core's seconds per MiB to seal and to open (AES-256-GCM), beside sha256's
  (which every restore already pays), min of ``--rounds``.

Run: ``python -m bench.bench_encryption --size-mib 256 --rounds 9``. The ratio line last.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import MiB, S3Server, fill_database, machine
from tenantdb.config import Secret, Settings
from tenantdb.crypto import ObjectContext, open_bytes, parse_keyring, seal_bytes, wrap_data_key
from tenantdb.machine.database import TenantDB
from tenantdb.storage.base import Bucket
from tenantdb.storage.encrypted import EncryptedBucket
from tenantdb.storage.s3 import S3Bucket

GOAL = 1.10
KEYRING = parse_keyring(base64.b64encode(os.urandom(32)).decode(), variable="bench")
PREFIX = "tenants/"
SEGMENT_BYTES = 256 * 1024
SEGMENTS = 64
WRITES = 100
WAYS = ("plain", "sealed")
# Below this, quartiles say nothing: no verdict.
_FEWEST_PAIRS = 5


@dataclass
class Pairs:
    """One figure's times (seconds), measured plain and sealed in interleaved pairs."""

    plain: list[float] = field(default_factory=list)
    sealed: list[float] = field(default_factory=list)

    def add(self, plain: float, sealed: float) -> None:
        """Record one pair."""
        self.plain.append(plain)
        self.sealed.append(sealed)

    @property
    def ratios(self) -> list[float]:
        """Each pair's sealed time over its plain time."""
        return [s / p for p, s in zip(self.plain, self.sealed, strict=True)]

    @property
    def median_ratio(self) -> float:
        """The median of the pairs' ratios."""
        return statistics.median(self.ratios)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The ratios' lower and upper quartiles."""
        if len(self.ratios) < 2:
            return self.ratios[0], self.ratios[0]
        q1, _, q3 = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return q1, q3

    @property
    def min_ratio(self) -> float:
        """The fastest sealed time over the fastest plain one."""
        return min(self.sealed) / min(self.plain)

    @property
    def verdict(self) -> str:
        """met, missed, or within noise (see the module docstring)."""
        if len(self.plain) < _FEWEST_PAIRS:
            return "too few pairs"
        if self.median_ratio <= GOAL and self.min_ratio <= GOAL:
            return "met"
        return "missed" if self.quartiles[0] > GOAL else "within noise"

    def describe(self) -> str:
        """The ratios of this figure, in a line."""
        q1, q3 = self.quartiles
        return (
            f"ratio {self.median_ratio:.3f}x (median of {len(self.plain)} pairs, IQR "
            f"{q1:.3f} to {q3:.3f}), min-of-{len(self.plain)} {self.min_ratio:.3f}x: "
            f"{self.verdict}"
        )


def _bucket(server: S3Server, name: str) -> S3Bucket:
    return S3Bucket(
        name,
        endpoint_url=server.endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key=Secret("testing"),
    )


async def _pair(pairs: Pairs, n: int, ways: Mapping[str, Callable[[], Awaitable[object]]]) -> None:
    """Time both ways once, back to back, plain first when ``n`` is even."""
    took: dict[str, float] = {}
    for way in WAYS if n % 2 == 0 else reversed(WAYS):
        started = time.perf_counter()
        await ways[way]()
        took[way] = time.perf_counter() - started
    pairs.add(took["plain"], took["sealed"])


async def _restore(raw: Bucket, sealed: Bucket, db: Path, work: Path, rounds: int) -> Pairs:
    plain_key = f"{PREFIX}plain/snapshots/00000001-00000001-000000000001-0000000000001-aa.sqlite3"
    sealed_key = f"{PREFIX}sealed/snapshots/00000001-00000001-000000000001-0000000000001-aa.sqlite3"
    await raw.upload_file(plain_key, db)
    await sealed.upload_file(sealed_key, db)
    pairs = Pairs()
    for n in range(rounds):
        await _pair(
            pairs,
            n,
            {
                "plain": lambda: raw.download_file(plain_key, work / "plain"),
                "sealed": lambda: sealed.download_file(sealed_key, work / "sealed"),
            },
        )
    same = hashlib.sha256((work / "plain").read_bytes()).digest()
    if same != hashlib.sha256((work / "sealed").read_bytes()).digest():
        raise RuntimeError("the sealed download does not give back the database")
    return pairs


async def _ship(raw: Bucket, sealed: Bucket, rounds: int) -> Pairs:
    """Each segment put both ways in turn: one pair per segment and round."""
    bodies = [os.urandom(SEGMENT_BYTES) for _ in range(SEGMENTS)]
    pairs = Pairs()
    for n in range(1, rounds + 1):
        for index, body in enumerate(bodies, 1):
            key = f"log/{n:08d}/{index:012d}.seg"
            await _pair(
                pairs,
                index + n,
                {
                    "plain": _put(raw, f"{PREFIX}ship-plain/{key}", body),
                    "sealed": _put(sealed, f"{PREFIX}ship-sealed/{key}", body),
                },
            )
    return pairs


def _put(bucket: Bucket, key: str, body: bytes) -> Callable[[], Awaitable[object]]:
    return lambda: bucket.put(key, body, if_none_match="*")


async def _durable_writes(raw: Bucket, work: Path, rounds: int) -> Pairs:
    """Two tenants running at once, one sealed, one plain, written in turn."""
    pairs = Pairs()
    migrations = ["CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"]
    async with AsyncExitStack() as stack:
        tenants: dict[str, TenantDB] = {}
        for way in WAYS:
            bucket = raw if way == "plain" else EncryptedBucket(raw, KEYRING, prefix=PREFIX)
            settings = Settings(
                tenant=f"w-{way}",
                machine_id="bench",
                data_dir=work / f"w-{way}",
                checkpoint_interval=0,
                durability="async",
            )
            tdb = TenantDB(settings, migrations=migrations, bucket=bucket)
            tenants[way] = await stack.enter_async_context(tdb)

        def write(tdb: TenantDB) -> Callable[[], Awaitable[None]]:
            async def one() -> None:
                async with tdb.connection() as db:
                    await db.execute("INSERT INTO t (v) VALUES (?)", ("x" * 200,))
                    await db.commit()
                await tdb.sync()

            return one

        ways = {way: write(tdb) for way, tdb in tenants.items()}
        for n in range(WRITES * rounds):
            await _pair(pairs, n, ways)
    return pairs


def _cpu_per_mib(rounds: int) -> dict[str, float]:
    """One core's milliseconds per MiB to seal, open and sha256 16 MiB: the min of ``rounds``."""
    data_key = wrap_data_key(KEYRING, "bench", f"{PREFIX}bench/key.json")[0]
    ctx = ObjectContext("bench", f"{PREFIX}bench/log/00000001/000000000001.seg", 1, "segment")
    body = os.urandom(16 * MiB)
    sealed = seal_bytes(data_key, ctx, body)
    actions: dict[str, Callable[[], object]] = {
        "seal": lambda: seal_bytes(data_key, ctx, body),
        "open": lambda: open_bytes(data_key, ctx, sealed),
        "sha256": lambda: hashlib.sha256(body).digest(),
    }
    best = dict.fromkeys(actions, float("inf"))
    for _ in range(rounds):
        for name, action in actions.items():
            started = time.process_time()
            action()
            best[name] = min(best[name], time.process_time() - started)
    return {name: took / 16 * 1e3 for name, took in best.items()}


def _medians(pairs: Pairs) -> tuple[float, float]:
    return statistics.median(pairs.sealed), statistics.median(pairs.plain)


async def _run(size_mib: int, rounds: int) -> int:
    print(machine(), flush=True)
    with S3Server() as server, tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        name = server.create_bucket("bench-encryption")
        db = work / "db.sqlite3"
        fill_database(db, size_mib * MiB)
        async with _bucket(server, name) as raw:
            sealed = EncryptedBucket(raw, KEYRING, prefix=PREFIX)
            restore = await _restore(raw, sealed, db, work, rounds)
            s, p = _medians(restore)
            print(
                f"restore download {size_mib} MiB: sealed {s:.2f} s vs plain {p:.2f} s "
                f"(medians); {restore.describe()}",
                flush=True,
            )
            ship = await _ship(raw, sealed, rounds)
            s, p = _medians(ship)
            rate = SEGMENT_BYTES / MiB
            print(
                f"shipping {SEGMENTS} x 256 KiB x {rounds}: sealed {rate / s:.1f} vs plain "
                f"{rate / p:.1f} MiB/s (medians); {ship.describe()}",
                flush=True,
            )
            writes = await _durable_writes(raw, work, rounds)
            s, p = _medians(writes)
            print(
                f"durable write (commit + sync), {WRITES} x {rounds}: sealed {s * 1e3:.2f} ms "
                f"vs plain {p * 1e3:.2f} ms (medians); {writes.describe()}",
                flush=True,
            )
    cpu = _cpu_per_mib(rounds)
    print(
        f"CPU per MiB, one core, min of {rounds}: seal {cpu['seal']:.2f} ms, open "
        f"{cpu['open']:.2f} ms (sha256 {cpu['sha256']:.2f} ms)",
        flush=True,
    )
    figures = {"restore": restore, "shipping": ship, "durable write": writes}
    verdicts = {pairs.verdict for pairs in figures.values()}
    overall = next(v for v in ("missed", "within noise", "too few pairs", "met") if v in verdicts)
    ratios = ", ".join(
        f"{name} {pairs.median_ratio:.3f}x (min-of-N {pairs.min_ratio:.3f}x)"
        for name, pairs in figures.items()
    )
    print(f"encryption overhead: {ratios} (goal <= {GOAL:.2f}x: {overall})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_encryption", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.size_mib, args.rounds))


if __name__ == "__main__":
    raise SystemExit(main())
