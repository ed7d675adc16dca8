"""SPF `check_host()` (RFC 7208) for one IP, counting DNS look-ups against the limit of 10.

Mechanisms: all, include, a, mx, ptr, ip4, ip6, exists; modifiers redirect and exp; macros
%{i s l o d h} with reversal and digit transformers (the sender is `postmaster@<domain>`,
HELO the domain). More than 10 look-ups, or more than 2 that find nothing, is a permerror.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import TypeVar

from services.doctor.lookup import Dns, DnsError

LOOKUP_LIMIT = 10
VOID_LOOKUP_LIMIT = 2
MX_HOST_LIMIT = 10

_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISM = re.compile(
    r"^(?P<q>[-+~?]?)(?P<name>all|include|a|mx|ptr|ip4|ip6|exists)"
    r"(?::(?P<arg>[^/]+))?(?:/(?P<cidr4>\d+))?(?://(?P<cidr6>\d+))?$",
    re.IGNORECASE,
)
_MACRO = re.compile(
    r"%\{(?P<letter>[slodiphcrtv])(?P<digits>\d*)(?P<reverse>r?)(?P<delims>[-.+,/_=]*)\}"
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


class PermError(Exception):
    pass


@dataclass
class SpfOutcome:
    result: str
    lookups: int = 0
    #: The term that decided, or what went wrong.
    detail: str = ""


@dataclass
class _State:
    ip: IpAddress
    domain: str
    lookups: int = 0
    voids: int = 0
    seen: set[str] = field(default_factory=set)


class SpfEvaluator:
    def __init__(self, dns: Dns) -> None:
        self._dns = dns

    def records(self, domain: str) -> list[str]:
        return [t for t in self._dns.txt(domain) if t.lower().split(" ", 1)[0] == "v=spf1"]

    def lookup_count(self, domain: str, seen: frozenset[str] = frozenset()) -> int:
        """Look-ups an IP that matches no term costs: the worst case the limit must hold for."""
        records = self.records(domain)
        if len(records) != 1 or domain in seen or len(seen) > LOOKUP_LIMIT:
            return 0
        total = 0
        for term in records[0].split()[1:]:
            name, sep, value = term.partition("=")
            match = _MECHANISM.match(term)
            if sep and name.lower() == "redirect":
                target = value
            elif match is not None and match["name"].lower() == "include":
                target = match["arg"] or ""
            else:
                if match is not None and match["name"].lower() in ("a", "mx", "ptr", "exists"):
                    total += 1
                continue
            total += 1
            if "%" not in target:
                total += self.lookup_count(target.rstrip(".").lower(), seen | {domain})
        return total

    def check(self, ip: str, domain: str) -> SpfOutcome:
        state = _State(ipaddress.ip_address(ip), domain)
        try:
            result, detail = self._check_host(domain, state)
        except PermError as exc:
            return SpfOutcome("permerror", state.lookups, str(exc))
        except DnsError as exc:
            return SpfOutcome("temperror", state.lookups, str(exc))
        return SpfOutcome(result, state.lookups, detail)

    def _check_host(self, domain: str, state: _State) -> tuple[str, str]:
        records = self.records(domain)
        if not records:
            return "none", f"no SPF record at {domain}"
        if len(records) > 1:
            raise PermError(f"{domain} has {len(records)} SPF records; there must be one")
        redirect = None
        for term in records[0].split()[1:]:
            name, sep, value = term.partition("=")
            if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name):
                if name.lower() == "redirect":
                    redirect = value
                continue
            match = _MECHANISM.match(term)
            if match is None:
                raise PermError(f"{domain}: unknown term {term!r}")
            if self._matches(match, domain, state):
                return _RESULTS[match["q"] or "+"], f"{domain}: {term}"
        if redirect is not None:
            target = self._expand(redirect, domain, state)
            self._count(state)
            result, detail = self._check_host(target, state)
            if result == "none":
                raise PermError(f"{domain}: redirect to {target}, which has no SPF record")
            return result, detail
        return "neutral", f"{domain}: no term matched"

    def _matches(self, match: re.Match[str], domain: str, state: _State) -> bool:
        name = match["name"].lower()
        arg = match["arg"]
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            if arg is None:
                raise PermError(f"{domain}: {name} needs an address")
            prefix = match["cidr4"]  # ip4:net/len and ip6:net/len both use one slash
            network = ipaddress.ip_network(f"{arg}/{prefix}" if prefix else arg, strict=False)
            return state.ip.version == network.version and state.ip in network
        target = self._expand(arg, domain, state) if arg else domain
        self._count(state)
        if name == "include":
            if target in state.seen:
                raise PermError(f"{domain}: include loop through {target}")
            state.seen.add(target)
            result, _ = self._check_host(target, state)
            if result == "none":
                raise PermError(f"{domain}: include:{target} has no SPF record")
            return result == "pass"
        if name == "exists":
            return bool(self._void(self._dns.addresses(target, 4), state))
        if name == "ptr":
            return any(n == target or n.endswith("." + target) for n in self._ptr_names(state))
        hosts = [target]
        if name == "mx":
            hosts = [host for _, host in self._void(self._dns.mx(target), state)]
            if len(hosts) > MX_HOST_LIMIT:
                raise PermError(f"{domain}: mx:{target} has more than {MX_HOST_LIMIT} hosts")
        cidr = int(match["cidr4"] or 32) if state.ip.version == 4 else int(match["cidr6"] or 128)
        for host in hosts:
            addresses = self._dns.addresses(host, state.ip.version)
            if name == "a":
                self._void(addresses, state)
            for address in addresses:
                if state.ip in ipaddress.ip_network(f"{address}/{cidr}", strict=False):
                    return True
        return False

    def _ptr_names(self, state: _State) -> list[str]:
        address = str(state.ip)
        return [
            n for n in self._dns.ptr(address)[:MX_HOST_LIMIT] if address in self._dns.addresses(n)
        ]

    def _count(self, state: _State) -> None:
        state.lookups += 1
        if state.lookups > LOOKUP_LIMIT:
            raise PermError(f"more than {LOOKUP_LIMIT} DNS look-ups")

    def _void(self, found: list[T], state: _State) -> list[T]:
        if not found:
            state.voids += 1
            if state.voids > VOID_LOOKUP_LIMIT:
                raise PermError(f"more than {VOID_LOOKUP_LIMIT} look-ups found nothing")
        return found

    @staticmethod
    def _expand(spec: str, domain: str, state: _State) -> str:
        if "%" not in spec:
            return spec.rstrip(".").lower()
        ip = state.ip
        ip_text = str(ip) if ip.version == 4 else ".".join(ip.exploded.replace(":", ""))
        values = {
            "s": f"postmaster@{state.domain}",
            "l": "postmaster",
            "o": state.domain,
            "d": domain,
            "i": ip_text,
            "h": state.domain,
            "v": "in-addr" if ip.version == 4 else "ip6",
            "p": "unknown",
        }

        def replace(macro: re.Match[str]) -> str:
            value = values.get(macro["letter"].lower())
            if value is None:
                raise PermError(f"macro {macro[0]} is not allowed here")
            parts = re.split("[" + re.escape(macro["delims"] or ".") + "]", value)
            if macro["reverse"]:
                parts.reverse()
            if macro["digits"]:
                parts = parts[-int(macro["digits"]) :]
            return ".".join(parts)

        expanded = (
            _MACRO.sub(replace, spec).replace("%%", "%").replace("%_", " ").replace("%-", "%20")
        )
        if "%" in expanded.replace("%20", ""):
            raise PermError(f"bad macro in {spec!r}")
        return expanded.rstrip(".").lower()
