"""Where to deliver a domain's mail: MX by preference (random among equals), A/AAAA fallback.

Answers are cached for their TTL (the lowest of the MX and address records, at most
`MAX_TTL_S`); NXDOMAIN and null MX for `NEGATIVE_TTL_S`; SERVFAIL and timeouts not at all,
so the next attempt asks again — but while a domain's last good answer is at hand, a
temporary failure serves it (stale, RFC 8767) rather than failing mail that was routable a
moment ago. Concurrent look-ups of one domain share one query: a burst of mail to a new
domain sends one question to the resolver, not one per message. Failures are returned as SMTP-style replies so the caller
handles them like any other: NXDOMAIN and null MX bounce, SERVFAIL and timeouts defer.
"""

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from schemas.records import SmtpReply

DNS_TIMEOUT_S = 10.0
NEGATIVE_TTL_S = 60.0
#: However long a record says: a destination that moves its MX is followed within the hour.
MAX_TTL_S = 3600.0
#: Domains whose answers are kept (least recently resolved forgotten first).
MAX_CACHED_DOMAINS = 100_000


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MxRoute:
    """Hosts in the order to try them, or the reply that ends the attempt."""

    hosts: tuple[MxHost, ...] = ()
    failure: SmtpReply | None = None


class MxResolver:
    def __init__(
        self,
        nameserver: tuple[str, int] | None = None,
        timeout_s: float = DNS_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nameserver is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.lifetime = timeout_s
        self._cache: OrderedDict[str, tuple[float, MxRoute]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[tuple[MxRoute, float]]] = {}
        self._clock = clock

    async def resolve(self, domain: str) -> MxRoute:
        cached = self._cache.get(domain)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return _shuffle_equal(cached[1])
        pending = self._pending.get(domain)
        if pending is None:
            pending = self._pending[domain] = asyncio.ensure_future(self._lookup(domain))
            pending.add_done_callback(lambda _: self._pending.pop(domain, None))
        route, ttl_s = await asyncio.shield(pending)
        if route.failure is None or route.failure.code >= 500:
            self._cache[domain] = (now + min(ttl_s, MAX_TTL_S), route)
            self._cache.move_to_end(domain)
            while len(self._cache) > MAX_CACHED_DOMAINS:
                self._cache.popitem(last=False)
        elif cached is not None and cached[1].failure is None:
            return _shuffle_equal(cached[1])  # a temporary failure: the last good answer
        return _shuffle_equal(route)

    async def _lookup(self, domain: str) -> tuple[MxRoute, float]:
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _fail(550, "5.1.2", f"domain {domain} does not exist"), NEGATIVE_TTL_S
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            return _fail(451, "4.4.3", f"DNS lookup of {domain} MX failed: {exc}"), 0.0
        records = sorted((r.preference, r.exchange.to_text().rstrip(".")) for r in answer)
        ttl_s = float(answer.rrset.ttl) if answer.rrset is not None else MAX_TTL_S
        if not records:
            # RFC 5321 §5.1: no MX → the domain itself is the implicit MX.
            records = [(0, domain)]
        elif len(records) == 1 and records[0][1] in ("", "."):
            return _fail(556, "5.1.10", f"{domain} accepts no mail (null MX)"), ttl_s
        hosts = []
        for preference, name in records:
            addresses, address_ttl_s = await self._addresses(name)
            ttl_s = min(ttl_s, address_ttl_s)
            if addresses:
                hosts.append(MxHost(name, preference, addresses))
        if not hosts:
            return _fail(451, "4.4.4", f"no address for any MX of {domain}"), NEGATIVE_TTL_S
        return MxRoute(hosts=tuple(hosts)), ttl_s

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], float]:
        addresses: list[str] = []
        ttls: list[float] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except (dns.resolver.NXDOMAIN, dns.exception.Timeout, dns.resolver.NoNameservers):
                continue
            if answer.rrset is not None:
                ttls.append(float(answer.rrset.ttl))
                addresses.extend(r.to_text() for r in answer)
        return tuple(addresses), min(ttls, default=NEGATIVE_TTL_S)


def _fail(code: int, enhanced: str, text: str) -> MxRoute:
    return MxRoute(failure=SmtpReply(code=code, enhanced=enhanced, text=text))


def _shuffle_equal(route: MxRoute) -> MxRoute:
    """Randomise the order among hosts of equal preference, keep preference order otherwise."""
    if len(route.hosts) < 2:
        return route
    keyed = sorted(route.hosts, key=lambda h: (h.preference, random.random()))
    return MxRoute(hosts=tuple(keyed))
