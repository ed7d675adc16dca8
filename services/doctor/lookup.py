"""Blocking DNS look-ups for the doctor: empty for NXDOMAIN or no answer, `DnsError` otherwise."""

import ipaddress

import dns.exception
import dns.resolver

DNS_TIMEOUT_S = 5.0


class DnsError(Exception):
    """The question got no usable answer (timeout, SERVFAIL, REFUSED): a temporary error."""


class Dns:
    def __init__(self, nameserver: tuple[str, int] | None = None) -> None:
        if nameserver is None:
            self._resolver = dns.resolver.Resolver()
        else:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.lifetime = DNS_TIMEOUT_S
        self._cache: dict[tuple[str, str], list[dns.rdata.Rdata]] = {}

    def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._cache:
            try:
                answer = self._resolver.resolve(key[0], rdtype, raise_on_no_answer=False)
                self._cache[key] = list(answer)
            except dns.resolver.NXDOMAIN:
                self._cache[key] = []
            except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
                raise DnsError(f"{rdtype} {key[0]}: {exc}") from None
        return self._cache[key]

    def txt(self, name: str) -> list[str]:
        """Each TXT record with its character-strings joined (how SPF, DKIM, DMARC read them)."""
        return [
            b"".join(record.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
            for record in self._query(name, "TXT")
        ]

    def addresses(self, name: str, version: int | None = None) -> list[str]:
        types = {4: ["A"], 6: ["AAAA"]}.get(version or 0, ["A", "AAAA"])
        return [record.to_text() for rdtype in types for record in self._query(name, rdtype)]

    def mx(self, name: str) -> list[tuple[int, str]]:
        return sorted(
            (record.preference, record.exchange.to_text().rstrip("."))  # type: ignore[attr-defined]
            for record in self._query(name, "MX")
        )

    def ptr(self, address: str) -> list[str]:
        pointer = ipaddress.ip_address(address).reverse_pointer
        return [record.to_text().rstrip(".") for record in self._query(pointer, "PTR")]
