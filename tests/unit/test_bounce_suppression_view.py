"""The suppression view's compact storage answers exactly what a dict of entries would."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.records import EventType, Suppression, SuppressionReason, suppression_key
from services.runtime import compact_table
from services.runtime.compact_table import CompactTable
from services.runtime.suppression import SuppressionView
from services.runtime.suppression_store import SuppressionStore

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def entry(address: str, tenant: str = "acme", **fields: Any) -> Suppression:
    values: dict[str, object] = {
        "tenant": tenant,
        "address": address,
        "reason": SuppressionReason.HARD_BOUNCE,
        "created_at": T0,
        "source_message_id": "0193a5c2e1f04b7d9a8c6e5f4d3c2b1a",
        "source_event": EventType.BOUNCED,
        "detail": f"550 5.1.1 <{address}>: Recipient address rejected: User unknown",
    }
    values.update(fields)
    return Suppression.model_validate(values)


def put(view: SuppressionView, e: Suppression) -> None:
    view.apply(suppression_key(e.tenant, e.address), e)


def test_an_entry_comes_back_field_for_field() -> None:
    view = SuppressionView({})
    stored = entry("Bob.Smith@Example.COM")
    put(view, stored)
    assert view.is_suppressed("acme", "Bob.Smith@example.com")
    assert view.is_suppressed("acme", "Bob.Smith@EXAMPLE.com"), "the domain is case-blind"
    assert not view.is_suppressed("acme", "bob.smith@example.com"), "the local part is not"
    assert not view.is_suppressed("globex", "Bob.Smith@example.com"), "tenants are apart"
    assert view.get("acme", "Bob.Smith@example.com") == stored
    assert len(view) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"detail": None, "source_message_id": None, "source_event": None},
        {"reason": SuppressionReason.MANUAL, "detail": "asked by phone ☎", "source_event": None},
        {"reason": SuppressionReason.UNSUBSCRIBE, "source_event": EventType.UNSUBSCRIBED},
        {"source_message_id": "not-hex_ID-7", "detail": "x" * 70_000},
        {"created_at": datetime(1999, 12, 31, 23, 59, tzinfo=UTC), "detail": ""},
    ],
)
def test_every_shape_of_entry_round_trips(fields: dict[str, Any]) -> None:
    store = SuppressionStore()
    stored = entry("carol@example.org", **fields)
    store.apply(suppression_key("acme", "carol@example.org"), stored)
    got = store.get("acme", "carol@example.org")
    assert got is not None
    if isinstance(fields.get("detail"), str) and len(str(fields["detail"])) > 60_000:
        assert got.detail is not None and str(fields["detail"]).startswith(got.detail)
        assert len(got.detail.encode()) < 65_535, "a huge detail is cut, not refused"
        got = got.model_copy(update={"detail": stored.detail})
    assert got == stored


def test_a_time_with_another_offset_is_the_same_instant() -> None:
    store = SuppressionStore()
    local = datetime(2026, 3, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    store.apply("acme/dan@example.org", entry("dan@example.org", created_at=local))
    got = store.get("acme", "dan@example.org")
    assert got is not None and got.created_at == local


def test_removal_and_replacement() -> None:
    view = SuppressionView({})
    put(view, entry("erin@example.org"))
    put(view, entry("erin@example.org", reason=SuppressionReason.COMPLAINT, detail=None))
    assert len(view) == 1
    got = view.get("acme", "erin@example.org")
    assert got is not None and got.reason is SuppressionReason.COMPLAINT
    view.apply("acme/erin@example.org", None)
    view.apply("acme/never@example.org", None)
    assert not view.is_suppressed("acme", "erin@example.org") and len(view) == 0


def test_pages_walk_a_tenant_in_address_order_while_it_changes() -> None:
    view = SuppressionView({})
    addresses = sorted(f"user{i:04d}@example.org" for i in range(0, 3000, 2))
    for address in addresses:
        put(view, entry(address))
        put(view, entry(address, tenant="globex"))
    first = view.page("acme", None, 100)
    assert [e.address for e in first] == addresses[:100]
    # Changes after the first page: a new address inside the next page, one removed from it.
    put(view, entry("user0201@example.org"))
    view.apply("acme/user0202@example.org", None)
    second = view.page("acme", first[-1].address, 100)
    expected = sorted({*addresses[100:201], "user0201@example.org"} - {"user0202@example.org"})
    assert [e.address for e in second] == expected[:100]
    assert all(e.tenant == "acme" for e in second)
    walked, cursor = [], None
    while page := view.page("acme", cursor, 333):
        walked += [e.address for e in page]
        cursor = page[-1].address
    assert walked == sorted({*addresses, "user0201@example.org"} - {"user0202@example.org"})
    assert view.page("nobody", None, 10) == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["acme", "globex"]), st.integers(0, 40), st.booleans()),
        max_size=300,
    )
)
def test_any_sequence_of_changes_matches_a_dict(ops: list[tuple[str, int, bool]]) -> None:
    store = SuppressionStore()
    model: dict[str, Suppression] = {}
    for n, (tenant, i, remove) in enumerate(ops):
        address = f"u{i}@d{i % 3}.example"
        key = suppression_key(tenant, address)
        if remove:
            store.apply(key, None)
            model.pop(key, None)
        else:
            e = entry(address, tenant, detail=f"550 5.1.1 try {n}")
            store.apply(key, e)
            model[key] = e
        if n % 37 == 0:
            store.page(tenant, None, 5)  # builds the sorted order that later changes update
    assert len(store) == len(model)
    for tenant in ("acme", "globex"):
        mine = sorted(k for k in model if k.startswith(f"{tenant}/"))
        assert store.page(tenant, None, 1000) == [model[k] for k in mine]
        assert (
            store.page(tenant, "u2@d2.example", 3)
            == [model[k] for k in mine if k > f"{tenant}/u2@d2.example"][:3]
        )


def test_the_table_survives_growth_churn_and_compaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compact_table, "COMPACT_MIN_GARBAGE_BYTES", 64)
    table = CompactTable()
    model: dict[bytes, bytes] = {}
    rng = random.Random(3)
    for n in range(20_000):
        key = f"k{rng.randrange(2000)}".encode()
        if rng.random() < 0.3:
            assert table.delete(key) == (model.pop(key, None) is not None)
        else:
            value = f"v{n}".encode() * rng.randrange(1, 4)
            table.put(key, value)
            model[key] = value
    assert table.layout > 0, "the arena was rewritten at least once"
    assert len(table) == len(model)
    assert {table.key_at(o): table.value_at(o) for o in table.offsets()} == model
    assert all(table.get(k) == v for k, v in model.items())
    assert table.get(b"absent") is None


def test_memory_per_entry_is_small() -> None:
    store = SuppressionStore()
    for i in range(20_000):
        address = f"reader.{i}@example{i % 50}.com"
        store.apply(suppression_key("acme", address), entry(address, "acme"))
    assert store.memory_bytes() / len(store) < 130
