"""Deliver one `DeliveryBatch` under its destination's shaping.

Before any connection: a batch whose destination is paused, already has enough batches in
progress, or whose quota cannot serve it within `max_quota_wait_s` goes back to a delay topic
(`held_for` says why) instead of holding the partition. Otherwise each recipient is sent in
its own transaction (VERP gives each its own return path) over one reused session, paced by
the booked rate slots. Every recipient that was tried ends the attempt in exactly one of
delivered, bounced, deferred (with a retry record) or expired.
"""

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from schemas.catalogue import retry_topic, tier_for
from schemas.categories import Category
from schemas.records import (
    BatchRecipient,
    ControlAction,
    ControlCommand,
    DeliveryBatch,
    DeliveryEvent,
    EventType,
    SmtpReply,
    utc_now,
)
from schemas.rules import Pool, Rules
from services.bounce.classify import classify
from services.bounce.verp import encode_return_path
from services.runtime.codec import batch_output, control_output, event_output
from services.runtime.controls import Controls, scope_for
from services.runtime.dns import MxHost, MxResolver, MxRoute
from services.runtime.loop import Output
from services.sender import metrics
from services.sender.compose import Composer, MessageIds, compose, personalised
from services.sender.dkim import DkimSigner
from services.sender.ledger import LEDGER_REPLY, DeliveryLedger
from services.sender.retry import expired, next_delay
from services.sender.shaping import Clock, Destination, Destinations, ReplyPatterns, Signal
from services.sender.smtp import ConnectFailed, SmtpPool, SmtpSession
from services.sender.steer import steer

log = logging.getLogger(__name__)

#: Reused sessions in a row, with nothing sent in between, that may turn out closed by the
#: server (each costs a new connection, not a deferral); beyond that one counts as a failure
#: of its MX host.
MAX_STALE_SESSIONS = 3


@dataclass(frozen=True)
class DeliveryPolicy:
    bounce_domain: str
    verp_key: bytes
    retry_schedule_s: list[float]
    max_age: timedelta
    smtp_port: int = 25
    smart_host: tuple[str, int] | None = None
    #: A batch whose first rate slot is further away than this is held in a delay topic.
    max_quota_wait_s: float = 2.0
    #: Batches one destination may have in progress; more are held, so that no destination
    #: takes the whole in-flight budget and stalls the others on its partitions.
    max_batches_per_destination: int = 50
    #: Batches all destinations together may have in progress before a slow destination
    #: (`Destination.slow`) that already has one gets its next held: below the loop's
    #: in-flight budget (which pauses the partitions), so a few slow destinations can never
    #: fill it, and every destination without a batch in progress still gets one in. Fast
    #: destinations are never held for it: waiting behind them costs milliseconds.
    max_batches_in_progress: int = 150
    #: How long a batch for a destination with too many batches in progress is held.
    busy_hold_s: float = 5.0
    #: The longest single hold for a paused destination; it is then checked again.
    pause_recheck_s: float = 30.0


@dataclass(frozen=True)
class Outcome:
    recipient: BatchRecipient
    reply: SmtpReply
    mx: str | None
    possible_duplicate: bool = False
    dkim: str | None = None


@dataclass
class _Attempt:
    outcomes: list[Outcome] = field(default_factory=list)
    #: Recipients not tried because the destination was paused or blocked meanwhile.
    untried: list[BatchRecipient] = field(default_factory=list)
    blocked_by: SmtpReply | None = None
    #: The session in use was found closed before a message went out (sent again on a new one).
    stale: bool = False


class Deliverer:
    def __init__(
        self,
        pool: Pool,
        rules: Rules,
        policy: DeliveryPolicy,
        smtp: SmtpPool,
        resolver: MxResolver | None,
        controls: Controls,
        clock: Clock = time.monotonic,
        signer: DkimSigner | None = None,
    ) -> None:
        self._pool = pool
        self._rules = rules
        self._policy = policy
        self._smtp = smtp
        self._resolver = resolver
        self._controls = controls
        self._clock = clock
        self._signer = signer
        self._patterns = ReplyPatterns(rules.backoff)
        self.destinations = Destinations(rules.shaping, rules.backoff, clock)
        #: Batches in progress, all destinations together.
        self._in_progress = 0
        #: Pauses this sender decided itself (a blocking reply) → (until, the control scope's
        #: update count then). Once mail.control has a newer record for the scope — the echo,
        #: or an operator's resume — the control view alone decides.
        self._own_pauses: dict[str, tuple[datetime, int]] = {}
        #: Set by the entry: recipients it knows were delivered are not sent again.
        self.ledger: DeliveryLedger | None = None

    async def deliver(self, batch: DeliveryBatch) -> list[Output]:
        """Deliver the batch, minus recipients the delivery ledger knows were delivered."""
        if self.ledger is None:
            return await self._deliver(batch)
        known, rest = await self.ledger.claim(batch)
        outputs = self._records(batch, [Outcome(r, LEDGER_REPLY, None) for r in known])
        if rest is not None:
            try:
                outputs += await self._deliver(rest)
                await self.ledger.settle(rest)
            finally:
                self.ledger.release(rest)
        return outputs

    async def _deliver(self, batch: DeliveryBatch) -> list[Output]:
        # An operator's MOVE or PURGE first (after the ledger: delivered recipients stay so).
        if (steered := steer(self._controls, batch, self._rules.pool_names())) is not None:
            return steered
        refusal = self._signer.refusal(batch) if self._signer else None
        if refusal is not None:
            held = "unsigned: held, the tenant requires DKIM"
            return self._records(
                batch, [Outcome(r, refusal, None, dkim=held) for r in batch.recipients]
            )
        destination = self.destinations.get(batch.throttle_key)
        destination.set_override(self._controls.quota(batch))
        now = utc_now()
        paused_until = self._paused_until(batch, now)
        if paused_until is not None:
            hold_until = min(paused_until, now + timedelta(seconds=self._policy.pause_recheck_s))
            return self._hold(batch, batch.recipients, hold_until, "paused", now)
        if destination.waiting >= self._policy.max_batches_per_destination or (
            destination.waiting > 0
            and self._in_progress >= self._policy.max_batches_in_progress
            and destination.slow()
        ):
            return self._hold(
                batch,
                batch.recipients,
                now + timedelta(seconds=self._policy.busy_hold_s),
                "busy",
                now,
            )
        slots = self._book_slots(batch, destination)
        if isinstance(slots, datetime):
            return self._hold(batch, batch.recipients, slots, "quota", now)
        token = destination.begin()
        self._in_progress += 1
        try:
            attempt = await self._attempt(batch, destination, slots)
        finally:
            destination.end(token)
            self._in_progress -= 1
        outputs = self._records(batch, attempt.outcomes)
        if attempt.blocked_by is not None:
            outputs.append(self._pause(batch, attempt.blocked_by))
            outputs += self._held_after_block(batch, attempt.untried, attempt.blocked_by)
        if attempt.untried:
            now = utc_now()
            until = min(
                self._paused_until(batch, now) or now,
                now + timedelta(seconds=self._policy.pause_recheck_s),
            )
            outputs += self._hold(batch, attempt.untried, until, "paused", now)
        return outputs

    def _labels(self, batch: DeliveryBatch) -> tuple[str, str]:
        return batch.pool, metrics.destination_label(self._rules, batch.throttle_key)

    def _paused_until(self, batch: DeliveryBatch, now: datetime) -> datetime | None:
        own = None
        if (entry := self._own_pauses.get(batch.throttle_key)) is not None:
            until, seen = entry
            if until <= now or self._controls.updates(scope_for(batch)) > seen:
                del self._own_pauses[batch.throttle_key]
            else:
                own = until
        ordered = [t for t in (self._controls.paused_until(batch, now), own) if t is not None]
        return max(ordered) if ordered else None

    def _book_slots(self, batch: DeliveryBatch, destination: Destination) -> list[float] | datetime:
        """Monotonic send times for each recipient, or the time to hold the batch until.

        Every send is booked on the destination's rate limiter when it is about to go, so
        the rate holds however batches come back from a delay topic: late, bunched, or to a
        new owner after a rebalance. A batch that would wait longer than `max_quota_wait_s`
        is held instead, until a time taken from the destination's horizon of held batches
        (each held batch pushes it on by its own sending time), so held batches come back
        one after another rather than all at once; a new batch queues behind them. A batch
        that comes back and still has to wait too long is held again, at the back.
        """
        now = self._clock()
        count = len(batch.recipients)
        limiter = destination.limiter
        if not limiter.limited:
            return [now] * count
        earliest = limiter.next_slot()
        if batch.held_for != "quota":
            earliest = max(earliest, destination.held_horizon)
        if earliest - now <= self._policy.max_quota_wait_s:
            return limiter.reserve(count)
        start = max(earliest, destination.held_horizon)
        destination.held_horizon = start + count / (limiter.rate_per_s or 1.0)
        return utc_now() + timedelta(seconds=start - now)

    async def _route(self, domain: str) -> MxRoute:
        smart_host = self._policy.smart_host
        if smart_host is not None:
            return MxRoute(hosts=(MxHost(smart_host[0], 0, (smart_host[0],)),))
        assert self._resolver is not None
        return await self._resolver.resolve(domain)

    async def _attempt(
        self, batch: DeliveryBatch, destination: Destination, slots: list[float]
    ) -> _Attempt:
        attempt = _Attempt()
        route = await self._route(batch.domain)
        if route.failure is not None:
            attempt.outcomes = [Outcome(r, route.failure, None) for r in batch.recipients]
            return attempt
        candidates = [(host, address) for host in route.hosts for address in host.addresses]
        port = self._policy.smart_host[1] if self._policy.smart_host else self._policy.smtp_port
        shaping = destination.shaping
        pending = list(zip(batch.recipients, slots, strict=True))
        last = SmtpReply(code=451, enhanced="4.4.1", text="no MX host reachable")
        index = failures = stale_run = 0
        async with destination.concurrency.slot():
            while pending and failures < len(candidates):
                host, address = candidates[index % len(candidates)]
                attempt.stale = False
                try:
                    async with self._smtp.session(
                        address, port, host.name, shaping.tls, shaping.max_messages_per_connection
                    ) as session:
                        done = await self._send_on(session, batch, destination, pending, attempt)
                except ConnectFailed as failed:
                    last = failed.reply
                    failures += 1
                    index += 1
                    if failed.from_server and self._greeting_blocked(destination, failed.reply):
                        attempt.blocked_by = failed.reply
                        attempt.untried = [r for r, _ in pending]
                        break
                    continue
                pending = pending[done:]
                if attempt.blocked_by is not None or attempt.untried:
                    break
                if attempt.stale:
                    # The server had closed it: a new connection to the same host.
                    stale_run = 0 if done else stale_run + 1
                    if stale_run <= MAX_STALE_SESSIONS:
                        continue
                if done == 0:
                    failures += 1
                    index += 1
        attempt.outcomes += [
            Outcome(r, last, candidates[-1][0].name if candidates else None)
            for r, _ in pending
            if r not in attempt.untried
        ]
        return attempt

    def _greeting_blocked(self, destination: Destination, reply: SmtpReply) -> bool:
        """A server's refusal to talk (its greeting, or its answer to EHLO) slows the
        destination down or blocks it, like the same reply to a RCPT; True for a block."""
        signal = self._patterns.signal(reply)
        if signal is Signal.THROTTLE:
            destination.throttle()
        return signal is Signal.BLOCK

    async def _send_on(
        self,
        session: SmtpSession,
        batch: DeliveryBatch,
        destination: Destination,
        pending: list[tuple[BatchRecipient, float]],
        attempt: _Attempt,
    ) -> int:
        """Send pending recipients on one session; returns how many were consumed."""
        if not self._pool.verp and not personalised(batch):
            return await self._send_shared(session, batch, destination, pending, attempt)
        composer = Composer(
            batch, ids=MessageIds(self._policy.verp_key, self._policy.bounce_domain)
        )
        limit = destination.shaping.max_messages_per_connection
        for done, (recipient, slot) in enumerate(pending):
            # A spent or lost session: the caller opens a new one for the rest.
            if not session.alive or session.sent >= limit:
                return done
            if self._paused_until(batch, utc_now()) is not None:
                attempt.untried = [r for r, _ in pending[done:]]
                return len(pending)
            wait_s = slot - self._clock()
            metrics.QUOTA_WAIT_SECONDS.labels(*self._labels(batch)).observe(max(wait_s, 0.0))
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            data = composer.render(recipient)
            signed = self._signer.sign(data, batch.tenant) if self._signer else None
            data = signed.data if signed else data
            return_path = encode_return_path(
                batch.message_id,
                recipient.index,
                self._policy.bounce_domain,
                batch.tenant,
                self._policy.verp_key,
            )
            started = self._clock()
            result = await session.send(return_path, recipient.email, data)
            if result.stale:
                attempt.stale = True
                return done
            if self.ledger is not None:
                await self.ledger.record(batch, [(recipient, result.reply)])
            metrics.SMTP_SECONDS.labels(*self._labels(batch)).observe(self._clock() - started)
            destination.note_send()
            signal = self._patterns.signal(result.reply)
            await destination.on_signal(signal)
            attempt.outcomes.append(
                Outcome(
                    recipient,
                    result.reply,
                    session.host,
                    result.possible_duplicate,
                    signed.summary if signed else None,
                )
            )
            if signal is Signal.BLOCK:
                attempt.blocked_by = result.reply
                attempt.untried = [r for r, _ in pending[done + 1 :]]
                return len(pending)
        return len(pending)

    async def _send_shared(
        self,
        session: SmtpSession,
        batch: DeliveryBatch,
        destination: Destination,
        pending: list[tuple[BatchRecipient, float]],
        attempt: _Attempt,
    ) -> int:
        """Every pending recipient in one transaction (same bytes, one return path)."""
        if self._paused_until(batch, utc_now()) is not None:
            attempt.untried = [r for r, _ in pending]
            return len(pending)
        wait_s = pending[0][1] - self._clock()
        metrics.QUOTA_WAIT_SECONDS.labels(*self._labels(batch)).observe(max(wait_s, 0.0))
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        recipients = [r for r, _ in pending]
        data = compose(
            batch,
            recipients[0],
            shared=True,
            ids=MessageIds(self._policy.verp_key, self._policy.bounce_domain),
        )
        signed = self._signer.sign(data, batch.tenant) if self._signer else None
        data = signed.data if signed else data
        started = self._clock()
        results = await session.send_many(
            f"bounces@{self._policy.bounce_domain}", [r.email for r in recipients], data
        )
        if results[0].stale:
            attempt.stale = True
            return 0
        if self.ledger is not None:
            replies = [(r, x.reply) for r, x in zip(recipients, results, strict=True)]
            await self.ledger.record(batch, replies)
        metrics.SMTP_SECONDS.labels(*self._labels(batch)).observe(self._clock() - started)
        for recipient, result in zip(recipients, results, strict=True):
            destination.note_send()
            signal = self._patterns.signal(result.reply)
            await destination.on_signal(signal)
            summary = signed.summary if signed else None
            attempt.outcomes.append(
                Outcome(recipient, result.reply, session.host, result.possible_duplicate, summary)
            )
            if signal is Signal.BLOCK:
                attempt.blocked_by = result.reply
        return len(pending)

    def _pause(self, batch: DeliveryBatch, reply: SmtpReply) -> Output:
        until = utc_now() + timedelta(seconds=self._rules.backoff.block_pause_s)
        self._own_pauses[batch.throttle_key] = (until, self._controls.updates(scope_for(batch)))
        log.warning(
            "destination blocked us: pausing it for this pool",
            extra={
                "destination": batch.throttle_key,
                "pool": batch.pool,
                "until": until.isoformat(),
                "reply": reply.text,
            },
        )
        command = ControlCommand(
            scope=scope_for(batch),
            action=ControlAction.PAUSE,
            expires_at=until,
            reason=f"blocked: {reply.code} {reply.enhanced or ''} {reply.text}"[:300],
        )
        return control_output(command)

    def _held_after_block(
        self, batch: DeliveryBatch, recipients: list[BatchRecipient], reply: SmtpReply
    ) -> list[Output]:
        """A `deferred` event for each recipient not tried because the server blocked us:
        the reply that paused the destination is their reason too."""
        now = utc_now()
        category = classify(reply.code, reply.enhanced, reply.text).category
        detail = (
            f"not tried: {scope_for(batch)} paused for {self._rules.backoff.block_pause_s:.0f} s"
        )
        return [
            self._event(batch, r, EventType.DEFERRED, reply, None, now, category, False, detail)
            for r in recipients
        ]

    def _hold(
        self,
        batch: DeliveryBatch,
        recipients: list[BatchRecipient],
        until: datetime,
        reason: str,
        now: datetime,
    ) -> list[Output]:
        """Move recipients to a delay topic without counting an attempt, at most until the
        message's maximum age (a pause lifted before then still lets it go); past that age,
        expire them."""
        deadline = batch.accepted_at + self._policy.max_age
        if now >= deadline:
            reply = SmtpReply(code=451, enhanced="4.4.7", text=f"expired while held ({reason})")
            return [
                self._event(batch, r, EventType.EXPIRED, reply, None, now, Category.EXPIRED, True)
                for r in recipients
            ]
        until = min(until, deadline)
        held = batch.model_copy(
            update={"recipients": recipients, "not_before": until, "held_for": reason}
        )
        return [batch_output(retry_topic(tier_for(until - now)), held)]

    def _records(self, batch: DeliveryBatch, outcomes: list[Outcome]) -> list[Output]:
        now = utc_now()
        outputs: list[Output] = []
        deferred: list[BatchRecipient] = []
        delay = next_delay(batch.attempt, self._policy.retry_schedule_s)
        too_old = expired(batch.accepted_at, now, delay, self._policy.max_age)
        for outcome in outcomes:
            reply = outcome.reply
            if reply.code < 400:
                kind, category, hard = EventType.DELIVERED, None, None
            else:
                verdict = classify(reply.code, reply.enhanced, reply.text)
                if reply.code >= 500 and verdict.hard:
                    kind, category, hard = EventType.BOUNCED, verdict.category, True
                elif too_old:
                    kind, category, hard = EventType.EXPIRED, Category.EXPIRED, True
                else:
                    kind, category, hard = EventType.DEFERRED, verdict.category, False
                    deferred.append(outcome.recipient)
            detail = (
                "possible duplicate: no reply to the final dot"
                if outcome.possible_duplicate
                else None
            )
            outputs.append(
                self._event(
                    batch,
                    outcome.recipient,
                    kind,
                    reply,
                    outcome.mx,
                    now,
                    category,
                    hard,
                    detail,
                    outcome.dkim,
                )
            )
        if deferred:
            retry = batch.model_copy(
                update={
                    "recipients": deferred,
                    "attempt": batch.attempt + 1,
                    "not_before": now + delay,
                    "held_for": None,
                }
            )
            outputs.append(batch_output(retry_topic(tier_for(delay)), retry))
        return outputs

    @staticmethod
    def _event(
        batch: DeliveryBatch,
        recipient: BatchRecipient,
        kind: EventType,
        reply: SmtpReply,
        mx: str | None,
        now: datetime,
        category: Category | None,
        hard: bool | None,
        detail: str | None = None,
        dkim: str | None = None,
    ) -> Output:
        return event_output(
            DeliveryEvent(
                type=kind,
                message_id=batch.message_id,
                tenant=batch.tenant,
                recipient=recipient.email,
                ts=now,
                attempt=batch.attempt,
                pool=batch.pool,
                mx=mx,
                smtp=reply,
                category=category,
                hard=hard,
                detail=detail,
                dkim=dkim,
                tags=batch.tags,
            )
        )
