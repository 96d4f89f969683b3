"""tenantdb.crypto: keyrings, wrapped data keys and the sealed format, byte by byte."""

from __future__ import annotations

import base64
import copy
import dataclasses
import os
import pickle
from pathlib import Path

import pytest

from tenantdb.config import Settings
from tenantdb.crypto import (
    CHUNK_SIZE,
    HEADER_SIZE,
    Keyring,
    ObjectContext,
    Refused,
    open_bytes,
    open_file_in_place,
    opened_size,
    parse_keyring,
    rewrap_data_key,
    seal_bytes,
    seal_file,
    sealed_key_number,
    sealed_range,
    sealed_size,
    unwrap_data_key,
    wrap_data_key,
)
from tenantdb.errors import ConfigurationError

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
CTX = ObjectContext("acme", "tenants/acme/log/00000001/000000000001.seg", 1, "segment")
SIZES = [0, 1, 1000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 17]


def data_key(tenant: str = "acme"):  # type: ignore[no-untyped-def]
    keyring = parse_keyring(f"k1:{KEY_A}", variable="TENANTDB_ENCRYPTION_KEY")
    return wrap_data_key(keyring, tenant, f"tenants/{tenant}/key.json")[0]


@pytest.mark.parametrize("size", SIZES)
def test_bytes_and_files_round_trip_at_every_chunk_boundary(tmp_path: Path, size: int) -> None:
    key, plain = data_key(), os.urandom(size)
    sealed = seal_bytes(key, CTX, plain)
    # An odd overhead: a sealed SQLite file (whole pages, an even size) has an odd size.
    assert len(sealed) == sealed_size(size)
    assert (len(sealed) - size) % 2 == 1
    assert opened_size(len(sealed)) == size
    assert open_bytes(key, CTX, sealed) == plain
    src, dest = tmp_path / "plain", tmp_path / "sealed"
    src.write_bytes(plain)
    seal_file(key, CTX, src, dest)
    assert open_file_in_place(key, CTX, dest) == size
    assert dest.read_bytes() == plain


def test_the_same_segment_for_the_same_place_seals_to_the_same_bytes() -> None:
    key = data_key()
    once, again = seal_bytes(key, CTX, b"segment"), seal_bytes(key, CTX, b"segment")
    assert once == again  # a retried upload, or one from lock.json's inline copy
    other = seal_bytes(key, CTX, b"segmenT")
    elsewhere = seal_bytes(key, dataclasses.replace(CTX, generation=2), b"segment")
    nonces = {body[15:23] for body in (once, other, elsewhere)}
    assert len(nonces) == 3
    assert seal_bytes(data_key(), CTX, b"segment") != once  # another data key


def test_a_plaintext_range_maps_to_the_sealed_range_of_its_whole_chunks() -> None:
    step = CHUNK_SIZE + 16
    assert sealed_range(0, 10) == (HEADER_SIZE, HEADER_SIZE + step)
    assert sealed_range(CHUNK_SIZE - 1, CHUNK_SIZE + 1) == (HEADER_SIZE, HEADER_SIZE + 2 * step)
    assert sealed_range(2 * CHUNK_SIZE, 3 * CHUNK_SIZE) == (
        HEADER_SIZE + 2 * step,
        HEADER_SIZE + 3 * step,
    )


def test_sizes_no_sealed_object_can_have_are_not_opened() -> None:
    assert opened_size(HEADER_SIZE + 15) is None
    assert opened_size(HEADER_SIZE + CHUNK_SIZE + 16 + 5) is None  # a second chunk of no bytes


@pytest.mark.parametrize("position", [0, 9, 12, HEADER_SIZE - 1, HEADER_SIZE, -1])
def test_a_flipped_byte_anywhere_is_refused(position: int) -> None:
    key = data_key()
    sealed = bytearray(seal_bytes(key, CTX, b"marker " * 100))
    sealed[position] ^= 0x01
    with pytest.raises(Refused):
        open_bytes(key, CTX, bytes(sealed))


def test_a_truncated_or_extended_object_is_refused() -> None:
    key = data_key()
    sealed = seal_bytes(key, CTX, os.urandom(2 * CHUNK_SIZE + 5))
    chunk = CHUNK_SIZE + 16
    for bad in (sealed[:-1], sealed + b"\0", sealed[: HEADER_SIZE + chunk]):
        with pytest.raises(Refused, match="do not hold"):
            open_bytes(key, CTX, bad)


@pytest.mark.parametrize(
    "elsewhere",
    [
        dataclasses.replace(CTX, tenant="other"),
        dataclasses.replace(CTX, key="tenants/acme/log/00000001/000000000002.seg"),
        dataclasses.replace(CTX, generation=2),
        dataclasses.replace(CTX, kind="snapshot"),
    ],
)
def test_an_object_moved_to_another_tenant_key_or_generation_is_refused(
    elsewhere: ObjectContext,
) -> None:
    key = data_key()
    with pytest.raises(Refused):
        open_bytes(key, elsewhere, seal_bytes(key, CTX, b"marker"))


def test_another_tenants_data_key_does_not_open_it() -> None:
    with pytest.raises(Refused, match="fails authentication"):
        open_bytes(data_key("other"), CTX, seal_bytes(data_key(), CTX, b"marker"))


def test_chunks_swapped_within_an_object_are_refused() -> None:
    key = data_key()
    sealed = seal_bytes(key, CTX, b"a" * CHUNK_SIZE + b"b" * CHUNK_SIZE)
    chunk = CHUNK_SIZE + 16
    first, second = sealed[HEADER_SIZE : HEADER_SIZE + chunk], sealed[HEADER_SIZE + chunk :]
    with pytest.raises(Refused, match="chunk 0"):
        open_bytes(key, CTX, sealed[:HEADER_SIZE] + second + first)


def test_the_keyring_syntax_ids_first_wraps_and_all_unwrap() -> None:
    old = parse_keyring(f"k1:{KEY_A}", variable="V")
    raw, wrapped = wrap_data_key(old, "acme", "tenants/acme/key.json")
    assert wrapped.kek_id == "k1"
    both = parse_keyring(f" k2:{KEY_B},\n k1:{KEY_A} ", variable="V")
    assert both.ids == ("k2", "k1")
    assert both.wrapping_id == "k2"
    opened = unwrap_data_key(both, "acme", "tenants/acme/key.json", wrapped)
    assert open_bytes(opened, CTX, seal_bytes(raw, CTX, b"x")) == b"x"
    rewrapped = rewrap_data_key(both, "acme", "tenants/acme/key.json", wrapped, since="t")
    assert rewrapped.kek_id == "k2"
    new_only = parse_keyring(f"k2:{KEY_B}", variable="V")
    again = unwrap_data_key(new_only, "acme", "tenants/acme/key.json", rewrapped)
    assert open_bytes(again, CTX, seal_bytes(raw, CTX, b"y")) == b"y"
    assert parse_keyring(KEY_A, variable="V").ids == ("default",)


def test_a_data_key_unwraps_only_for_its_tenant_and_place_and_key_id() -> None:
    keyring = parse_keyring(f"k1:{KEY_A}", variable="V")
    _, wrapped = wrap_data_key(keyring, "acme", "tenants/acme/key.json")
    with pytest.raises(Refused, match="key id 'k1'"):
        unwrap_data_key(keyring, "other", "tenants/other/key.json", wrapped)
    wrong = parse_keyring(f"k1:{KEY_B}", variable="V")
    with pytest.raises(Refused, match="does not open with key id 'k1'"):
        unwrap_data_key(wrong, "acme", "tenants/acme/key.json", wrapped)
    with pytest.raises(Refused, match="key id 'k1', which is not configured"):
        unwrap_data_key(parse_keyring(f"k9:{KEY_A}", variable="V"), "acme", "x", wrapped)


def test_a_sealed_object_names_its_data_key_and_opens_only_with_that_one() -> None:
    keyring = parse_keyring(f"k1:{KEY_A}", variable="V")
    first, _ = wrap_data_key(keyring, "acme", "tenants/acme/key.json")
    second, _ = wrap_data_key(keyring, "acme", "tenants/acme/key.json", number=2, since="t")
    sealed = seal_bytes(second, CTX, b"x")
    assert sealed_key_number(sealed[:HEADER_SIZE]) == 2
    assert sealed_key_number(seal_bytes(first, CTX, b"x")) == 1
    assert open_bytes(second, CTX, sealed) == b"x"
    with pytest.raises(Refused, match="sealed with data key 2, not 1"):
        open_bytes(first, CTX, sealed)
    # A header renumbered to name the key that would open it fails its tag.
    renumbered = sealed[:10] + (1).to_bytes(4, "big") + sealed[14:]
    with pytest.raises(Refused, match="fails authentication"):
        open_bytes(first, CTX, renumbered)
    with pytest.raises(Refused, match="too short"):
        sealed_key_number(sealed[: HEADER_SIZE - 1])


def test_a_data_keys_number_is_bound_into_its_wrapping() -> None:
    keyring = parse_keyring(f"k1:{KEY_A}", variable="V")
    _, wrapped = wrap_data_key(keyring, "acme", "tenants/acme/key.json", number=2, since="t")
    opened = unwrap_data_key(keyring, "acme", "tenants/acme/key.json", wrapped)
    assert opened.number == 2
    for forged in (dataclasses.replace(wrapped, number=3), dataclasses.replace(wrapped, number=1)):
        with pytest.raises(Refused, match="does not open with key id 'k1'"):
            unwrap_data_key(keyring, "acme", "tenants/acme/key.json", forged)
    rewrapped = rewrap_data_key(keyring, "acme", "tenants/acme/key.json", wrapped, since="t")
    assert rewrapped.number == 2
    assert unwrap_data_key(keyring, "acme", "tenants/acme/key.json", rewrapped).number == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("k1:notbase64!", "key 'k1' is not the base64 of 32 bytes"),
        (f"k1:{base64.b64encode(b'short').decode()}", "key 'k1' is not the base64"),
        (f"bad/id:{KEY_A}", "key 1 has an id"),
        (f"k1:{KEY_A},k1:{KEY_B}", "appears twice"),
    ],
)
def test_a_bad_keyring_is_one_line_naming_the_variable_never_the_key(
    text: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        Settings.from_env({"TENANTDB_ENCRYPTION_KEY": text})
    assert "TENANTDB_ENCRYPTION_KEY" in str(raised.value)
    assert "\n" not in str(raised.value)
    for secret in (KEY_A, KEY_B, "notbase64"):
        assert secret not in str(raised.value)


def test_the_key_file_is_read_and_both_sources_at_once_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"k2:{KEY_B}\nk1:{KEY_A}\n")
    settings = Settings.from_env({"TENANTDB_ENCRYPTION_KEY_FILE": str(path)})
    assert settings.encryption_keys is not None
    assert settings.encryption_keys.ids == ("k2", "k1")
    with pytest.raises(ConfigurationError, match="both set"):
        Settings.from_env(
            {"TENANTDB_ENCRYPTION_KEY_FILE": str(path), "TENANTDB_ENCRYPTION_KEY": KEY_A}
        )
    with pytest.raises(ConfigurationError, match="cannot be read"):
        Settings.from_env({"TENANTDB_ENCRYPTION_KEY_FILE": str(tmp_path / "missing")})
    assert Settings.from_env({}).encryption_keys is None


def test_keys_never_show_in_reprs_copies_or_pickles() -> None:
    settings = Settings.from_env({"TENANTDB_ENCRYPTION_KEY": f"k2:{KEY_B},k1:{KEY_A}"})
    keyring = settings.encryption_keys
    assert isinstance(keyring, Keyring)
    raw_hex = [base64.b64decode(k).hex() for k in (KEY_A, KEY_B)]
    shown = [repr(settings), str(settings), repr(keyring), str(keyring), repr(data_key())]
    for text in shown:
        for secret in (KEY_A, KEY_B, *raw_hex):
            assert secret not in text
    assert "k2" in repr(keyring)
    assert copy.deepcopy(settings).encryption_keys is keyring
    assert dataclasses.replace(settings, port=1).encryption_keys is keyring
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(keyring)
