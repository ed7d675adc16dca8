"""Scenario 17: fuzzing the parsers that take untrusted input, in this process.

The HTTP API is fuzzed by schemathesis in tests/integration/test_ingest_api.py (every
operation, schema-valid and invalid input: no 5xx, every answer documented); here, with many
more examples than the unit tests use: the DSN/ARF parser, the address validator and the
reply classifier must never raise, never hang (a per-example deadline), and every status the
parser emits must have RFC 3463's form.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from chaos.oracle import Verdict
from chaos.scenarios import Scenario
from schemas.addresses import normalise_address
from schemas.categories import Category
from services.bounce.classify import classify
from services.bounce.reports import parse_report

RFC3463 = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
FIXTURES = Path(__file__).resolve().parents[2] / "tests/fixtures/reports"
#: No single input may take longer than this (a hang shows as a deadline failure).
DEADLINE = timedelta(seconds=2)


def _mutations() -> st.SearchStrategy[bytes]:
    sources = [p.read_bytes() for p in sorted(FIXTURES.glob("*.eml"))]

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(sources)))
        for _ in range(draw(st.integers(0, 8))):
            at = draw(st.integers(0, max(0, len(data) - 1)))
            piece = draw(st.binary(min_size=0, max_size=16))
            if draw(st.booleans()):
                data[at : at + len(piece)] = piece
            else:
                data[at:at] = piece
        return bytes(data[: draw(st.integers(0, len(data)))])

    return mutated()


def _run(name: str, examples: int, test: Callable[[], None], verdict: Verdict) -> None:
    started = time.monotonic()
    try:
        test()
    except Exception as exc:
        verdict.check(name, False, f"{type(exc).__name__}: {str(exc)[:400]}")
        return
    verdict.check(name, True, f"{examples} examples in {time.monotonic() - started:.0f} s")


def fuzz_parsers(full: bool) -> Verdict:
    """17. The report parser, the address validator and the classifier under hypothesis."""
    verdict = Verdict("17", "fuzzing: reports, addresses, replies")
    examples = 20000 if full else 300
    common = settings(
        max_examples=examples,
        deadline=DEADLINE,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )

    @common
    @given(st.one_of(st.binary(max_size=6000), _mutations()))
    def reports(data: bytes) -> None:
        report = parse_report(data)
        assert report.kind in ("dsn", "arf", "plain", "unparsed")
        for recipient in report.recipients:
            assert recipient.status is None or RFC3463.match(recipient.status), recipient.status

    @common
    @given(st.text(max_size=300))
    def addresses(text: str) -> None:
        try:
            normalised = normalise_address(text)
        except (ValueError, ValidationError):
            return
        assert not re.search(r"[\r\n\x00]", normalised), repr(normalised)
        assert normalised.count("@") >= 1

    @common
    @given(
        st.one_of(st.none(), st.integers(-5, 1000)),
        st.one_of(st.none(), st.text(max_size=20)),
        st.text(max_size=400),
    )
    def replies(code: int | None, enhanced: str | None, text: str) -> None:
        assert isinstance(classify(code, enhanced, text).category, Category)

    _run("DSN/ARF parser: no crash, no hang, RFC 3463 statuses", examples, reports, verdict)
    _run("address validator: no crash, no line break accepted", examples, addresses, verdict)
    _run("reply classifier: no crash, no hang", examples, replies, verdict)
    verdict.note("the HTTP API is fuzzed by schemathesis in tests/integration/test_ingest_api.py")
    return verdict


SCENARIOS = [Scenario(17, "fuzzing: reports, addresses, replies", fuzz_parsers)]
