"""An authoritative test DNS server on a loopback port, UDP and TCP, for tests.

    records = {
        "example.test": {"MX": [(10, "mx1.example.test")], "TXT": ["v=spf1 -all"]},
        "mx1.example.test": {"A": ["127.0.0.2"], "ttl": 5},
        "nullmx.test": {"MX": NULL_MX},
        "broken.test": "SERVFAIL",
        "slow.test": {"MX": "TIMEOUT", "A": ["127.0.0.3"]},
        "127.0.0.2": {"PTR": ["mx1.example.test"]},  # an IP key means its reverse name
    }
    with start_dns_server(records) as dns_server:
        ...  # MAILRAIL_DNS=dns_server.address

A name maps to its records by type (A, AAAA, MX, TXT, PTR, CNAME, plus ``ttl``), or to
a special answer for every type: ``"NXDOMAIN"``, ``"SERVFAIL"``, ``"REFUSED"`` or
``"TIMEOUT"`` (no answer at all: UDP stays silent, TCP holds the connection open).
A type can map to a special answer too. Names absent from the table answer NXDOMAIN;
a name present without the asked type answers NOERROR with no answers. Negative
answers carry an SOA (for negative caching). TXT strings longer than 255 bytes are
split into 255-byte character-strings, as DKIM keys need; over UDP, an answer larger
than the client's buffer (512 bytes, or its EDNS size) is truncated (TC) so the
client retries over TCP.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, TypedDict, cast

import dns.asyncresolver
from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    MX,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSRecord,
)
from dnslib.server import DNSHandler, DNSServer

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 300
DEFAULT_NEGATIVE_TTL_S = 60
TXT_CHUNK_BYTES = 255
UDP_DEFAULT_PAYLOAD_BYTES = 512
CNAME_CHAIN_LIMIT = 8
TCP_TIMEOUT_HOLD_S = 30.0
SERVE_POLL_INTERVAL_S = 0.05
PORT_ATTEMPTS = 50
STOP_TIMEOUT_S = 5.0

Special = Literal["NXDOMAIN", "SERVFAIL", "REFUSED", "TIMEOUT"]
SPECIALS: frozenset[str] = frozenset({"NXDOMAIN", "SERVFAIL", "REFUSED", "TIMEOUT"})

NULL_MX: list[tuple[int, str]] = [(0, ".")]
"""The RFC 7505 null MX: the domain accepts no mail."""


class NameRecords(TypedDict, total=False):
    """Records of one name. Every type may instead be a special answer."""

    A: Sequence[str] | Special
    AAAA: Sequence[str] | Special
    MX: Sequence[tuple[int, str]] | Special
    TXT: Sequence[str | bytes] | Special
    PTR: Sequence[str] | Special
    CNAME: str
    ttl: int


Entry = NameRecords | Special
Records = Mapping[str, Entry]

_RECORD_TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME")


def normalize_name(name: str) -> str:
    """Lower-case, no trailing dot; an IP address becomes its reverse-lookup name."""
    try:
        return ipaddress.ip_address(name).reverse_pointer
    except ValueError:
        return name.rstrip(".").lower()


def txt_chunks(value: str | bytes) -> list[bytes]:
    """Split a TXT value into the ≤255-byte character-strings one TXT record carries."""
    raw = value.encode() if isinstance(value, str) else value
    return [raw[i : i + TXT_CHUNK_BYTES] for i in range(0, len(raw), TXT_CHUNK_BYTES)] or [b""]


def _validate(name: str, entry: Entry) -> Entry:
    if isinstance(entry, str):
        if entry not in SPECIALS:
            raise ValueError(f"{name}: unknown special answer {entry!r}; use one of {SPECIALS}")
        return entry
    unknown = set(entry) - {*_RECORD_TYPES, "ttl"}
    if unknown:
        raise ValueError(f"{name}: unknown record types {sorted(unknown)}")
    for rtype, value in entry.items():
        if rtype in {"ttl", "CNAME"} or (isinstance(value, str) and value in SPECIALS):
            continue
        if rtype == "MX":
            for item in cast(Sequence[Any], value):
                if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int)):
                    raise ValueError(f"{name}: MX records are (preference, host), got {item!r}")
        elif isinstance(value, str | bytes):
            raise ValueError(f"{name}: {rtype} takes a list of values, got {value!r}")
    return entry


@dataclass(frozen=True)
class DnsQuery:
    """One question the server was asked."""

    name: str
    qtype: str
    protocol: str
    at: float


class _Table:
    """The records, the query log and the answering logic, shared by the UDP and TCP servers."""

    def __init__(self, records: Records) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._queries: list[DnsQuery] = []
        self.stopping = threading.Event()
        for name, entry in records.items():
            self.set(name, entry)

    def set(self, name: str, entry: Entry | None) -> None:
        key = normalize_name(name)
        with self._lock:
            if entry is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = _validate(name, entry)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(normalize_name(name))

    def queries(self) -> list[DnsQuery]:
        with self._lock:
            return list(self._queries)

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    def resolve(self, request: Any, handler: Any) -> Any:
        """dnslib's resolver interface: a reply record, or ``_NoAnswer`` for a timeout."""
        qname = str(request.q.qname)
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self._queries.append(
                DnsQuery(normalize_name(qname), qtype, handler.protocol, time.time())
            )
        reply = request.reply()
        entry = self.get(qname)
        if entry is None:
            return self._negative(reply, qname, "NXDOMAIN", DEFAULT_NEGATIVE_TTL_S)
        if isinstance(entry, str):
            return self._special(reply, qname, entry, handler)
        ttl = entry.get("ttl", DEFAULT_TTL_S)
        owner, chased = qname, 0
        while qtype != "CNAME" and "CNAME" in entry and chased < CNAME_CHAIN_LIMIT:
            target = entry["CNAME"]
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(target), ttl=ttl))
            next_entry = self.get(target)
            if next_entry is None or isinstance(next_entry, str):
                return reply
            owner, entry, chased = target, next_entry, chased + 1
            ttl = entry.get("ttl", DEFAULT_TTL_S)
        value = cast(Mapping[str, Any], entry).get(qtype)
        if isinstance(value, str) and value in SPECIALS:
            return self._special(reply, qname, value, handler)
        if value is None:
            if not reply.rr:
                return self._negative(reply, qname, "NOERROR", ttl)
            return reply
        for rdata in _rdata(qtype, value):
            reply.add_answer(RR(owner, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl))
        return reply

    def _special(self, reply: Any, qname: str, special: str, handler: Any) -> Any:
        if special == "TIMEOUT":
            if handler.protocol == "tcp":
                self.stopping.wait(TCP_TIMEOUT_HOLD_S)
            raise _NoAnswer(qname)
        if special == "NXDOMAIN":
            return self._negative(reply, qname, special, DEFAULT_NEGATIVE_TTL_S)
        reply.header.rcode = getattr(RCODE, special)
        return reply

    @staticmethod
    def _negative(reply: Any, qname: str, rcode: str, negative_ttl: int) -> Any:
        reply.header.rcode = getattr(RCODE, rcode)
        labels = normalize_name(qname).split(".")
        zone = labels[-1] + "." if labels and labels[-1] else "."
        soa = SOA(
            mname="ns.mailrail.test",
            rname="hostmaster.mailrail.test",
            times=(1, 3600, 600, 86400, negative_ttl),
        )
        reply.add_auth(RR(zone, QTYPE.SOA, rdata=soa, ttl=negative_ttl))
        return reply


def _rdata(qtype: str, value: Any) -> list[Any]:
    if qtype == "A":
        return [A(v) for v in value]
    if qtype == "AAAA":
        return [AAAA(v) for v in value]
    if qtype == "MX":
        return [MX(host, preference) for preference, host in value]
    if qtype == "TXT":
        return [TXT(txt_chunks(v)) for v in value]
    if qtype == "PTR":
        return [PTR(v) for v in value]
    if qtype == "CNAME":
        return [CNAME(value)]
    return []


class _NoAnswer(DNSError):  # type: ignore[misc]
    """Raised by the resolver to send nothing back (dnslib's handler swallows DNSError)."""


class _Handler(DNSHandler):  # type: ignore[misc]
    """dnslib's handler, with UDP truncation sized by the client's EDNS buffer."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        limit = UDP_DEFAULT_PAYLOAD_BYTES
        for extra in request.ar:
            if extra.rtype == QTYPE.OPT:
                limit = max(limit, int(extra.rclass))
                reply.add_ar(EDNS0(udp_len=limit))
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > limit:
            truncated = request.reply()  # keeps the question, which clients match on
            truncated.header.tc = 1
            truncated.header.rcode = reply.header.rcode
            packed = truncated.pack()
        return packed


class _QuietLogger:
    """dnslib's logger interface, sent to ``logging`` at DEBUG instead of stdout."""

    def log_recv(self, handler: Any, data: bytes) -> None:
        pass

    def log_send(self, handler: Any, data: bytes) -> None:
        pass

    def log_request(self, handler: Any, request: Any) -> None:
        pass

    def log_reply(self, handler: Any, reply: Any) -> None:
        pass

    def log_truncated(self, handler: Any, reply: Any) -> None:
        logger.debug("truncated reply to %s", reply.q.qname)

    def log_error(self, handler: Any, error: Exception) -> None:
        if not isinstance(error, _NoAnswer):
            logger.debug("bad DNS request from %s: %s", handler.client_address, error)

    def log_data(self, record: Any) -> None:
        pass


class _Server(Protocol):
    server_address: tuple[str, int]

    def serve_forever(self, poll_interval: float = ...) -> None: ...

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


def _bind(table: _Table, host: str, port: int) -> tuple[_Server, _Server]:
    """A UDP and a TCP server on one port; port 0 finds one free for both."""
    last_error: OSError | None = None
    for _ in range(PORT_ATTEMPTS if port == 0 else 1):
        udp = DNSServer(table, address=host, port=port, logger=_QuietLogger(), handler=_Handler)
        udp_server = cast(_Server, udp.server)
        bound_port = udp_server.server_address[1]
        try:
            tcp = DNSServer(
                table,
                address=host,
                port=bound_port,
                tcp=True,
                logger=_QuietLogger(),
                handler=_Handler,
            )
        except OSError as error:
            udp_server.server_close()
            last_error = error
            continue
        return udp_server, cast(_Server, tcp.server)
    raise OSError(f"no port free for both UDP and TCP on {host}") from last_error


class RunningDnsServer:
    """A started server. Stop it with ``stop()`` or use it as a context manager."""

    def __init__(self, records: Records, host: str = "127.0.0.1", port: int = 0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test DNS servers listen on loopback only, not {host}")
        self._table = _Table(records)
        self._servers = _bind(self._table, host, port)
        self.host = host
        self.port = self._servers[0].server_address[1]
        self._threads = [
            threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": SERVE_POLL_INTERVAL_S},
                name=f"dns-server-{kind}-{self.port}",
                daemon=True,
            )
            for kind, server in zip(("udp", "tcp"), self._servers, strict=True)
        ]
        for thread in self._threads:
            thread.start()
        self._stopped = False

    @property
    def address(self) -> str:
        """``host:port``, the form ``MAILRAIL_DNS`` takes."""
        return f"{self.host}:{self.port}"

    def set(self, name: str, entry: Entry | None) -> None:
        """Replace the records of ``name`` (``None`` removes it: NXDOMAIN from now on)."""
        self._table.set(name, entry)

    def update(self, records: Records) -> None:
        """``set`` every name of ``records``."""
        for name, entry in records.items():
            self._table.set(name, entry)

    def get(self, name: str) -> Entry | None:
        return self._table.get(name)

    @property
    def queries(self) -> list[DnsQuery]:
        """Every question asked so far, oldest first (a copy)."""
        return self._table.queries()

    def query_count(self, name: str, qtype: str | None = None) -> int:
        """How many times ``name`` (of ``qtype``, if given) was asked, over UDP and TCP."""
        key = normalize_name(name)
        return sum(1 for q in self.queries if q.name == key and qtype in (None, q.qtype))

    def clear_queries(self) -> None:
        self._table.clear_queries()

    def async_resolver(self, lifetime_s: float = 2.0) -> dns.asyncresolver.Resolver:
        """A dnspython resolver that asks this server only (no resolv.conf, no cache)."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime_s
        resolver.timeout = lifetime_s
        return resolver

    def stop(self) -> None:
        """Stop answering and free the port. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._table.stopping.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(STOP_TIMEOUT_S)

    def __enter__(self) -> RunningDnsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_dns_server(
    records: Records | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningDnsServer:
    """Start an authoritative DNS server for ``records`` on ``host:port`` (0: a free port)."""
    return RunningDnsServer(records or {}, host, port)


class DnsServerFactory(Protocol):
    """The ``dns_server_factory`` fixture."""

    def __call__(
        self, records: Records | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> RunningDnsServer: ...
