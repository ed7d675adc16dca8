"""The fast path of address validation agrees with email_validator on every input."""

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.addresses import _plain_address, normalise_address

_ATOM = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8)
_LABEL = st.text("abcdeXYZ0189-", min_size=1, max_size=12)
_LOCAL = st.lists(_ATOM, min_size=1, max_size=4).map(".".join) | st.text(max_size=70)
_DOMAIN = st.lists(
    _LABEL | st.sampled_from(["xn--bcher-kva", "test", "local", "123", "ab--c"]),
    min_size=1,
    max_size=4,
).map(".".join) | st.text(max_size=20)


def _full(value: str) -> str | None:
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        return None
    return f"{checked.local_part}@{checked.domain.lower()}"


@settings(max_examples=3000, deadline=None)
@given(local=_LOCAL, domain=_DOMAIN)
@example(local="a", domain="example.com")
@example(local="A.B", domain="Example.COM")
@example(local="x", domain="xn--bcher-kva.example")
@example(local="a", domain="foo.123")
@example(local="a", domain="example.local")
@example(local="a" * 65, domain="example.com")
def test_fast_path_agrees_with_email_validator(local: str, domain: str) -> None:
    value = f"{local}@{domain}"
    fast = _plain_address(value)
    if fast is not None:
        assert _full(value) == fast


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bob.Smith@Example.COM", "Bob.Smith@example.com"),
        ("x@xn--bcher-kva.example", "x@bücher.example"),
        ("x@BÜCHER.example", "x@bücher.example"),
        ("用户@例子.广告", "用户@例子.广告"),
        ("o'brien+tag@mail.example.org", "o'brien+tag@mail.example.org"),
    ],
)
def test_addresses_are_normalised(value: str, expected: str) -> None:
    assert normalise_address(value) == expected


@pytest.mark.parametrize(
    "value",
    ["a..b@example.com", "a@b", "a@-x.com", "a@x.test", "a@1.2.3.4", "a\r\n@x.com", "@x.com"],
)
def test_invalid_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="address"):
        normalise_address(value)
