"""VERP return paths and signed Message-IDs: round trip, case folding, length bound, and
forged or damaged tokens."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.bounce.verp import (
    MAX_LOCAL_PART_CHARS,
    VerpToken,
    decode_message_id,
    decode_return_path,
    encode_message_id,
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


# --- Message-IDs ----------------------------------------------------------------------------

#: RFC 5322 msg-id as the sender writes it: "<" dot-atom-text "@" dot-atom-text ">".
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
MSG_ID = re.compile(rf"\A<{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*>\Z")
BOUNCE = "bounce.example.com"


@pytest.mark.parametrize(
    "message_id",
    [ULID, HEX, "ab", "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a", "m1", "Order_42-b", "x" * 32, "Z" * 26],
)
@pytest.mark.parametrize("index", [0, 1, 127, 128, 2**32 - 1])
def test_message_id_round_trip(message_id: str, index: int) -> None:
    value = encode_message_id(message_id, index, "acme", "acme.example", BOUNCE, KEY)
    assert MSG_ID.match(value), value
    local, domain = value[1:-1].split("@")
    assert local.startswith("b-") and local.endswith("-acme") and domain == "acme.example"
    assert decode_message_id(value, KEY) == VerpToken(message_id, index, "acme")
    assert decode_message_id(value[1:-1], KEY) == VerpToken(message_id, index, "acme")


@given(message_id=message_ids, index=indexes, tenant=tenants)
def test_every_message_id_is_a_valid_msg_id_that_names_its_tenant(
    message_id: str, index: int, tenant: str
) -> None:
    value = encode_message_id(message_id, index, tenant, "acme.example", BOUNCE, KEY)
    assert MSG_ID.match(value) and len(value) < 200
    assert decode_message_id(value, KEY) == VerpToken(message_id, index, tenant)


def test_the_tenant_is_there_even_where_a_return_path_has_no_room_for_it() -> None:
    long_tenant = "a-tenant-with-a-32-character-nam"
    value = encode_message_id("x" * 32, 2**32 - 1, long_tenant, "acme.example", BOUNCE, KEY)
    assert decode_message_id(value, KEY) == VerpToken("x" * 32, 2**32 - 1, long_tenant)
    path = encode_return_path("x" * 32, 2**32 - 1, BOUNCE, long_tenant, KEY)
    assert decode_return_path(path, KEY) == VerpToken("x" * 32, 2**32 - 1, None)


def test_each_copy_has_its_own_message_id() -> None:
    values = {
        encode_message_id(message_id, index, tenant, "acme.example", BOUNCE, KEY)
        for message_id in (ULID, HEX, "m1")
        for index in range(50)
        for tenant in ("acme", "globex")
    }
    assert len(values) == 3 * 50 * 2


@given(index=indexes, position=st.integers(3, 60), replacement=st.sampled_from("abcdefgh234567"))
def test_a_changed_message_id_tag_is_refused(index: int, position: int, replacement: str) -> None:
    value = encode_message_id(ULID, index, "acme", "acme.example", BOUNCE, KEY)
    local, domain = value[1:-1].split("@")
    if position >= len(local) or local[position] in (replacement, "-"):
        return
    forged = local[:position] + replacement + local[position + 1 :]
    assert decode_message_id(f"<{forged}@{domain}>", KEY) is None


def test_message_id_tenant_swap_removal_and_other_key_are_refused() -> None:
    value = encode_message_id(ULID, 1, "acme", "acme.example", BOUNCE, KEY)
    assert decode_message_id(value.replace("-acme@", "-evil@"), KEY) is None
    assert decode_message_id(value.replace("-acme@", "@"), KEY) is None
    assert decode_message_id(value, OTHER_KEY) is None
    assert decode_message_id(value.replace("@acme.example", "@elsewhere.example"), KEY)


def test_a_return_path_and_a_message_id_cannot_stand_in_for_each_other() -> None:
    path = encode_return_path(ULID, 1, BOUNCE, "acme", KEY)
    value = encode_message_id(ULID, 1, "acme", BOUNCE, BOUNCE, KEY)
    assert decode_return_path(path, KEY) and decode_message_id(value, KEY)
    assert decode_message_id(f"<{path}>", KEY) is None
    assert decode_return_path(value[1:-1], KEY) is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "<>",
        f"<{HEX}.0@acme.example>",  # what the sender wrote before Message-IDs were signed
        f"{ULID}.3@acme.example",
        "<b-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-acme@acme.example>",
        "<b-" + "a" * 120 + "@acme.example>",
        "<b-aaaa-acme@>",
        "<CAF=abc123@mail.gmail.example>",
    ],
)
def test_unsigned_or_malformed_message_ids_give_none(value: str) -> None:
    assert decode_message_id(value, KEY) is None


@given(st.text(max_size=120) | st.from_regex(r"\A<b-[a-z2-7]{20,61}-[a-z0-9-]{1,12}@x\.example>\Z"))
def test_arbitrary_or_guessed_message_ids_are_refused(value: str) -> None:
    assert decode_message_id(value, KEY) is None


@pytest.mark.parametrize(
    ("from_domain", "right"),
    [
        ("acme.example", "acme.example"),
        ("Acme.EXAMPLE", "acme.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("straße.example", "xn--strae-oqa.example"),  # IDNA 2008, not "strasse.example"
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        # no ASCII host name: the bounce domain
        ("", BOUNCE),
        ("[192.0.2.1]", BOUNCE),
        ("under_score.example", BOUNCE),
        ("-leading.example", BOUNCE),
        ("a..b.example", BOUNCE),
        ("acme.example.", BOUNCE),
        ("☃\u200d.example", BOUNCE),
    ],
)
def test_the_right_hand_side_is_the_from_domain_in_ascii(from_domain: str, right: str) -> None:
    value = encode_message_id(HEX, 0, "acme", from_domain, BOUNCE.upper(), KEY)
    assert MSG_ID.match(value) and value.endswith(f"@{right}>")
    assert decode_message_id(value, KEY) == VerpToken(HEX, 0, "acme")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("x" * 33, 0, "acme", "a.example", "b.example", KEY), "message id"),
        ((ULID, -1, "acme", "a.example", "b.example", KEY), "recipient index"),
        ((ULID, 2**32, "acme", "a.example", "b.example", KEY), "recipient index"),
        ((ULID, 0, "Acme", "a.example", "b.example", KEY), "tenant"),
        ((ULID, 0, "acme", "a_b.example", "not a domain", KEY), "bounce domain"),
        ((ULID, 0, "acme", "a.example", "b.example", b"short"), "key"),
    ],
)
def test_bad_message_id_input_raises(
    args: tuple[str, int, str, str, str, bytes], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_message_id(*args)
    with pytest.raises(ValueError, match="key"):
        decode_message_id("<b-aaaa-acme@x.example>", b"short")
