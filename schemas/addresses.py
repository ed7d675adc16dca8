"""Address and header validation shared by the HTTP API and the `mail.submit` topic."""

import re
from email.headerregistry import Address
from email.utils import parseaddr
from typing import Annotated

from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from pydantic import AfterValidator

MAX_ADDRESS_LENGTH = 254
_CONTROL_CHARS = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: The common case, checked without email_validator: an ASCII dot-atom local part and a
#: letters-digits-hyphens domain. Anything else (quoted or UTF-8 local parts, IDN, xn--
#: labels, special-use names) takes the full validator. tests/unit/test_ingest_addresses.py
#: checks that both paths agree.
_PLAIN_ADDRESS = re.compile(rf"({_ATEXT}(?:\.{_ATEXT})*)@((?:{_LABEL}\.)+{_LABEL})")
_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)

#: Headers the pipeline writes itself; a caller may not set them through `headers`.
FORBIDDEN_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "return-path",
        "received",
        "dkim-signature",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "reply-to",
    }
)


def normalise_address(value: str) -> str:
    """Validate one mailbox (RFC 5321/5322, IDN domains, SMTPUTF8 local parts).

    Returns it with the domain lower-cased and in its Unicode form; the local part is kept as given.
    """
    if _CONTROL_CHARS.search(value):
        raise ValueError("address contains CR, LF or NUL")
    if len(value) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"address longer than {MAX_ADDRESS_LENGTH} characters")
    plain = _plain_address(value)
    if plain is not None:
        return plain
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid address {value!r}: {exc}") from None
    return f"{checked.local_part}@{checked.domain.lower()}"


def _plain_address(value: str) -> str | None:
    """The normalised form of a plain ASCII address, or None when the full check is needed."""
    match = _PLAIN_ADDRESS.fullmatch(value)
    if match is None:
        return None
    local, domain = match.group(1), match.group(2).lower()
    if len(local) > 64:
        return None
    labels = domain.split(".")
    tld = labels[-1]
    if not tld[-1].isalpha() or any(label[2:4] == "--" for label in labels):
        return None
    if tld in _SPECIAL_USE:
        return None
    return f"{local}@{domain}"


def normalise_mailbox(value: str) -> str:
    """Validate a `Name <addr>` or bare address; returns it re-rendered safely."""
    if _CONTROL_CHARS.search(value):
        raise ValueError("address contains CR, LF or NUL")
    name, addr = parseaddr(value)
    if not addr:
        raise ValueError(f"invalid address {value!r}")
    addr = normalise_address(addr)
    if not name:
        return addr
    local, _, domain = addr.rpartition("@")
    return str(Address(display_name=name, username=local, domain=domain))


def check_header(name: str, value: str) -> None:
    """Reject header names that are not RFC 5322 field names and values that could inject."""
    if not _HEADER_NAME.match(name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in FORBIDDEN_HEADERS:
        raise ValueError(f"header {name!r} is set by the pipeline and may not be given")
    if _CONTROL_CHARS.search(value):
        raise ValueError(f"header {name!r} contains CR, LF or NUL")


def address_of(mailbox: str) -> str:
    """The bare address of a `Name <addr>` mailbox."""
    return parseaddr(mailbox)[1] or mailbox


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


EmailAddress = Annotated[str, AfterValidator(normalise_address)]
Mailbox = Annotated[str, AfterValidator(normalise_mailbox)]
