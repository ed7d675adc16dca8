"""The delivery ledger's table of digests: the newest `limit` keys, in fixed memory."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from services.sender.digests import DigestRing


def test_keys_added_are_found_and_others_are_not() -> None:
    ring = DigestRing(10)
    ring.add("default/m1@example.com/0")
    ring.add("default/m1@example.com/1")
    assert "default/m1@example.com/0" in ring
    assert "default/m1@example.com/1" in ring
    assert "default/m1@example.com/2" not in ring
    assert "default/m2@example.com/0" not in ring
    assert len(ring) == 2


def test_a_key_added_twice_counts_once() -> None:
    ring = DigestRing(2)
    for _ in range(3):
        ring.add("a")
    ring.add("b")
    assert len(ring) == 2
    assert "a" in ring and "b" in ring


def test_past_the_limit_the_oldest_keys_go() -> None:
    ring = DigestRing(1000)
    for i in range(1500):
        ring.add(f"key-{i}")
    assert len(ring) == 1000
    assert not any(f"key-{i}" in ring for i in range(500))
    assert all(f"key-{i}" in ring for i in range(500, 1500))


def test_memory_is_taken_once_and_is_small_per_key() -> None:
    ring = DigestRing(500_000)
    before = ring.nbytes
    for i in range(20_000):
        ring.add(f"key-{i}")
    assert ring.nbytes == before
    assert before / 500_000 < 40


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=12),
    keys=st.lists(st.integers(min_value=0, max_value=40), max_size=200),
)
def test_behaves_like_the_newest_limit_distinct_keys(limit: int, keys: list[int]) -> None:
    """Small tables: long probe runs, wrap-around and many evictions shifting keys back."""
    ring = DigestRing(limit)
    model: OrderedDict[int, None] = OrderedDict()
    for key in keys:
        ring.add(str(key))
        if key not in model:
            model[key] = None
            if len(model) > limit:
                model.popitem(last=False)
        assert len(ring) == len(model)
        assert {k for k in range(41) if str(k) in ring} == set(model)
