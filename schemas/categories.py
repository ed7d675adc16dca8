"""Failure categories shared by every event that carries a delivery outcome."""

from enum import StrEnum


class Category(StrEnum):
    """Why a recipient was not delivered, at the granularity deliverability teams act on."""

    BAD_MAILBOX = "bad-mailbox"
    BAD_DOMAIN = "bad-domain"
    INACTIVE_MAILBOX = "inactive-mailbox"
    QUOTA = "quota"
    MESSAGE_TOO_LARGE = "message-too-large"
    POLICY = "policy"
    SPAM_BLOCKED = "spam-blocked"
    CONTENT_REJECTED = "content-rejected"
    ROUTING = "routing"
    PROTOCOL = "protocol"
    TRANSIENT = "transient"
    THROTTLED = "throttled"
    EXPIRED = "expired"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    #: Bounced by an operator's purge of queued mail (`mailrail purge`), never offered.
    PURGED = "purged"
    OTHER = "other"


#: Categories that say the address itself is bad: only these suppress on a hard bounce.
ADDRESS_CATEGORIES = frozenset(
    {Category.BAD_MAILBOX, Category.BAD_DOMAIN, Category.INACTIVE_MAILBOX}
)
