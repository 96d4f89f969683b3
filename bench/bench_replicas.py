"""Read latency for a client in a replica's region, replica reads on vs off, and the
replica's lag with the holder's tail hints on vs off.

Two uvicorn machines of one tenant (``tests.support.replica_app``, the embedded bucket): m1
holds it "in another region", m2 stands by in the client's. The client (playing Fly's proxy
in its region, following fly-replay) reaches m2 directly and m1 only through a TCP relay
that delays every chunk ``--latency-ms`` (30 ms) each way. Off (``TENANTDB_REPLICA_READS=0``)
m2 replays every read to m1; on, it serves reads from its copy. Meanwhile a writer commits
on m1 (from its own region) at ``--writes-per-s`` (10, each on time: the rate kept is
printed), and the reads carry the client's bookmark from a write of its own every
``--write-every`` reads (20), so some reads wait.

Printed per mode: read p50/p99, the share served by m2, and (on) the lag m2 reported
(``tenantdb-lag-ms``) p50/p99, the share of reads that waited for their bookmark and the
median wait (``tenantdb-waited-ms``). Replica reads run twice, with tail hints
(``TENANTDB_TAIL_HINTS``; m2 asks m1 through the relay, as across regions) and without,
and each run also measures how soon a write's answer is followed by m2 serving it
(``visible``: m2 read without a bookmark every 2 ms), m2's bucket requests a second
meanwhile (all reads: lock.json and the segments it follows; billed: those not answered
304) and the bucket's round trip (the median read of lock.json from the bench's process,
on the same embedded bucket under the same load: the "one bucket round trip" of the lag
goal). The replica polls every ``--follow-interval`` (0.1 s) without hints. ``--modes``
picks the runs. Run: ``python -m bench.bench_replicas``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.dev.ports import free_port
from tenantdb.storage.local import LocalBucket
from tests.support.hint_servers import ThreadServer
from tests.support.servers import MachineProcesses

APP = "tests.support.replica_app:app"
NOTES = "/customers/acme/notes"
# The runs (``--modes``): what each prints, replica reads on, tail hints on.
MODES = {
    "off": ("off", False, True),
    "polled": ("on, no tail hints", True, False),
    "hints": ("on, tail hints", True, True),
}
LOCK_KEY = "tenants/acme/lock.json"


class DelayRelay(ThreadServer):
    """A TCP relay to ``port`` on loopback that holds each chunk ``delay`` seconds.

    The bench runs it in a process of its own (``relay_process``): on the bench's loop,
    busy with the client's reads every 2 ms, a chunk's leg stretched by whatever else ran
    (20 ms more at times), and on a thread beside that loop it still waited for the GIL.
    """

    def __init__(self, port: int, delay: float, *, listen: int | None = None) -> None:
        super().__init__(listen)
        self.target = port
        self.delay = delay

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            # Each chunk goes out ``delay`` after it came in, whatever came before it: a
            # stream's lines each take the leg once (sleeping per chunk in turn would hold a
            # line that arrives during the sleep for up to two legs).
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def take() -> None:
                try:
                    while chunk := await src.read(65536):
                        queue.put_nowait((time.monotonic() + self.delay, chunk))
                except ConnectionError:
                    pass
                finally:
                    queue.put_nowait((time.monotonic() + self.delay, b""))

            taking = asyncio.ensure_future(take())
            try:
                while True:
                    due, chunk = await queue.get()
                    await asyncio.sleep(max(due - time.monotonic(), 0))
                    if not chunk:
                        break
                    dst.write(chunk)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                taking.cancel()
                dst.close()

        with contextlib.suppress(asyncio.CancelledError):  # the loop closing at the end
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def follow(
    client: httpx.AsyncClient, urls: dict[str, str], near: str, method: str, path: str
) -> httpx.Response:
    """Send to m2 (``near``: the client's region) and follow fly-replay as Fly's proxy would."""
    machine, extra = near, dict[str, str]()
    for _ in range(3):
        response = await client.request(method, urls[machine] + path, headers=extra)
        replay = response.headers.get("fly-replay")
        if replay is None:
            return response
        target = replay.split(";")[0].removeprefix("instance=")
        extra = {"fly-replay-src": f"instance={machine};region=near;t={time.time_ns() // 1000}"}
        machine = target
    raise RuntimeError("replay loop")


def _serve_relay(port: int, delay: float, listen: int, ready: Event, stop: Event) -> None:
    with DelayRelay(port, delay, listen=listen):
        ready.set()
        stop.wait()


@contextlib.contextmanager
def relay_process(port: int, delay: float, *, listen: int) -> Iterator[str]:
    """A ``DelayRelay`` to ``port`` listening on ``listen`` in a child process; its URL."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    child = context.Process(target=_serve_relay, args=(port, delay, listen, ready, stop))
    child.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the relay process did not start")
        yield f"http://127.0.0.1:{listen}"
    finally:
        stop.set()
        child.join(10)
        if child.is_alive():
            child.kill()


def percentile(values: list[float], share: float) -> float:
    """The value at ``share`` (0..1) of the sorted ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def bucket_requests(metrics_port: int) -> tuple[float, float]:
    """Every bucket request a machine made so far, and those billed (not 304s), from its
    /metrics."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    pattern = r'^tenantdb_bucket_requests_total\{[^}]*class="(\w+)"[^}]*\} ([0-9.e+]+)$'
    found = [(kind, float(value)) for kind, value in re.findall(pattern, text, re.M)]
    return sum(value for _, value in found), sum(v for kind, v in found if kind != "free")


async def round_trips(bucket_dir: Path, stop: asyncio.Event) -> list[float]:
    """Seconds each read of lock.json from this process took, every 20 ms until ``stop``:
    the bucket's round trip as the replica sees it (the same embedded bucket, same load)."""
    taken: list[float] = []
    async with LocalBucket(bucket_dir, create=False) as bucket:
        while not stop.is_set():
            started = time.perf_counter()
            await bucket.get(LOCK_KEY)
            taken.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    return taken


async def measure(
    urls: dict[str, str],
    near: str,
    holder: str,
    reads: int,
    write_every: int,
    writes_per_s: float,
    visible_samples: int,
    bucket_dir: Path,
    near_metrics: int,
) -> dict[str, float]:
    """Read ``reads`` times through m2 while m1 takes writes; latencies, shares, lags, and
    while writes are timed to m2's copy, m2's bucket requests and the bucket's round trip."""
    stop = asyncio.Event()

    async def writer() -> float:
        """Writes at ``writes_per_s`` until ``stop``, each on time whatever the ones before
        it wait for (one after another, each write's answer, the CAS it waits for, slowed
        them to about half the rate); the rate it kept."""
        async with httpx.AsyncClient(timeout=10) as client:
            posts: set[asyncio.Task[httpx.Response]] = set()
            started, n = time.monotonic(), 0
            while not stop.is_set():
                await asyncio.sleep(max(started + n / writes_per_s - time.monotonic(), 0))
                # A writer in the holder's region: no relay on its way.
                post = client.post(f"{holder}{NOTES}?token=w{n}-{time.time_ns()}")
                posts.add(task := asyncio.ensure_future(post))
                task.add_done_callback(posts.discard)
                n += 1
            rate = n / (time.monotonic() - started)
            await asyncio.gather(*posts)
            return rate

    background = asyncio.ensure_future(writer())
    latencies: list[float] = []
    lags: list[float] = []
    waits: list[float] = []
    served_here = 0
    async with httpx.AsyncClient(timeout=10) as client:
        for n in range(reads):
            if n % write_every == 0:
                await follow(client, urls, near, "POST", f"{NOTES}?token=r{n}-{time.time_ns()}")
            started = time.perf_counter()
            response = await follow(client, urls, near, "GET", NOTES)
            latencies.append(time.perf_counter() - started)
            response.raise_for_status()
            if response.headers.get("tenantdb-served-by") == near:
                served_here += 1
                lags.append(float(response.headers["tenantdb-lag-ms"]))
                if (waited := float(response.headers["tenantdb-waited-ms"])) > 0:
                    waits.append(waited)
        timing = asyncio.Event()
        timer = asyncio.ensure_future(round_trips(bucket_dir, timing))
        (before, billed_before), started = bucket_requests(near_metrics), time.perf_counter()
        visible = [await visibility(urls[near], near, holder) for _ in range(visible_samples)]
        (after, billed_after), took = bucket_requests(near_metrics), time.perf_counter() - started
        requests_per_s = (after - before) / took
        billed_per_s = (billed_after - billed_before) / took
        timing.set()
        trips = await timer
    stop.set()
    result = {
        "writes_per_s": await background,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "served_by_replica": served_here / reads,
    }
    if lags:
        result["lag_p50_ms"] = statistics.median(lags)
        result["lag_p99_ms"] = percentile(lags, 0.99)
        result["waited_share"] = len(waits) / reads
        result["wait_p50_ms"] = statistics.median(waits) if waits else 0.0
    if visible:
        result["visible_p50_ms"] = 1000 * statistics.median(visible)
        result["visible_p99_ms"] = 1000 * percentile(visible, 0.99)
        result["m2_bucket_requests_per_s"] = requests_per_s
        result["m2_billed_requests_per_s"] = billed_per_s
        result["bucket_round_trip_p50_ms"] = 1000 * statistics.median(trips)
    return result


async def visibility(url: str, near: str, holder: str) -> float:
    """Seconds from a write's answer on m1 to m2 (``near``, at ``url``) serving it itself.

    The reads carry no bookmark (a client of their own, its cookies dropped): a bookmark
    would make m2 poll lock.json at once, which is not what is measured here.
    """
    token = f"v-{time.time_ns()}"
    async with httpx.AsyncClient(timeout=10) as client:
        (await client.post(f"{holder}{NOTES}?token={token}")).raise_for_status()
        written = time.perf_counter()
        while time.perf_counter() - written < 10:
            client.cookies.clear()
            # A lookup of the one row: reading the whole table every 2 ms (thousands of
            # rows by then) made m2 busy with the probe and the bench's loop with its JSON.
            answer = await client.get(f"{url}{NOTES}?token={token}")
            served = answer.headers.get("tenantdb-served-by") == near
            if served and token in answer.json()["tokens"]:
                return time.perf_counter() - written
            await asyncio.sleep(0.002)
    raise RuntimeError(f"m2 did not serve {token} within 10 s")


def machine_env(
    bucket: Path, dns: DevDNSServer, *, replica_reads: bool, tail_hints: bool
) -> dict[str, str]:
    """The settings of the benches' machines: the embedded bucket at ``bucket``, ``dns``
    for the internal records, machine ids that are ports (see ``run_mode``)."""
    return {
        "TENANTDB_DNS_SERVER": "{}:{}".format(*dns.address),
        "TENANTDB_LOCAL_BUCKET": str(bucket),
        "TENANTDB_LEASE_TTL": "5",
        "TENANTDB_CHECKPOINT_INTERVAL": "0",
        "TENANTDB_IDLE_STOP": "0",
        "TENANTDB_REPLICA_READS": "1" if replica_reads else "0",
        "TENANTDB_TAIL_HINTS": "1" if tail_hints else "0",
        "TENANTDB_HINT_URL": "http://127.0.0.1:{machine_id}",
    }


def run_mode(replicas: bool, hints: bool, args: argparse.Namespace) -> dict[str, float]:
    """Start m1 and m2 with replica reads and tail hints on or off and measure.

    Machine ids are ports, so that TENANTDB_HINT_URL can name http://127.0.0.1:{machine_id}
    (on Fly: <machine_id>.vm.<app>.internal:<port>): m1's id is its relay's port, so m2's
    hints cross the "ocean" as its replays do.
    """
    with tempfile.TemporaryDirectory() as tmp, DevDNSServer().run_in_thread() as dns:
        root = Path(tmp)
        env = machine_env(root / "bucket", dns, replica_reads=replicas, tail_hints=hints)
        env["TENANTDB_FOLLOW_INTERVAL"] = f"{args.follow_interval:g}"
        relay_port, m1_port, m2_port = free_port(), free_port(), free_port()
        far, near = str(relay_port), str(m2_port)
        metrics = {far: "0", near: str(free_port())}
        with MachineProcesses(root) as machines:

            async def main() -> dict[str, float]:
                # The relay listens before m2 starts: a first hint request refused would
                # send m2 back to polling for HINT_RETRY (5 s), into the measured writes.
                delay = args.latency_ms / 1000
                with relay_process(m1_port, delay, listen=relay_port) as relay_url:
                    for machine, port in ((far, m1_port), (near, m2_port)):
                        machine_env = {**env, "TENANTDB_METRICS_PORT": metrics[machine]}
                        await asyncio.to_thread(
                            machines.start, APP, machine, "acme", machine_env, port=port
                        )
                    urls = {far: relay_url, near: f"http://127.0.0.1:{m2_port}"}
                    await asyncio.sleep(1)  # the replica restores its copy
                    return await measure(
                        urls,
                        near,
                        f"http://127.0.0.1:{m1_port}",
                        args.reads,
                        args.write_every,
                        args.writes_per_s,
                        args.visible if replicas else 0,
                        root / "bucket",
                        int(metrics[near]),
                    )

            result = asyncio.run(main())
            m2 = machines.started[1]
            for line in m2.log().splitlines():
                if "tail hints" in line:
                    print(f"  m2: {line}")
            return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--write-every", type=int, default=20)
    parser.add_argument("--writes-per-s", type=float, default=10.0)
    parser.add_argument("--visible", type=int, default=100, help="writes timed to m2's copy")
    parser.add_argument("--follow-interval", type=float, default=0.1, help="seconds")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="which runs (all three by default; the ratios need them all)",
    )
    args = parser.parse_args()
    results = {mode: run_mode(*MODES[mode][1:], args) for mode in args.modes}
    for mode, result in results.items():
        figures = ", ".join(f"{k} {v:.2f}" for k, v in result.items())
        print(f"replica reads {MODES[mode][0]}: {figures}")
    if len(results) < len(MODES):
        return
    off, polled, on = (results[mode] for mode in MODES)
    print(
        f"replica reads: p50 on/off = {on['p50_ms'] / off['p50_ms']:.2f} (goal <= 0.2), "
        f"p99 on/off = {on['p99_ms'] / off['p99_ms']:.2f}, "
        f"{100 * on['served_by_replica']:.0f}% of reads served by the replica"
    )
    print(
        "tail hints on/off: "
        + ", ".join(
            f"{key} {on[key] / polled[key]:.2f}"
            for key in ("lag_p50_ms", "lag_p99_ms", "visible_p50_ms", "visible_p99_ms")
        )
    )


if __name__ == "__main__":
    main()
