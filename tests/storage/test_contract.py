"""The bucket contract: every test here runs on the local bucket and on S3 (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tenantdb.config import Secret, Settings
from tenantdb.errors import (
    BucketConfigurationError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
)
from tenantdb.storage import Bucket, LocalBucket, ObjectInfo, open_bucket
from tenantdb.storage.s3 import S3Bucket
from tests.support.s3_server import s3_client

MiB = 1 << 20
# Bigger than the test multipart threshold (6 MiB) and not a multiple of the part size,
# so S3 uploads it in three parts, the last one short, and downloads it in three ranges.
LARGE = 13 * MiB + 12345


def write_file(path: Path, size: int) -> bytes:
    """Write ``size`` random bytes to ``path`` and return them."""
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def assert_fresh(info: ObjectInfo) -> None:
    """The info carries the server's clock, and the object was written just now by it."""
    assert info.server_date is not None
    assert info.server_date.tzinfo is not None
    assert info.last_modified.tzinfo is not None
    assert info.server_age is not None
    # Second resolution on S3: the write may look up to a second "in the future".
    assert -2 <= info.server_age < 60
    assert abs(info.server_date - datetime.now(UTC)) < timedelta(minutes=5)


async def test_small_object_round_trip(bucket: Bucket) -> None:
    written = await bucket.put("t/small.json", b'{"hello": "world"}')
    read = await bucket.get("t/small.json")
    assert read.body == b'{"hello": "world"}'
    assert read.info.etag == written.etag
    assert read.info.size == written.size == 18
    assert read.info.key == written.key == "t/small.json"
    head = await bucket.head("t/small.json")
    assert (head.etag, head.size) == (written.etag, 18)


async def test_empty_object_round_trip(bucket: Bucket) -> None:
    await bucket.put("t/empty", b"")
    assert (await bucket.get("t/empty")).body == b""
    assert (await bucket.head("t/empty")).size == 0


async def test_server_date_present_on_every_answer(bucket: Bucket) -> None:
    assert_fresh(await bucket.put("t/dated", b"x"))
    assert_fresh((await bucket.get("t/dated")).info)
    assert_fresh(await bucket.head("t/dated"))
    (listed,) = await bucket.list("t/")
    assert_fresh(listed)


async def test_missing_object_is_not_found(bucket: Bucket, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError) as raised:
        await bucket.get("t/missing")
    assert not isinstance(raised.value, PreconditionFailedError)
    assert "t/missing" in str(raised.value)
    assert raised.value.key == "t/missing"
    with pytest.raises(ObjectNotFoundError):
        await bucket.head("t/missing")
    with pytest.raises(ObjectNotFoundError):
        await bucket.download_file("t/missing", tmp_path / "out")


async def test_conditional_get_answers_none_while_the_etag_holds(bucket: Bucket) -> None:
    first = await bucket.put("t/lock.json", b'{"seq": 1}')
    assert await bucket.get_if_changed("t/lock.json", first.etag) is None
    assert await bucket.get_if_changed("t/lock.json", first.etag, max_size=64) is None
    second = await bucket.put("t/lock.json", b'{"seq": 2}', if_match=first.etag)
    changed = await bucket.get_if_changed("t/lock.json", first.etag)
    assert changed is not None
    assert changed.body == b'{"seq": 2}'
    assert changed.info.etag == second.etag
    assert_fresh(changed.info)
    assert await bucket.get_if_changed("t/lock.json", second.etag) is None
    with pytest.raises(ObjectTooLargeError):
        await bucket.get_if_changed("t/lock.json", first.etag, max_size=4)
    await bucket.delete("t/lock.json")
    with pytest.raises(ObjectNotFoundError):
        await bucket.get_if_changed("t/lock.json", second.etag)


async def test_get_with_a_size_limit(bucket: Bucket) -> None:
    await bucket.put("t/lock.json", b"0123456789")
    assert (await bucket.get("t/lock.json", max_size=10)).body == b"0123456789"
    assert (await bucket.get("t/lock.json", max_size=1000)).body == b"0123456789"
    with pytest.raises(ObjectTooLargeError) as raised:
        await bucket.get("t/lock.json", max_size=9)
    assert (raised.value.key, raised.value.size, raised.value.operation) == (
        "t/lock.json",
        10,
        "get",
    )
    for part in ("t/lock.json", "10 bytes", "9-byte"):
        assert part in str(raised.value)
    await bucket.put("t/empty", b"")
    assert (await bucket.get("t/empty", max_size=0)).body == b""
    with pytest.raises(ObjectNotFoundError):
        await bucket.get("t/missing", max_size=10)


def pending_uploads(bucket: Bucket, key: str) -> list[str]:
    """The upload ids of the multipart uploads of ``key`` still in progress (S3 only)."""
    if not isinstance(bucket, S3Bucket):
        return []
    assert bucket.endpoint_url is not None
    client = s3_client(bucket.endpoint_url)
    try:
        page = client.list_multipart_uploads(Bucket=bucket.name, Prefix=key)
    finally:
        client.close()
    return [upload["UploadId"] for upload in page.get("Uploads", []) if upload["Key"] == key]


@pytest.mark.parametrize("size", [1000, LARGE], ids=["small", "multipart"])
async def test_create_only_upload(bucket: Bucket, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.bin"
    data = write_file(src, size)
    first = await bucket.upload_file("t/snap", src, if_none_match="*")
    write_file(src, size)
    with pytest.raises(PreconditionFailedError) as raised:
        await bucket.upload_file("t/snap", src, if_none_match="*")
    assert not isinstance(raised.value, ObjectNotFoundError)
    assert (raised.value.key, raised.value.operation) == ("t/snap", "upload")
    dest = tmp_path / "dest.bin"
    assert (await bucket.download_file("t/snap", dest)).etag == first.etag
    assert dest.read_bytes() == data
    assert pending_uploads(bucket, "t/snap") == []


async def test_create_only_put(bucket: Bucket) -> None:
    first = await bucket.put("t/lock.json", b"first", if_none_match="*")
    with pytest.raises(PreconditionFailedError) as raised:
        await bucket.put("t/lock.json", b"second", if_none_match="*")
    assert not isinstance(raised.value, ObjectNotFoundError)
    assert raised.value.key == "t/lock.json"
    current = await bucket.get("t/lock.json")
    assert (current.body, current.info.etag) == (b"first", first.etag)


async def test_if_match_put_is_compare_and_swap(bucket: Bucket) -> None:
    v1 = await bucket.put("t/cas", b"v1")
    v2 = await bucket.put("t/cas", b"v2", if_match=v1.etag)
    with pytest.raises(PreconditionFailedError):
        await bucket.put("t/cas", b"stale", if_match=v1.etag)
    current = await bucket.get("t/cas")
    assert (current.body, current.info.etag) == (b"v2", v2.etag)
    # If-Match on an object that does not exist is a failed condition, not a 404.
    with pytest.raises(PreconditionFailedError):
        await bucket.put("t/nothing-here", b"x", if_match=v2.etag)
    with pytest.raises(ObjectNotFoundError):
        await bucket.head("t/nothing-here")


async def test_if_match_delete(bucket: Bucket) -> None:
    v1 = await bucket.put("t/del", b"v1")
    v2 = await bucket.put("t/del", b"v2")
    with pytest.raises(PreconditionFailedError):
        await bucket.delete("t/del", if_match=v1.etag)
    assert (await bucket.get("t/del")).body == b"v2"
    await bucket.delete("t/del", if_match=v2.etag)
    with pytest.raises(ObjectNotFoundError):
        await bucket.head("t/del")
    with pytest.raises(PreconditionFailedError):
        await bucket.delete("t/del", if_match=v2.etag)


async def test_deleting_a_missing_object_is_not_an_error(bucket: Bucket) -> None:
    await bucket.delete("t/never-existed")
    await bucket.put("t/twice", b"x")
    await bucket.delete("t/twice")
    await bucket.delete("t/twice")
    assert await bucket.list("t/") == []


async def test_etag_changes_on_every_write(bucket: Bucket) -> None:
    # Each write has new bytes, as lock.json writes do (its seq counter): S3 ETags are
    # content hashes, so identical bytes may legitimately keep the same ETag there.
    etags = [(await bucket.put("t/seq", f'{{"seq": {n}}}'.encode())).etag for n in range(6)]
    assert len(set(etags)) == len(etags)
    assert (await bucket.head("t/seq")).etag == etags[-1]


async def test_list_by_prefix(bucket: Bucket) -> None:
    bodies = {"a/1": b"1", "a/2": b"22", "a/sub/3": b"333", "ab": b"4", "b/1": b"5"}
    written = {key: await bucket.put(key, body) for key, body in bodies.items()}

    listed = await bucket.list("a/")
    assert [info.key for info in listed] == ["a/1", "a/2", "a/sub/3"]
    for info in listed:
        assert info.etag == written[info.key].etag
        assert info.size == len(bodies[info.key])
        assert info.server_date is not None
    assert [info.key for info in await bucket.list("a")] == ["a/1", "a/2", "a/sub/3", "ab"]
    assert [info.key for info in await bucket.list("")] == sorted(bodies)
    assert await bucket.list("zzz/") == []


async def test_list_paginates(s3_bucket: S3Bucket) -> None:
    s3_bucket._list_page_size = 2  # force several ListObjectsV2 pages for five keys
    keys = [f"p/{n}" for n in range(5)]
    for key in reversed(keys):
        await s3_bucket.put(key, key.encode())
    assert [info.key for info in await s3_bucket.list("p/")] == keys


@pytest.mark.parametrize("size", [0, 1, 100_000, LARGE], ids=["empty", "1B", "100kB", "large"])
async def test_file_round_trip(bucket: Bucket, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.bin"
    data = write_file(src, size)
    uploaded = await bucket.upload_file("t/file", src)
    assert uploaded.size == size
    assert uploaded.key == "t/file"

    dest = tmp_path / "dest.bin"
    dest.write_bytes(b"stale bytes that must be truncated" * 1000)
    downloaded = await bucket.download_file("t/file", dest)
    assert dest.read_bytes() == data
    assert (downloaded.etag, downloaded.size) == (uploaded.etag, size)
    head = await bucket.head("t/file")
    assert (head.etag, head.size) == (uploaded.etag, size)
    if bucket.kind == "s3" and size == LARGE:
        # A multipart ETag is "<md5 of part md5s>-<part count>": proof it went multipart.
        assert uploaded.etag.strip('"').endswith("-3")


async def test_upload_replaces_and_changes_etag(bucket: Bucket, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    write_file(src, 1000)
    first = await bucket.upload_file("t/replaced", src)
    data = write_file(src, 2000)
    second = await bucket.upload_file("t/replaced", src)
    assert first.etag != second.etag
    assert (await bucket.get("t/replaced")).body == data


INVALID_KEYS = ["", "/absolute", "a/../b", "../escape", "dir/", "nul\x00byte", "a/./b", "a//b"]


@pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
async def test_invalid_keys_are_refused(bucket: Bucket, tmp_path: Path, key: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    attempts = [
        bucket.get(key),
        bucket.head(key),
        bucket.put(key, b"x"),
        bucket.delete(key),
        bucket.upload_file(key, src),
        bucket.download_file(key, tmp_path / "out"),
    ]
    for attempt in attempts:
        with pytest.raises(BucketConfigurationError):
            await attempt
    assert await bucket.list("") == []


async def test_errors_are_storage_errors_with_key_and_operation(bucket: Bucket) -> None:
    with pytest.raises(StorageError) as raised:
        await bucket.put("t/op", b"x", if_match='"0123456789abcdef0123456789abcdef"')
    assert raised.value.key == "t/op"
    assert raised.value.operation == "put"


def test_open_bucket_picks_the_backend(tmp_path: Path) -> None:
    local = open_bucket(Settings(local_bucket_dir=tmp_path / "b"))
    assert isinstance(local, LocalBucket)
    assert local.kind == "local"
    remote = open_bucket(
        Settings(
            bucket_name="tenants",
            endpoint_url="https://fly.storage.tigris.dev",
            region="auto",
            access_key_id="tid_key",
            secret_access_key=Secret("tsec_do_not_print"),
        )
    )
    assert isinstance(remote, S3Bucket)
    assert remote.kind == "s3"
    assert (remote.name, remote.region, remote.tigris) == ("tenants", "auto", True)
    assert "tsec_do_not_print" not in repr(remote)


def test_importing_tenantdb_does_not_import_the_s3_sdk() -> None:
    code = (
        "import sys, tenantdb, tenantdb.storage\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aioboto3', 'aiobotocore', 'botocore', 'boto3'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
