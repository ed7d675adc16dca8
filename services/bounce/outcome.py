"""What one received report means, as delivery events: a pure function, no I/O.

- a DSN or plain-text bounce: one `bounced` event per recipient whose action is `failed`,
  with category and hard/soft from the classifier and the SMTP reply from the report's
  Status and Diagnostic-Code. `delayed`, `relayed`, `delivered` and `expanded` are not
  failures and make no event.
- an ARF report: one `complained` event per recipient (feedback types abuse, fraud, virus,
  other or none; `not-spam` and `auth-failure` are not complaints).
- matched to none of our messages: the same findings as `unmatched` events, keyed by the
  report's own id, with no tenant.
- not understood: one `unparsed` event; the raw bytes are kept on `mail.rejected` under the
  same id (see `receiver.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from schemas.addresses import normalise_address
from schemas.categories import Category
from schemas.records import DeliveryEvent, EventType, SmtpReply
from services.bounce.classify import Classifier
from services.bounce.match import Origin, quoted_message_id
from services.bounce.reports import Report, ReportRecipient

COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other"})
MAX_DETAIL_CHARS = 500


@dataclass(frozen=True)
class Outcome:
    events: list[DeliveryEvent]
    #: The raw report must be kept for an operator (nothing in it could be used).
    keep_raw: bool
    #: For logs and metrics: bounce, complaint, unmatched, unparsed, ignored.
    verdict: str


def outcome(
    report: Report, origin: Origin | None, report_id: str, now: datetime, classifier: Classifier
) -> Outcome:
    if report.kind == "unparsed":
        return _unparsed(report, origin, report_id, now)
    if report.kind == "arf":
        return _complaints(report, origin, report_id, now)
    return _bounces(report, origin, report_id, now, classifier)


def _bounces(
    report: Report,
    origin: Origin | None,
    report_id: str,
    now: datetime,
    classifier: Classifier,
) -> Outcome:
    failed = [r for r in report.recipients if (r.action or "failed") == "failed"]
    if not failed:
        actions = ",".join(sorted({r.action or "?" for r in report.recipients}))
        return Outcome([], False, f"ignored ({actions})")
    events = []
    for recipient in failed:
        reply, inferred = _reply(recipient)
        verdict = classifier.classify(reply.code, reply.enhanced, reply.text)
        notes = [f"{report.kind} report {report_id}"]
        if recipient.remote_mta:
            notes.append(f"remote MTA {recipient.remote_mta}")
        if inferred:
            notes.append("no SMTP reply in the report: code from its status")
        events.append(
            _event(
                report,
                origin,
                report_id,
                now,
                recipient=_address(origin, recipient, len(failed)),
                kind=EventType.BOUNCED,
                smtp=reply,
                category=verdict.category,
                hard=verdict.hard,
                notes=notes,
            )
        )
    return Outcome(events, False, "bounce" if origin else "unmatched")


def _complaints(report: Report, origin: Origin | None, report_id: str, now: datetime) -> Outcome:
    feedback = report.feedback_type
    if feedback is not None and feedback not in COMPLAINT_TYPES:
        return Outcome([], False, f"ignored (feedback type {feedback})")
    addresses = [_address(origin, r, len(report.recipients)) for r in report.recipients]
    if not addresses and origin is not None and origin.address:
        addresses = [origin.address]
    notes = [f"arf report {report_id}", f"feedback type {feedback or 'unspecified'}"]
    if report.reporting_mta:
        notes.append(f"reported by {report.reporting_mta}")
    if not addresses:
        notes.append("the report names no recipient")
        if origin is not None:
            notes.append(f"about message {origin.message_id} of tenant {origin.tenant}")
        event = _event(report, None, report_id, now, "", EventType.COMPLAINED, notes=notes)
        return Outcome([event], False, "unmatched")
    events = [
        _event(
            report,
            origin,
            report_id,
            now,
            recipient=address,
            kind=EventType.COMPLAINED,
            category=Category.COMPLAINT,
            notes=notes,
        )
        for address in addresses
    ]
    return Outcome(events, False, "complaint" if origin else "unmatched")


def _unparsed(report: Report, origin: Origin | None, report_id: str, now: datetime) -> Outcome:
    notes = [f"raw report on mail.rejected, key {report_id}"]
    if origin is not None:
        notes.append(f"sent to the return path of message {origin.message_id}")
    if report.report_subject:
        notes.append(f"subject: {report.report_subject}")
    event = DeliveryEvent(
        type=EventType.UNPARSED,
        message_id=report_id,
        tenant=origin.tenant if origin else "",
        recipient="",
        ts=now,
        detail="; ".join(notes)[:MAX_DETAIL_CHARS],
    )
    return Outcome([event], True, "unparsed")


def _event(
    report: Report,
    origin: Origin | None,
    report_id: str,
    now: datetime,
    recipient: str,
    kind: EventType,
    smtp: SmtpReply | None = None,
    category: Category | None = None,
    hard: bool | None = None,
    notes: list[str] | None = None,
) -> DeliveryEvent:
    """A matched event is about our message; an unmatched one is keyed by the report."""
    notes = list(notes or [])
    if origin is not None:
        notes.append(f"matched by {origin.via}")
    else:
        found = quoted_message_id(report) or report.original_message_id
        if found:
            notes.append(f"original message id {found} not verifiable as ours")
    return DeliveryEvent(
        type=kind if origin is not None else EventType.UNMATCHED,
        message_id=origin.message_id if origin else report_id,
        tenant=origin.tenant if origin else "",
        recipient=recipient,
        ts=now,
        attempt=0,
        smtp=smtp,
        category=category,
        hard=hard,
        detail="; ".join(notes)[:MAX_DETAIL_CHARS],
    )


def _address(origin: Origin | None, recipient: ReportRecipient, count: int) -> str:
    """The address as we sent it: the one-click token's, else Original-Recipient, else Final."""
    if origin is not None and origin.address and count == 1:
        return origin.address
    for candidate in (recipient.original_recipient, recipient.final_recipient):
        if candidate and "@" in candidate:
            try:
                return normalise_address(candidate)
            except (ValueError, ValidationError):
                continue
    return recipient.final_recipient or recipient.original_recipient or ""


def _reply(recipient: ReportRecipient) -> tuple[SmtpReply, bool]:
    """The SMTP reply a report gives for a recipient; (reply, code inferred from status)."""
    status = recipient.status
    code = recipient.diagnostic_code
    inferred = code is None or not 200 <= code <= 599
    if inferred:
        code = {"2": 250, "4": 450}.get((status or "5")[0], 550)
    return SmtpReply(code=code, enhanced=status, text=recipient.diagnostic_text or ""), inferred
