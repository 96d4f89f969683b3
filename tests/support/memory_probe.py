"""Measure the peak memory of one bucket transfer in a fresh process.

``python -m tests.support.memory_probe upload|download|control --key K --work DIR`` sets up
the bucket, warms it up with small transfers (imports, thread pools, HTTP session), reads
the resident set (VmRSS) and resets the peak, runs one large transfer, reads the peak
(VmHWM), and prints one JSON line: ``{"baseline_kib", "peak_kib", "growth_mib", ...}``.
A fresh process per transfer keeps earlier work out of the figures. ``ru_maxrss`` is
printed too but not used: after fork and exec it starts at the parent's RSS, so it hides
growth below the size of the pytest process that started the probe.
``control`` reads the file whole into one ``put``: it proves the probe can see growth.

S3 settings come from the environment (BUCKET_NAME, AWS_ENDPOINT_URL_S3, ...), exactly as
tenantdb reads them, so this also exercises ``open_bucket``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import resource
import time
from pathlib import Path

from tenantdb.config import Settings
from tenantdb.storage import open_bucket

MiB = 1 << 20


def _maxrss_kib() -> int:
    # Linux reports ru_maxrss in KiB. Caveat: it starts at the RSS the parent had when it
    # forked this process (exec keeps the forked copy's peak), so it is reported, not used.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (now), VmHWM (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is the transfer's."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False  # then VmHWM still includes setup: the growth is overstated, not hidden
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            digest.update(block)
    return digest.hexdigest()


def write_source(path: Path, size: int) -> None:
    """Write ``size`` pseudo-random bytes, one MiB at a time (never whole in memory)."""
    seed = os.urandom(MiB)
    with open(path, "wb") as f:
        for index in range(size // MiB):
            # A different prefix per MiB, so a misplaced range shows up in the hash.
            f.write(index.to_bytes(8, "big") + seed[8:])
        f.write(seed[: size % MiB])


async def probe(direction: str, key: str, work: Path, size: int) -> dict[str, object]:
    """Run the warm-up and the measured transfer; return the figures."""
    # TENANTDB_LOCAL_BUCKET lets an upload and a later download share one local bucket.
    local_dir = os.environ.get("TENANTDB_LOCAL_BUCKET") or str(work / "bucket")
    settings = Settings.from_env(local_bucket_dir=Path(local_dir))
    source = work / "source.bin"
    if direction in ("upload", "control"):
        write_source(source, size)
    async with open_bucket(settings) as bucket:
        warm = work / "warm.bin"
        write_source(warm, MiB)
        await bucket.put("warmup/small", b"x" * 100)
        await bucket.get("warmup/small")
        await bucket.upload_file("warmup/file", warm)
        await bucket.download_file("warmup/file", work / "warm.out")
        gc.collect()
        # Growth is measured from the memory in use now, not from the peak so far: a
        # transient peak during setup would otherwise hide part of the transfer's growth.
        baseline = _status_kib("VmRSS")
        peak_was_reset = _reset_peak()
        started = time.monotonic()
        if direction == "upload":
            await bucket.upload_file(key, source)
            measured = source
        elif direction == "control":
            # What the bounded transfers must not do: hold the whole object in memory.
            await bucket.put(key, source.read_bytes())
            measured = source
        else:
            measured = work / "download.bin"
            await bucket.download_file(key, measured)
        seconds = time.monotonic() - started
        peak = _status_kib("VmHWM")
    return {
        "baseline_kib": baseline,
        "peak_kib": peak,
        "growth_mib": (peak - baseline) / 1024,
        "peak_was_reset": peak_was_reset,
        "ru_maxrss_kib": _maxrss_kib(),
        "sha256": _sha256(measured),
        "size": measured.stat().st_size,
        "seconds": round(seconds, 2),
    }


def main() -> None:
    """Command line entry point; prints one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("direction", choices=["upload", "download", "control"])
    parser.add_argument("--key", required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory")
    parser.add_argument("--size-mib", type=int, default=256)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(probe(args.direction, args.key, args.work, args.size_mib * MiB))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
