"""VERP return paths: round trip, case folding, length bound, and forged or damaged tokens."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.bounce.verp import (
    MAX_LOCAL_PART_CHARS,
    VerpToken,
    decode_return_path,
    encode_return_path,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
ULID = "01J9Z6Q3V4T8K2M5N7P9R1S3TA"
HEX = "0123456789abcdef0123456789abcdef"

message_ids = st.one_of(
    st.from_regex(r"\A[0-7][0-9A-HJKMNP-TV-Z]{25}\Z"),  # ULID
    st.from_regex(r"\A(?:[0-9a-f]{2}){1,16}\Z"),  # lower-case hex
    st.from_regex(r"\A[A-Za-z0-9_-]{1,32}\Z"),  # anything else allowed
)
tenants = st.from_regex(r"\A[a-z0-9-]{1,32}\Z")
indexes = st.integers(0, 2**32 - 1)


def test_shape() -> None:
    address = encode_return_path(ULID, 3, "Bounce.Example.COM", "acme", KEY)
    local, domain = address.split("@")
    assert domain == "bounce.example.com"
    assert local.startswith("b-") and local.endswith("-acme")
    assert local == local.lower() and len(local) <= MAX_LOCAL_PART_CHARS
    assert decode_return_path(address, KEY) == VerpToken(ULID, 3, "acme")


@given(message_id=message_ids, index=indexes, tenant=tenants)
def test_round_trip_within_64_chars(message_id: str, index: int, tenant: str) -> None:
    address = encode_return_path(message_id, index, "bounce.example.com", tenant, KEY)
    assert len(address.split("@")[0]) <= MAX_LOCAL_PART_CHARS
    token = decode_return_path(address, KEY)
    assert token is not None
    assert (token.message_id, token.recipient_index) == (message_id, index)
    assert token.tenant in (tenant, None)


def test_tenant_is_left_out_when_it_does_not_fit() -> None:
    long_tenant = "a-tenant-with-a-32-character-nam"
    address = encode_return_path(HEX, 2**32 - 1, "b.example", long_tenant, KEY)
    assert len(address.split("@")[0]) <= MAX_LOCAL_PART_CHARS
    assert decode_return_path(address, KEY) == VerpToken(HEX, 2**32 - 1, None)
    short = encode_return_path(ULID, 0, "b.example", "acme", KEY)
    assert decode_return_path(short, KEY) == VerpToken(ULID, 0, "acme")


@given(message_id=message_ids, index=indexes)
def test_case_folding_by_relays_is_harmless(message_id: str, index: int) -> None:
    address = encode_return_path(message_id, index, "bounce.example.com", "acme", KEY)
    for variant in (address.upper(), address.title(), f"<{address.upper()}>"):
        token = decode_return_path(variant, KEY)
        assert token is not None and token.message_id == message_id


def test_wrong_key_is_rejected() -> None:
    address = encode_return_path(ULID, 1, "bounce.example.com", "acme", KEY)
    assert decode_return_path(address, OTHER_KEY) is None


@given(index=indexes, position=st.integers(2, 60), replacement=st.sampled_from("abcdefgh234567"))
def test_any_changed_character_is_rejected(index: int, position: int, replacement: str) -> None:
    address = encode_return_path(ULID, index, "bounce.example.com", "acme", KEY)
    local, domain = address.split("@")
    if position >= len(local) or local[position] == replacement or local[position] == "-":
        return
    forged = local[:position] + replacement + local[position + 1 :]
    token = decode_return_path(f"{forged}@{domain}", KEY)
    assert token is None


def test_tenant_swap_and_tenant_removal_are_rejected() -> None:
    address = encode_return_path(ULID, 1, "bounce.example.com", "acme", KEY)
    assert decode_return_path(address.replace("-acme@", "-evil@"), KEY) is None
    assert decode_return_path(address.replace("-acme@", "@"), KEY) is None


@pytest.mark.parametrize(
    "address",
    [
        "",
        "nobody@example.com",
        "b-@bounce.example.com",
        "b-abc@bounce.example.com",
        "b-!!!!@bounce.example.com",
        "b-" + "a" * 70 + "@bounce.example.com",
        "b-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-UPPER_bad@x.example",
        "b-aaaaaaaa",
    ],
)
def test_foreign_or_malformed_addresses_give_none(address: str) -> None:
    assert decode_return_path(address, KEY) is None


@given(st.text(max_size=100) | st.from_regex(r"\Ab-[a-z2-7]{10,62}(-[a-z0-9-]{1,8})?@x\.example\Z"))
def test_arbitrary_or_guessed_addresses_are_rejected(address: str) -> None:
    assert decode_return_path(address, KEY) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x" * 33, 0, "b.example", "acme", KEY), "message id"),
        (("has space", 0, "b.example", "acme", KEY), "message id"),
        ((ULID, -1, "b.example", "acme", KEY), "recipient index"),
        ((ULID, 2**32, "b.example", "acme", KEY), "recipient index"),
        ((ULID, 0, "not a domain", "acme", KEY), "bounce domain"),
        ((ULID, 0, "b.example", "Acme", KEY), "tenant"),
        ((ULID, 0, "b.example", "acme", b"short"), "key"),
    ],
)
def test_bad_input_raises(args: tuple[str, int, str, str, bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_return_path(*args)


def test_short_key_is_refused_when_decoding() -> None:
    with pytest.raises(ValueError, match="key"):
        decode_return_path("b-aaaa@x.example", b"short")
