"""Bad input, generated with hypothesis: tenant ids, request headers, and lock.json files
written by something other than tenantdb.

- A tenant id is a valid DNS label or refused with ``InvalidTenantError``; nothing is
  looked up and no bucket key is made from a refused id.
- Headers never make tenantdb answer 500: its 5xx answers are deliberate 503s (routing
  loop guard, lookups failing) with a Retry-After, and this machine's own tenant is
  served whatever the headers say.
- A damaged ``lock.json`` is a ``LockFileCorruptError`` naming its key (never another
  exception, never a lease taken from a record tenantdb cannot trust), and a clear
  startup failure that leaves the bucket and the data directory alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from example_app import create_app
from tenantdb.asgi.middleware import TenantDBMiddleware
from tenantdb.config import Settings
from tenantdb.dev.dns_server import DevDNSServer
from tenantdb.errors import InvalidTenantError, LockFileCorruptError
from tenantdb.machine.database import TenantDB
from tenantdb.protocol.lease import LockRecord
from tenantdb.routing.replay import Router
from tenantdb.storage.local import LocalBucket
from tenantdb.tenants import validate_tenant
from tests.faults.conftest import ProxiedS3
from tests.support.apps import local_acme_settings
from tests.support.asgi_calls import Answer, LiveASGI
from tests.support.servers import UvicornProcess

DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
KEY = "tenants/acme/lock.json"
MIGRATIONS = ["CREATE TABLE hits (id INTEGER PRIMARY KEY)"]

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- tenant ids ------------------------------------------------------------------------------

tenant_like = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"[a-zA-Z0-9._%/-]{0,70}", fullmatch=True),
    st.sampled_from(
        ["acme", "ACME", "acme.", ".", "..", "-acme", "acme-", "a" * 63, "a" * 64, "a/b", "a\x00"]
    ),
)


@FUZZ
@given(value=tenant_like)
@example(value="200%2F..")
@example(value="\U0002fa1e" * 10_000)
@example(value="\u0430cme")  # Cyrillic a: not ASCII
def test_a_tenant_id_is_a_dns_label_or_refused(value: str) -> None:
    if DNS_LABEL.fullmatch(value) is None:
        with pytest.raises(InvalidTenantError) as raised:
            validate_tenant(value)
        assert raised.value.tenant == value
        # A huge id does not make a huge message (80 characters of it, escaped, at most).
        assert len(str(raised.value)) < 1000
        with pytest.raises(InvalidTenantError):
            Settings(tenant=value)
        return
    assert validate_tenant(value) == value
    key = f"tenants/{value}/lock.json"
    assert all(part not in ("", ".", "..") for part in key.split("/"))


# -- lock.json written by something else -----------------------------------------------------

VALID_LOCK: dict[str, Any] = {
    "format": 1,
    "tenant": "acme",
    "owner": "m1",
    "region": "ams",
    "generation": 3,
    "seq": 7,
    "ttl_seconds": 15,
    "last_owner": None,
    "snapshot": {
        "key": "tenants/acme/snapshots/00000003-00000007.sqlite3",
        "sha256": "0" * 64,
        "size": 8192,
        "published_at": "2026-01-01T00:00:00+00:00",
    },
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def damaged_locks(draw: st.DrawFn) -> bytes:
    """A lock.json body: a valid lock with fields broken, or garbage of many kinds."""
    kind = draw(st.sampled_from(["field", "snapshot-field", "drop", "extra", "raw", "truncate"]))
    lock = json.loads(json.dumps(VALID_LOCK))
    if kind == "field":
        lock[draw(st.sampled_from(sorted(VALID_LOCK)))] = draw(json_values)
    elif kind == "snapshot-field":
        name = draw(st.sampled_from(["key", "sha256", "size", "published_at"]))
        lock["snapshot"][name] = draw(
            json_values
            | st.sampled_from(
                [
                    "tenants/acme/snapshots/../../other/snapshots/x.sqlite3",
                    "tenants/acme/snapshots/",
                    "tenants/acme/snapshots/./x",
                    "tenants/acme/snapshots//x",
                    "tenants/acme/snapshots/a/b.sqlite3",
                ]
            )
        )
    elif kind == "drop":
        del lock[draw(st.sampled_from(sorted(VALID_LOCK)))]
    elif kind == "extra":
        lock[draw(st.text(max_size=10))] = draw(json_values)
    elif kind == "raw":
        return draw(
            st.binary(max_size=200)
            | json_values.map(lambda v: json.dumps(v).encode())
            | st.sampled_from([b"", b"\xff\xfe{", b"[" * 3000 + b"]" * 3000, b'{"format": 1e400}'])
        )
    body = json.dumps(lock).encode()
    if kind == "truncate":
        return body[: draw(st.integers(0, len(body) - 1))]
    return body


def assert_trustworthy(record: LockRecord) -> None:
    """What every accepted lock record must be, whatever file it came from."""
    assert record.tenant == "acme"
    assert record.format == 1
    for value in (record.generation, record.seq):
        assert type(value) is int
        assert value >= 1
    assert isinstance(record.ttl_seconds, float)
    assert math.isfinite(record.ttl_seconds)
    assert record.ttl_seconds > 0
    for name in (record.owner, record.region, record.last_owner):
        assert name is None or isinstance(name, str)
    if record.snapshot is not None:
        key = record.snapshot.key
        assert key.startswith("tenants/acme/snapshots/")
        name = key.removeprefix("tenants/acme/snapshots/")
        assert name not in ("", ".", "..")
        assert "/" not in name
        assert record.snapshot.size >= 0
    again = LockRecord.parse(record.to_json(), tenant="acme", key=KEY)
    assert again == record


@FUZZ
@given(body=damaged_locks())
@example(body=json.dumps({**VALID_LOCK, "ttl_seconds": math.nan}).encode())
@example(body=json.dumps({**VALID_LOCK, "ttl_seconds": math.inf}).encode())
@example(body=json.dumps({**VALID_LOCK, "ttl_seconds": 10**400}).encode())
@example(body=json.dumps({**VALID_LOCK, "generation": 10**400}).encode())
@example(body=b"[" * 3000 + b"]" * 3000)
@example(
    body=json.dumps(
        {**VALID_LOCK, "snapshot": {**VALID_LOCK["snapshot"], "size": math.inf}}
    ).encode()
)
@example(
    body=json.dumps(
        {
            **VALID_LOCK,
            "snapshot": {
                **VALID_LOCK["snapshot"],
                "key": "tenants/acme/snapshots/../../other/snapshots/x.sqlite3",
            },
        }
    ).encode()
)
def test_a_damaged_lock_is_refused_by_name_or_is_a_record_tenantdb_can_trust(
    body: bytes,
) -> None:
    outcome = parse_or_refusal(body)
    if isinstance(outcome, LockFileCorruptError):
        assert outcome.key == KEY
        assert KEY in str(outcome)
        assert len(str(outcome)) < 300
    else:
        assert_trustworthy(outcome)


def parse_or_refusal(body: bytes) -> LockRecord | LockFileCorruptError:
    """The parsed record, or the LockFileCorruptError (any other exception propagates)."""
    try:
        return LockRecord.parse(body, tenant="acme", key=KEY)
    except LockFileCorruptError as exc:
        return exc


DAMAGED = {
    "truncated": json.dumps(VALID_LOCK).encode()[:40],
    "wrong-types": json.dumps({**VALID_LOCK, "generation": "3", "owner": ["m1"]}).encode(),
    "unknown-format": json.dumps({**VALID_LOCK, "format": 2}).encode(),
    "huge-numbers": json.dumps({**VALID_LOCK, "ttl_seconds": 10**400}).encode(),
    "not-a-number": json.dumps({**VALID_LOCK, "ttl_seconds": math.nan}).encode(),
    "nested-garbage": json.dumps({"format": [[[{"a": [None, {}]}]]], "x": {"y": [1e300]}}).encode(),
    "not-json": b"\x00\x01 binary \xff",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
async def test_a_damaged_lock_json_is_a_clear_startup_error(s3: ProxiedS3, damage: str) -> None:
    s3.put(KEY, DAMAGED[damage])
    bucket = await s3.open(proxied=False)
    tdb = TenantDB(s3.settings("m1"), migrations=MIGRATIONS, bucket=bucket)
    with pytest.raises(LockFileCorruptError) as raised:
        await tdb.start(standby=True)
    assert raised.value.key == KEY
    assert KEY in str(raised.value)
    assert "damaged" in str(raised.value)
    assert s3.get(KEY) == DAMAGED[damage]  # refused, not "repaired"
    assert s3.keys() == [KEY]
    assert not tdb.path.exists()
    assert tdb.state == "stopped"


def test_a_server_refuses_to_start_on_a_damaged_lock_json(
    s3: ProxiedS3, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    s3.put(KEY, DAMAGED["truncated"])
    server = UvicornProcess(
        "tests.support.apps:starlette_app",
        {
            **subprocess_env,
            **s3.env(proxied=False),
            "TENANT_ID": "acme",
            "FLY_MACHINE_ID": "m1",
            "TENANTDB_DATA_DIR": str(tmp_path / "m1"),
        },
        tmp_path / "server.log",
    )
    try:
        assert server.proc.wait(30) != 0
    finally:
        server.close()
    log = server.log()
    assert f"{KEY} is damaged (not valid JSON)" in log
    assert "refusing to guess" in log
    assert s3.get(KEY) == DAMAGED["truncated"]


# -- headers, in process ---------------------------------------------------------------------

HEADER_NAMES = [
    b"fly-replay-src",
    b"fly-replay-failed",
    b"fly-replay-cache-status",
    b"fly-forwarded-port",
    b"fly-region",
    b"fly-client-ip",
    b"x-tenantdb-proxied-by",
    b"accept",
    b"content-type",
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"x-forwarded-for",
    b"cookie",
    b"upgrade",
]
header_values = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda s: s.encode("utf-8")),
    st.sampled_from(
        [
            b"instance=m2;region=ams;t=1;state=started",
            b"instance=m1",
            b"instance=../../x",
            b"instance=" + b"a" * 200,
            b"instance=m2;t=99999999999999999999999999999",
            b"hit",
            b"application/json",
            b"-1",
            b"99999999999999999999999",
            b"1048577",
            b"chunked",
            b"timeout;elapsed=12",
        ]
    ),
)
headers_strategy = st.lists(
    st.tuples(
        st.sampled_from(HEADER_NAMES[:7]) | st.sampled_from(HEADER_NAMES) | st.binary(max_size=20),
        header_values,
    ),
    max_size=6,
)
paths = st.sampled_from(
    ["/customers/acme", "/customers/beta", "/customers/nobody", "/customers/ACME", "/healthz"]
)


class Recorded:
    """Bucket keys and routing lookups the middleware made, to check they were all valid."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.located: list[str] = []


@pytest.fixture(scope="module")
def recorded() -> Iterator[Recorded]:
    spy = Recorded()
    patch = pytest.MonkeyPatch()
    for name in ("get", "put", "head", "delete", "download_file", "upload_file"):
        original = getattr(LocalBucket, name)

        def recording(self: LocalBucket, key: str, *a: Any, _o: Any = original, **k: Any) -> Any:
            spy.keys.append(key)
            return _o(self, key, *a, **k)

        patch.setattr(LocalBucket, name, recording)
    original_locate = Router.locate

    async def locate(self: Router, tenant: str, **kwargs: Any) -> Any:
        spy.located.append(tenant)
        return await original_locate(self, tenant, **kwargs)

    patch.setattr(Router, "locate", locate)
    yield spy
    patch.undo()


@pytest.fixture(scope="module")
def dns() -> Iterator[DevDNSServer]:
    server = DevDNSServer()
    with server.run_in_thread():
        yield server


@pytest.fixture(scope="module", params=["routing-off", "routing-on"])
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    recorded: Recorded,
    dns: DevDNSServer,
) -> Iterator[LiveASGI]:
    """The counter demo for tenant acme, started; with routing, tenant beta is on m2."""
    root = tmp_path_factory.mktemp(request.param)
    extra: dict[str, Any] = {}
    if request.param == "routing-on":
        dns.set_machine("m2", {"customer_id": "beta"})
        extra["dns_server"] = dns.address
    app = create_app(settings=local_acme_settings(root, **extra))
    live = LiveASGI(app).start()
    yield live
    live.close()


def check_answer(path: str, answer: Answer) -> None:
    assert answer.error is None, repr(answer.error)
    assert answer.status != 500, answer.body
    if answer.status >= 500:
        # Only deliberate "unavailable, retry" answers, with a readable reason.
        assert answer.status == 503, answer.body
        assert answer.headers.get("retry-after"), answer.headers
        assert b"retry" in answer.body
    if path == "/customers/acme":
        assert answer.status == 200, answer.body  # this machine's tenant is always served
    if answer.status == 200 and path.startswith("/customers/"):
        assert b"acme" in answer.body  # and only this machine's tenant


@FUZZ
@given(
    path=paths,
    headers=headers_strategy,
    method=st.sampled_from(["GET"] * 6 + ["POST", "PUT", "DELETE", "OPTIONS", "BREW", "get"]),
    query=st.binary(max_size=40),
    body=st.binary(max_size=100),
)
@example(
    path="/customers/beta",
    headers=[(b"fly-replay-src", b"instance=m2")],
    method="GET",
    query=b"",
    body=b"",
)
@example(
    path="/customers/beta",
    headers=[(b"fly-replay-failed", b"\xff\x00")],
    method="GET",
    query=b"",
    body=b"",
)
@example(
    path="/customers/acme",
    headers=[(b"fly-replay-cache-status", b"hit")],
    method="GET",
    query=b"\xff",
    body=b"",
)
def test_headers_never_make_tenantdb_answer_500(
    live: LiveASGI,
    recorded: Recorded,
    path: str,
    headers: list[tuple[bytes, bytes]],
    method: str,
    query: bytes,
    body: bytes,
) -> None:
    recorded.keys.clear()
    recorded.located.clear()
    answer = live.request(path, method=method, headers=headers, query=query, body=body)
    event(f"{path} -> {answer.status}")
    if method != "GET" and path == "/customers/acme":
        # The demo's route takes GET only: Starlette answers 405 for the app.
        assert answer.status == 405, answer.body
        return
    check_answer(path, answer)
    for key in recorded.keys:
        assert validate_tenant(key.split("/")[1])
    for tenant in recorded.located:
        assert validate_tenant(tenant) == tenant


def middleware_of(live: LiveASGI) -> TenantDBMiddleware:
    """The TenantDBMiddleware inside the demo app's (already built) middleware stack."""
    layer: Any = live.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(layer, TenantDBMiddleware):
        layer = layer.app
    return layer


@FUZZ
@given(tenant=tenant_like.filter(lambda t: DNS_LABEL.fullmatch(t) is None))
def test_the_router_refuses_an_invalid_id_before_any_lookup(
    live: LiveASGI, recorded: Recorded, dns: DevDNSServer, tenant: str
) -> None:
    router = middleware_of(live).router
    if not router.enabled:
        return
    keys, queries = len(recorded.keys), dns.query_count()
    with pytest.raises(InvalidTenantError):
        live.run(router.locate(tenant, use_cache=False))
    # No lock.json key was made from it (the machine's own log shipping may write meanwhile).
    assert [key for key in recorded.keys[keys:] if not key.startswith("tenants/acme/")] == []
    assert dns.query_count() == queries  # and no DNS question was asked
