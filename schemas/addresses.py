"""Address and header validation shared by the HTTP API and the `mail.submit` topic."""

import re
from email.headerregistry import Address
from email.utils import parseaddr
from typing import Annotated

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator

MAX_ADDRESS_LENGTH = 254
_CONTROL_CHARS = re.compile(r"[\r\n\x00]")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")

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
    try:
        checked = validate_email(value, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid address {value!r}: {exc}") from None
    return f"{checked.local_part}@{checked.domain.lower()}"


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
