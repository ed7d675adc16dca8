"""Operator commands as `mail.control` records: scopes, keys, rates and durations.

A target is a destination (throttle key: a domain, or a provider group such as `gmail`), a
pool, a tenant, or a combination; its scope is written in one canonical order
(`domain:gmail.com@pool:marketing@tenant:acme`), so the same target always has the same key
and `resume` finds what `pause` wrote. A pause is keyed by its bare scope (the key the
senders themselves use when a destination blocks them); the other actions append
`@control:<action>`, so a pause and a quota override on one destination live side by side.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.records import ControlAction, ControlCommand, utc_now

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h|hour|d|day))?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
#: A purge covers mail accepted before it; past the longest a message may stay queued
#: (MAILRAIL_MAX_AGE_S, 3 days by default) it has nothing left to do.
PURGE_LIFETIME = timedelta(days=7)


class CommandError(ValueError):
    """An operator's request that cannot become a control record (the message says why)."""


@dataclass(frozen=True)
class Target:
    domain: str | None = None
    pool: str | None = None
    tenant: str | None = None

    def __post_init__(self) -> None:
        if not (self.domain or self.pool or self.tenant):
            raise CommandError("name a destination, a pool or a tenant")
        if self.domain and not _DOMAIN.match(self.domain.lower()):
            raise CommandError(f"not a destination: {self.domain!r}")
        for kind, value in (("pool", self.pool), ("tenant", self.tenant)):
            if value and not _NAME.match(value):
                raise CommandError(f"not a {kind} name: {value!r}")

    @property
    def scope(self) -> str:
        parts = [
            f"{kind}:{value.lower()}"
            for kind, value in (
                ("domain", self.domain),
                ("pool", self.pool),
                ("tenant", self.tenant),
            )
            if value
        ]
        return "@".join(parts)

    @classmethod
    def from_scope(cls, scope: str) -> "Target":
        parts = dict(part.partition(":")[::2] for part in scope.split("@"))
        return cls(
            parts.get("domain") or parts.get("provider"), parts.get("pool"), parts.get("tenant")
        )


def key_for(action: ControlAction, target: Target) -> str:
    """The `mail.control` key (and the command's `scope`) of an action on a target."""
    if action is ControlAction.PAUSE:
        return target.scope
    return f"{target.scope}@control:{action.value}"


def parse_rate(text: str) -> float:
    """`5`, `5/s`, `300/m`, `10000/h`, `100000/d` → messages per second."""
    match = _RATE.match(text)
    if not match or float(match[1]) <= 0:
        raise CommandError(f"not a rate: {text!r} (e.g. 5/s, 300/m, 10000/h)")
    return float(match[1]) / _UNIT_S[match[2] or "s"]


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `1d` (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match or float(match[1]) <= 0:
        raise CommandError(f"not a duration: {text!r} (e.g. 30m, 2h, 1d)")
    return timedelta(seconds=float(match[1]) * _UNIT_S[match[2] or "s"])


def build(
    action: ControlAction,
    target: Target,
    *,
    lasting: timedelta | None = None,
    rate_per_s: float | None = None,
    to_pool: str | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> ControlCommand:
    """The record for one operator command, checked for what each action needs."""
    now = now or utc_now()
    if action is ControlAction.QUOTA and rate_per_s is None:
        raise CommandError("a quota needs a rate")
    if action is ControlAction.MOVE:
        if not target.domain or target.tenant:
            raise CommandError("move takes a destination (and optionally the pool it leaves)")
        if not to_pool or not _NAME.match(to_pool):
            raise CommandError("move needs the pool to move to")
        if to_pool == target.pool:
            raise CommandError("move to the pool the mail is already in")
    if action is ControlAction.PURGE and not (target.domain or target.tenant):
        raise CommandError("purge takes a destination or a tenant")
    if action is ControlAction.PURGE and lasting is None:
        lasting = PURGE_LIFETIME
    return ControlCommand(
        scope=key_for(action, target),
        action=action,
        messages_per_s=rate_per_s if action is ControlAction.QUOTA else None,
        to_pool=to_pool if action is ControlAction.MOVE else None,
        expires_at=now + lasting if lasting is not None else None,
        reason=reason[:300] if reason else None,
        created_at=now,
    )


def check_pools(target: Target, to_pool: str | None, pools: list[str]) -> None:
    """Refuse pools the rules file does not know (when the caller knows the pools)."""
    for pool in (target.pool, to_pool):
        if pool and pool not in pools:
            raise CommandError(f"unknown pool {pool!r}; pools: {', '.join(pools)}")
