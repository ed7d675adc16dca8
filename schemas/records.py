"""Values of every Kafka topic. Each carries `v`, its schema version."""

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.addresses import EmailAddress
from schemas.api import Content, MessageRequest
from schemas.categories import Category

_Tenant = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9-]*$")]


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    v: Literal[1] = 1


class Submission(MessageRequest):
    """`mail.submit`: the HTTP body plus the tenant (and an optional idempotency key)."""

    v: Literal[1] = 1
    tenant: _Tenant
    idempotency_key: str | None = Field(default=None, max_length=200)


class AcceptedRecipient(_Record):
    email: str
    vars: dict[str, str] = Field(default_factory=dict)
    suppressed: bool = False


MessageId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]


class AcceptedMessage(_Record):
    """`mail.accepted`: one validated message, written by ingest before it answers 202."""

    id: MessageId
    tenant: str
    accepted_at: datetime
    from_: str = Field(alias="from")
    content: Content
    recipients: list[AcceptedRecipient]
    pool: str
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = None


class BatchRecipient(_Record):
    email: str
    index: int = Field(ge=0, description="position in the accepted message, for VERP")
    vars: dict[str, str] = Field(default_factory=dict)


class DeliveryBatch(_Record):
    """`mail.outbound.<pool>` and `mail.retry.<delay>`: one body, recipients of one destination."""

    message_id: MessageId
    tenant: str
    pool: str
    throttle_key: str
    domain: str
    from_: str = Field(alias="from")
    content: Content
    recipients: list[BatchRecipient] = Field(min_length=1)
    accepted_at: datetime
    attempt: int = Field(default=1, ge=1)
    not_before: datetime | None = None
    #: Why the batch waits in a delay topic without an attempt: its destination's quota was
    #: spent ("quota", its slots are then reserved), the destination is paused, or busy.
    held_for: Literal["quota", "paused", "busy"] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)


class EventType(StrEnum):
    ACCEPTED = "accepted"
    QUEUED = "queued"
    SUPPRESSED = "suppressed"
    REJECTED = "rejected"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    UNMATCHED = "unmatched"
    UNPARSED = "unparsed"


#: A recipient in one of these states is done; every accepted recipient reaches exactly one.
FINAL_EVENT_TYPES = frozenset(
    {EventType.DELIVERED, EventType.BOUNCED, EventType.SUPPRESSED, EventType.EXPIRED}
)


class SmtpReply(_Record):
    code: int = Field(ge=200, le=599)
    enhanced: str | None = Field(default=None, pattern=r"^[245]\.\d{1,3}\.\d{1,3}$")
    text: str = ""


class DeliveryEvent(_Record):
    """`mail.events`: one state change of one recipient."""

    type: EventType
    message_id: str
    tenant: str
    recipient: str
    ts: datetime = Field(default_factory=utc_now)
    attempt: int = 0
    pool: str = ""
    mx: str | None = None
    smtp: SmtpReply | None = None
    category: Category | None = None
    hard: bool | None = None
    detail: str | None = None
    #: DKIM as sent: `aligned: <d>/<s>, ...` (the From domain signed), `unaligned: <d>/<s>,
    #: ... (<why>)` (only other domains signed) or `unsigned: <why>`; absent without DKIM.
    dkim: str | None = None
    tags: list[str] = Field(default_factory=list)


class SuppressionReason(StrEnum):
    HARD_BOUNCE = "hard-bounce"
    SOFT_BOUNCE_LIMIT = "soft-bounce-limit"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"


class Suppression(_Record):
    """`mail.suppression` (compacted, key `tenant/address`): why an address gets no more mail."""

    tenant: str
    address: EmailAddress
    reason: SuppressionReason
    created_at: datetime = Field(default_factory=utc_now)
    source_message_id: str | None = None
    source_event: EventType | None = None
    detail: str | None = None


class ControlAction(StrEnum):
    PAUSE = "pause"
    QUOTA = "quota"
    #: Re-publish the matching batches to `to_pool`'s outbound topic (while in force).
    MOVE = "move"
    #: Bounce (category `purged`) the matching batches accepted before `created_at`.
    PURGE = "purge"


class ControlCommand(_Record):
    """`mail.control` (compacted, key = scope such as `domain:gmail.com@pool:marketing`).

    A pause is keyed by its bare scope; the other actions add a `control:<action>` part to the
    key (a label that does not narrow the scope), so a destination can be paused and have a
    quota override at the same time. A tombstone removes the command.
    """

    scope: str = Field(min_length=1, max_length=300)
    action: ControlAction
    messages_per_s: float | None = Field(default=None, gt=0)
    #: MOVE only: the pool whose outbound topic receives the batches.
    to_pool: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]*$")
    expires_at: datetime | None = None
    reason: str | None = None
    created_at: datetime = Field(default_factory=utc_now)


class LastReply(_Record):
    """One reply a destination's servers gave (or a connection or DNS failure as a reply)."""

    ts: datetime
    code: int
    enhanced: str | None = None
    text: str = ""
    mx: str | None = None


class DestinationStats(_Record):
    """`mail.stats` (compacted, key `pool/destination`): a sender's periodic snapshot of one
    destination (throttle key) it owns, for `mailrail queues` and the status page."""

    pool: str
    destination: str
    #: The sender process that wrote it (`host/pid`).
    sender: str
    ts: datetime = Field(default_factory=utc_now)
    #: How often this sender writes snapshots: one older than a few intervals is stale.
    interval_s: float = Field(gt=0)
    #: Measured send rate over the last window.
    rate_per_s: float = 0.0
    #: Rate in force after rules, operator override and backoff; None = unlimited.
    quota_per_s: float | None = None
    #: The operator's quota override in force, if any.
    override_per_s: float | None = None
    #: Share of configured rate and concurrency in force (1 = no backoff).
    backoff_factor: float = 1.0
    #: Throttling replies seen since the sender started.
    throttled: int = 0
    connections_in_use: int = 0
    max_connections: int = 0
    #: Batches this sender is delivering (or waiting for a connection) right now.
    in_progress: int = 0
    #: Batches this sender put in a delay topic (held for pause/quota/busy, or deferred) and
    #: has not read back yet: an estimate (a batch dropped or expired on the way is counted
    #: until the sender restarts).
    held: int = 0
    #: Unread batches of the outbound partition this destination is keyed to (consumer lag):
    #: shared by every destination on that partition. None until known.
    partition: int | None = None
    partition_backlog: int | None = None
    paused_until: datetime | None = None
    pause_reason: str | None = None
    #: Recipients by outcome of their last attempt here, since the sender started.
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    last_replies: list[LastReply] = Field(default_factory=list)


def stats_key(pool: str, destination: str) -> str:
    """The compaction key of `mail.stats`."""
    return f"{pool}/{destination}"


class RejectedHeaders(StrEnum):
    """`mail.rejected` keeps the original key and value bytes; these headers say why."""

    REASON = "mailrail-reason"
    CODE = "mailrail-error-code"
    FIELD = "mailrail-error-field"
    SOURCE_TOPIC = "mailrail-source-topic"
    SOURCE_PARTITION = "mailrail-source-partition"
    SOURCE_OFFSET = "mailrail-source-offset"
    #: A report received over SMTP and kept because it could not be understood (the record's
    #: key is the report id of its `unparsed` event): its envelope and the peer it came from.
    SMTP_MAIL_FROM = "mailrail-smtp-mail-from"
    SMTP_RCPT_TO = "mailrail-smtp-rcpt-to"
    SMTP_PEER = "mailrail-smtp-peer"


class IdempotencyState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    RELEASED = "released"


class IdempotencyRecord(_Record):
    """`mail.idempotency` (compacted, key `tenant/idempotency key`): who claimed a key, for
    which body, and the answer once the message is stored.

    Every ingest replica applies these records in log order with the same rule (see
    `services/ingest/idempotency.py`), so all agree which claim of a key won.
    """

    tenant: str
    key: str = Field(min_length=1, max_length=200)
    state: IdempotencyState
    #: Identifies one claim attempt; the `done`/`released` record of that attempt repeats it.
    claim: str = Field(min_length=1, max_length=64)
    body_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    message_id: MessageId
    #: Positions (in `to`) of the recipients answered "suppressed"; the rest were "queued".
    suppressed: list[int] = Field(default_factory=list)
    #: When the key was first claimed: the 24 h window runs from here.
    first_seen: datetime
    ts: datetime = Field(default_factory=utc_now)
    #: A pending claim older than this may be taken over (its owner is presumed dead).
    lease_s: float = Field(default=30.0, gt=0)


class LedgerEntry(_Record):
    """`mail.ledger` (key `pool/message id/recipient index`): a receiving server answered 2xx
    for this recipient. A sender that reads the same batch again (after a crash before its
    commit) does not send to the recipient again (see services/sender/ledger.py)."""

    message_id: MessageId
    index: int = Field(ge=0, description="the recipient's position in the accepted message")
    pool: str
    ts: datetime = Field(default_factory=utc_now)


def ledger_key(pool: str, message_id: str, index: int) -> str:
    """The key of a `mail.ledger` record."""
    return f"{pool}/{message_id}/{index}"


def idempotency_key(tenant: str, key: str) -> str:
    """The compaction key of `mail.idempotency`."""
    return f"{tenant}/{key}"


def suppression_key(tenant: str, address: str) -> str:
    """The compaction key of `mail.suppression`: tenant and address, domain lower-cased."""
    local, _, domain = address.rpartition("@")
    return f"{tenant}/{local}@{domain.lower()}"
