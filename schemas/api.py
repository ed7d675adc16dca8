"""HTTP API bodies (`POST /v1/messages` and friends). `mail.submit` reuses `MessageRequest`."""

import base64
import binascii
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.addresses import EmailAddress, Mailbox, check_header

MAX_RECIPIENTS = 1000
MAX_VARS_PER_RECIPIENT = 50
MAX_TAGS = 10

_Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
_PoolName = Annotated[str, Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Recipient(_Strict):
    email: EmailAddress
    vars: dict[str, str] = Field(default_factory=dict, max_length=MAX_VARS_PER_RECIPIENT)


class Attachment(_Strict):
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(default="application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$")
    content: str = Field(description="base64")

    @field_validator("filename")
    @classmethod
    def _no_control(cls, value: str) -> str:
        if any(c in value for c in "\r\n\x00"):
            raise ValueError("filename contains CR, LF or NUL")
        return value

    @field_validator("content")
    @classmethod
    def _base64(cls, value: str) -> str:
        _decode_base64(value)
        return value


def _decode_base64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


class Content(_Strict):
    """What a message says: either the structured parts or one raw RFC 5322 message."""

    subject: str | None = Field(default=None, max_length=998)
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    reply_to: Mailbox | None = None
    attachments: list[Attachment] = Field(default_factory=list, max_length=50)
    raw: str | None = Field(default=None, description="base64 of an RFC 5322 message")

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "\r\n\x00"):
            raise ValueError("subject contains CR, LF or NUL")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header_value in value.items():
            check_header(name, header_value)
        return value

    @field_validator("raw")
    @classmethod
    def _raw(cls, value: str | None) -> str | None:
        if value is not None:
            decoded = _decode_base64(value)
            if b"\x00" in decoded:
                raise ValueError("raw message contains NUL")
            head, sep, _ = decoded.replace(b"\r\n", b"\n").partition(b"\n\n")
            if not sep:
                raise ValueError("raw message has no header/body separator")
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"raw message header is not valid UTF-8 (at byte {exc.start})"
                ) from None
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        structured = (self.subject, self.text, self.html, self.reply_to)
        if self.raw is not None:
            if any(part is not None for part in structured) or self.attachments or self.headers:
                raise ValueError("raw excludes subject, text, html, headers, reply_to, attachments")
        else:
            if self.subject is None:
                raise ValueError("subject is required (or give raw)")
            if self.text is None and self.html is None:
                raise ValueError("text or html is required (or give raw)")
        return self

    def raw_bytes(self) -> bytes | None:
        return None if self.raw is None else base64.b64decode(self.raw)


class MessageRequest(Content):
    """Body of `POST /v1/messages`."""

    from_: Mailbox = Field(alias="from")
    to: list[EmailAddress | Recipient] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    pool: _PoolName | None = None
    tags: list[_Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=20)

    def recipients(self) -> list[Recipient]:
        return [r if isinstance(r, Recipient) else Recipient(email=r) for r in self.to]

    def content(self) -> Content:
        return Content.model_validate(self.model_dump(include=set(Content.model_fields)))


RecipientState = Literal["queued", "suppressed"]


class RecipientStatus(_Strict):
    email: str
    status: RecipientState


class MessageAccepted(_Strict):
    """Answer to `POST /v1/messages` (202)."""

    id: str
    recipients: list[RecipientStatus]


class ErrorDetail(_Strict):
    code: str
    message: str
    field: str | None = Field(
        default=None, description="the request field at fault, e.g. `to[3].email`"
    )


class ErrorResponse(_Strict):
    error: ErrorDetail


class SuppressionRequest(_Strict):
    """Body of `PUT /v1/suppressions/{email}`."""

    reason: str = Field(default="manual", min_length=1, max_length=200)


class SuppressionEntry(_Strict):
    email: str
    tenant: str
    reason: str
    created_at: datetime


class SuppressionPage(_Strict):
    items: list[SuppressionEntry]
    next_cursor: str | None = None


TimelineType = Literal[
    "accepted",
    "queued",
    "suppressed",
    "rejected",
    "delivered",
    "deferred",
    "bounced",
    "expired",
    "complained",
    "unsubscribed",
]
FinalState = Literal["delivered", "bounced", "suppressed", "expired"]


class SmtpAnswer(_Strict):
    code: int
    enhanced: str | None = None
    text: str = ""


class TimelineEvent(_Strict):
    """One state change of one recipient, as `mail.events` recorded it."""

    type: TimelineType
    ts: datetime
    attempt: int = 0
    mx: str | None = None
    smtp: SmtpAnswer | None = None
    category: str | None = None
    hard: bool | None = None
    detail: str | None = None


class RecipientTimeline(_Strict):
    email: str
    #: The latest state (a complaint after delivery shows as `complained`).
    state: TimelineType
    #: The final state once reached: every accepted recipient ends in exactly one.
    final: FinalState | None = None
    events: list[TimelineEvent]


class MessageStatus(_Strict):
    """Answer to `GET /v1/messages/{id}`."""

    id: str
    accepted_at: datetime | None = None
    recipients: list[RecipientTimeline]
