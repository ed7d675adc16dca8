from pathlib import Path

from pydantic import Field, SecretStr

from schemas.categories import Category
from services.bounce.soft import DEFAULT_CATEGORIES
from services.runtime.settings import ServiceSettings


class BounceSettings(ServiceSettings):
    group_id: str = "mailrail-bounce"
    #: The group that counts soft bounces per address (`mail.soft-bounces`).
    soft_group_id: str = "mailrail-bounce-soft"
    #: Where the bounce domain's SMTP server listens (its MX points here).
    bounce_smtp_addr: str = "127.0.0.1:2525"
    #: The senders' VERP key (`MAILRAIL_VERP_KEY`): verifies the return paths reports come to.
    verp_key: SecretStr = SecretStr("mailrail-local-verp-key")
    #: Local parts of the bounce domain accepted besides VERP addresses: the shared return
    #: path (`bounces`), feedback-loop and abuse addresses, and `postmaster` (RFC 5321).
    report_local_parts: list[str] = ["bounces", "fbl", "abuse", "postmaster"]
    max_report_bytes: int = 10 * 1024 * 1024
    max_report_recipients: int = 50
    #: How long a report's records may take to be acknowledged before the answer is 451.
    store_timeout_s: float = 10.0
    #: The name the SMTP server greets with (default: the bounce domain).
    smtp_hostname: str | None = None
    #: An operator's classification rules, in front of the built-in ones (see classify.py).
    classification_rules: Path | None = None
    #: This many soft bounces of one address within the window suppress it.
    soft_bounce_limit: int = Field(default=3, ge=1)
    soft_bounce_window_s: float = Field(default=7 * 86400.0, gt=0)
    #: Categories of soft failure that count (the others are about the sender, not the address).
    soft_bounce_categories: frozenset[Category] = DEFAULT_CATEGORIES
    #: Addresses with soft bounces remembered per partition of mail.soft-bounces.
    soft_bounce_max_addresses: int = Field(default=100_000, ge=1)

    def service_name(self) -> str:
        return "bounce"
