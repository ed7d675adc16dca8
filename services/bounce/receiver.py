"""The bounce domain's SMTP server: DSNs, ARF complaints and mailto unsubscribes come in here.

RCPT is where mail that is not for us stops: another domain is relaying (refused, 550 5.7.1),
a local part that is neither a valid signed VERP address nor one of the configured report
addresses (`bounces`, `fbl`, `abuse`, `postmaster` by default) is unknown (550 5.1.1).

DATA parses the report, matches it to our message (`match.py`), turns it into events
(`outcome.py`) and writes them to `mail.events`; a report nothing could be made of is also
kept, byte for byte, on `mail.rejected` under its report id. The `250` comes only after Kafka
acknowledged every one of those records; if it does not within `store_timeout_s`, the answer
is `451` and the sending MTA tries again later, so a report accepted is a report kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from aiosmtpd.smtp import SMTP, Envelope, Session

from schemas.catalogue import REJECTED
from schemas.records import DeliveryEvent, EventType, RejectedHeaders, utc_now
from services.bounce import metrics
from services.bounce.classify import Classifier
from services.bounce.match import Keys, find_origin
from services.bounce.oneclick import decode_token, token_in_subject
from services.bounce.outcome import Outcome, outcome
from services.bounce.reports import parse_report
from services.bounce.verp import decode_return_path
from services.runtime.codec import event_output
from services.runtime.health import Health
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer, DeliveryFailed
from services.runtime.settings import split_host_port

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0
REPORT_ID_PREFIX = "rpt-"


@dataclass(frozen=True)
class Policy:
    """What the receiver accepts and how it reads it."""

    bounce_domain: str
    keys: Keys
    classifier: Classifier
    report_local_parts: frozenset[str]
    #: The mailto address offered in List-Unsubscribe (any domain), or None.
    unsubscribe_address: str | None = None
    max_recipients: int = 50


def new_report_id() -> str:
    return REPORT_ID_PREFIX + uuid.uuid4().hex[:24]


def rcpt_verdict(policy: Policy, address: str) -> str | None:
    """None to accept the recipient, else the SMTP reply that refuses it."""
    local, at, domain = address.rpartition("@")
    lowered = address.lower()
    if policy.unsubscribe_address and lowered == policy.unsubscribe_address.lower():
        return None
    if not at or domain.lower().rstrip(".") != policy.bounce_domain:
        return f"550 5.7.1 <{address}>: relay access denied"
    if local.lower() in policy.report_local_parts:
        return None
    if decode_return_path(address, policy.keys.verp) is not None:
        return None
    return f"550 5.1.1 <{address}>: no such recipient here"


def process(
    policy: Policy,
    data: bytes,
    mail_from: str,
    rcpt_tos: Sequence[str],
    peer: str,
    report_id: str,
    now: datetime,
) -> tuple[Outcome, list[Output]]:
    """One received message → what it means and the records to write (pure, CPU only)."""
    to_unsubscribe = policy.unsubscribe_address is not None and any(
        r.lower() == policy.unsubscribe_address.lower() for r in rcpt_tos
    )
    report = parse_report(data)
    result: Outcome
    if to_unsubscribe and (unsubscribe := _unsubscribe(policy, report.report_subject, now)):
        result = unsubscribe
    else:
        origin = find_origin(report, rcpt_tos, policy.keys)
        result = outcome(report, origin, report_id, now, policy.classifier)
    outputs = [event_output(e) for e in result.events]
    if result.keep_raw:
        headers = [
            (RejectedHeaders.REASON.value, b"bounce report not understood"),
            (RejectedHeaders.CODE.value, b"unparsed-report"),
            (RejectedHeaders.SOURCE_TOPIC.value, b"smtp"),
            (RejectedHeaders.SMTP_MAIL_FROM.value, mail_from.encode(errors="replace")),
            (RejectedHeaders.SMTP_RCPT_TO.value, ", ".join(rcpt_tos).encode(errors="replace")),
            (RejectedHeaders.SMTP_PEER.value, peer.encode(errors="replace")),
        ]
        outputs.append(Output(REJECTED, data, report_id, headers))
    return result, outputs


def _unsubscribe(policy: Policy, subject: str | None, now: datetime) -> Outcome | None:
    token = token_in_subject(subject or "")
    said = None if token is None else decode_token(token, policy.keys.unsubscribe)
    if said is None:
        return None
    event = DeliveryEvent(
        type=EventType.UNSUBSCRIBED,
        message_id=said.message_id,
        tenant=said.tenant,
        recipient=said.address,
        ts=now,
        detail="unsubscribe by mail (List-Unsubscribe mailto)",
    )
    return Outcome([event], False, "unsubscribe")


class ReportHandler:
    """aiosmtpd handler: RCPT policy, and DATA answered only once Kafka holds the result."""

    def __init__(
        self, policy: Policy, producer: AsyncProducer, store_timeout_s: float = 10.0
    ) -> None:
        self._policy = policy
        self._producer = producer
        self._store_timeout_s = store_timeout_s

    async def handle_RCPT(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self._policy.max_recipients:
            return "452 4.5.3 too many recipients"
        refusal = rcpt_verdict(self._policy, address)
        if refusal is not None:
            metrics.RCPT_REFUSED.labels(refusal[:3]).inc()
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        report_id = new_report_id()
        peer = str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)
        mail_from = envelope.mail_from or ""
        result, outputs = await asyncio.to_thread(
            process,
            self._policy,
            data,
            mail_from,
            list(envelope.rcpt_tos),
            peer,
            report_id,
            utc_now(),
        )
        try:
            async with asyncio.timeout(self._store_timeout_s):
                await self._producer.send_all(
                    [(o.topic, o.value, o.key, o.headers) for o in outputs]
                )
        except (TimeoutError, DeliveryFailed) as exc:
            log.warning(
                "report not stored, asking the sender to retry",
                extra={"report_id": report_id, "error": str(exc) or "timed out"},
            )
            metrics.REPORTS.labels("not-stored").inc()
            return "451 4.3.0 could not store the report now, try again later"
        metrics.REPORTS.labels(result.verdict.partition(" ")[0]).inc()
        log.info(
            "report received",
            extra={
                "report_id": report_id,
                "verdict": result.verdict,
                "events": len(result.events),
                "rcpt_tos": list(envelope.rcpt_tos),
                "peer": peer,
            },
        )
        return f"250 2.0.0 report {report_id} accepted"


async def serve_smtp(
    handler: ReportHandler,
    addr: str,
    stop: asyncio.Event,
    hostname: str,
    max_report_bytes: int,
    health: Health | None = None,
) -> None:
    """Serve SMTP on `host:port` until `stop` is set; then close every connection.

    Readiness (`smtp`) holds while the listener is open."""
    loop = asyncio.get_running_loop()
    connections: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def new_connection() -> SMTP:
        connection = SMTP(
            handler,
            hostname=hostname,
            ident="Mailrail bounce",
            loop=loop,
            enable_SMTPUTF8=True,
            data_size_limit=max_report_bytes,
            timeout=IDLE_TIMEOUT_S,
        )
        connections.add(connection)
        return connection

    host, port = split_host_port(addr, 25)
    server = await loop.create_server(new_connection, host, port)
    if health is not None:
        health.add_check("smtp", server.is_serving)
    log.info("bounce SMTP listening", extra={"addr": addr})
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(connections):
            transport = connection.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        with contextlib.suppress(Exception):
            await server.wait_closed()
