"""Watch the pool's source addresses in DNSBL zones; pause the pool while one is listed.

Every `interval_s` each address is looked up as `<reversed address>.<zone>` (nibbles for
IPv6). An A answer in 127.0.0.0/8 means listed (the TXT answer says why); NXDOMAIN or no
answer means not listed. 127.255.255.x answers (Spamhaus: query refused, e.g. through a
public resolver or over the free limit), answers outside 127/8, timeouts and SERVFAIL are
unknown: the previous state stands, so they never list and never delist an address.

A change logs a line and sets `mailrail_blocklisted{pool,ip,zone}`. With `pause` on, a zone
that lists any of the pool's addresses gets a `pause` `ControlCommand` per scope on
`mail.control` (`pool:<pool>@dnsbl:<zone>`, or `domain:<key>@pool:<pool>@dnsbl:<zone>` for
each destination configured for the zone), renewed before it expires; once the zone lists
none of them, a tombstone per scope clears it. A failed write is retried next round.
"""

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

import dns.asyncresolver
import dns.exception
import dns.resolver

from schemas.records import ControlAction, ControlCommand, utc_now
from services.runtime.codec import encode
from services.runtime.telemetry_metrics import counter, gauge

log = logging.getLogger(__name__)

DNS_TIMEOUT_S = 5.0
#: A pause is written again once less than this share of its lifetime is left.
RENEW_SHARE = 0.5

BLOCKLISTED = gauge(
    "mailrail_blocklisted", "1 while the address is listed in the zone", ["pool", "ip", "zone"]
)
LOOKUP_ERRORS = counter(
    "mailrail_dnsbl_lookup_errors_total", "DNSBL look-ups without a verdict", ["zone", "reason"]
)

#: Writes one record to `mail.control`: (key, value or None for a tombstone), acknowledged.
Publish = Callable[[str, bytes | None], Awaitable[object]]


class Listing(Enum):
    LISTED = "listed"
    CLEAR = "clear"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Verdict:
    listing: Listing
    detail: str = ""


@dataclass(frozen=True)
class WatchConfig:
    pool: str
    addresses: list[str]
    zones: list[str]
    interval_s: float = 300.0
    pause: bool = False
    #: Zone → destinations (throttle keys) it pauses; a zone not named pauses the whole pool.
    destinations: dict[str, list[str]] = field(default_factory=dict)
    pause_s: float = 3600.0

    def scopes(self, zone: str) -> list[str]:
        tail = f"pool:{self.pool}@dnsbl:{zone}"
        keys = self.destinations.get(zone)
        return [f"domain:{key}@{tail}" for key in keys] if keys else [tail]


def query_name(address: str, zone: str) -> str:
    """`1.2.0.192.zen.example` for 192.0.2.1; reversed nibbles for IPv6."""
    pointer = ipaddress.ip_address(address).reverse_pointer
    return f"{pointer.rsplit('.', 2)[0]}.{zone}"


class BlocklistWatch:
    def __init__(
        self,
        config: WatchConfig,
        publish: Publish,
        resolver: dns.asyncresolver.Resolver,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._config = config
        self._publish = publish
        self._resolver = resolver
        self._now = now
        #: (address, zone) → the last known verdict, LISTED or CLEAR.
        self.state: dict[tuple[str, str], Verdict] = {}
        #: Pause scopes written and not yet cleared → when the written one expires.
        self.paused: dict[str, datetime] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Check now and every `interval_s` until stopped; a failed round never stops the sender."""
        while not stop.is_set():
            try:
                await self.check()
            except Exception:
                log.exception("blocklist check failed; trying again next round")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.interval_s)

    async def check(self) -> None:
        """One round: look every address up in every zone, then bring mail.control in line."""
        pairs = [(a, z) for z in self._config.zones for a in self._config.addresses]
        verdicts = await asyncio.gather(*(self.lookup(a, z) for a, z in pairs))
        for (address, zone), verdict in zip(pairs, verdicts, strict=True):
            self._record(address, zone, verdict)
        if self._config.pause:
            for zone in self._config.zones:
                await self._sync(zone)

    async def lookup(self, address: str, zone: str) -> Verdict:
        name = query_name(address, zone)
        try:
            answer = await self._resolver.resolve(name, "A", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return Verdict(Listing.CLEAR)
        except dns.exception.DNSException as exc:
            LOOKUP_ERRORS.labels(zone, type(exc).__name__).inc()
            return Verdict(Listing.UNKNOWN, f"look-up failed: {exc}")
        codes = [ipaddress.ip_address(r.to_text()) for r in answer]
        listed = [c for c in codes if c in _LOOPBACK_NET and c not in _REFUSED_NET]
        if listed:
            return Verdict(Listing.LISTED, await self._reason(name, listed))
        if not codes:
            return Verdict(Listing.CLEAR)
        reason = "refused" if all(c in _REFUSED_NET for c in codes) else "not-127"
        LOOKUP_ERRORS.labels(zone, reason).inc()
        return Verdict(Listing.UNKNOWN, f"{reason}: {', '.join(map(str, codes))}")

    async def _reason(
        self, name: str, codes: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    ) -> str:
        text = ", ".join(map(str, codes))
        with contextlib.suppress(dns.exception.DNSException):
            answer = await self._resolver.resolve(name, "TXT", raise_on_no_answer=False)
            reasons = [b"".join(r.strings).decode(errors="replace") for r in answer]
            if reasons:
                text += f" ({'; '.join(reasons)})"
        return text

    def _record(self, address: str, zone: str, verdict: Verdict) -> None:
        labels = {"pool": self._config.pool, "ip": address, "zone": zone}
        if verdict.listing is Listing.UNKNOWN:
            log.warning(
                "DNSBL look-up without a verdict", extra={**labels, "detail": verdict.detail}
            )
            return
        previous = self.state.get((address, zone))
        self.state[(address, zone)] = verdict
        BLOCKLISTED.labels(**labels).set(1 if verdict.listing is Listing.LISTED else 0)
        if verdict.listing is Listing.LISTED and (
            previous is None or previous.listing is Listing.CLEAR
        ):
            log.error("pool address is blocklisted", extra={**labels, "detail": verdict.detail})
        elif (
            verdict.listing is Listing.CLEAR
            and previous is not None
            and previous.listing is Listing.LISTED
        ):
            log.warning("pool address is no longer blocklisted", extra=labels)

    def listed_in(self, zone: str) -> dict[str, str]:
        """Address → why, for the pool's addresses the zone lists."""
        return {
            address: verdict.detail
            for (address, listed_zone), verdict in self.state.items()
            if listed_zone == zone and verdict.listing is Listing.LISTED
        }

    async def _sync(self, zone: str) -> None:
        listed = self.listed_in(zone)
        now = self._now()
        lifetime = timedelta(seconds=self._config.pause_s)
        for scope in self._config.scopes(zone):
            expires = self.paused.get(scope)
            try:
                if listed and (expires is None or expires - now < lifetime * RENEW_SHARE):
                    reason = "; ".join(f"{a} listed in {zone}: {why}" for a, why in listed.items())
                    command = ControlCommand(
                        scope=scope,
                        action=ControlAction.PAUSE,
                        expires_at=now + lifetime,
                        reason=reason[:300],
                        created_at=now,
                    )
                    await self._publish(scope, encode(command))
                    self.paused[scope] = now + lifetime
                    log.warning("pool paused: address blocklisted", extra={"scope": scope})
                elif not listed and expires is not None:
                    await self._publish(scope, None)
                    del self.paused[scope]
                    log.warning("pool pause lifted: no longer blocklisted", extra={"scope": scope})
            except Exception:
                log.exception(
                    "writing to mail.control failed; retrying next round", extra={"scope": scope}
                )


_LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")
_REFUSED_NET = ipaddress.ip_network("127.255.255.0/24")


def resolver_for(nameserver: tuple[str, int] | None) -> dns.asyncresolver.Resolver:
    """A resolver asking `nameserver` only (host, port), or the system's resolvers."""
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = DNS_TIMEOUT_S
    return resolver
