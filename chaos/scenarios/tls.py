"""TLS: scenario 13 (expired and wrong-name certificates, a reset mid-handshake, plaintext
injected after STARTTLS), each under the per-domain policy that decides what must happen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chaos.load import post_sync
from chaos.oracle import EventReader, Verdict, judge, wait_final
from chaos.scenarios import Scenario
from chaos.scenarios.common import accepted_everything
from chaos.stack import API_KEY, BASE_RULES, ChaosStack, free_port, started
from chaos.tls import Authority, Behaviour, TlsSink, stop_all
from schemas.records import DeliveryEvent, EventType
from schemas.rules import TlsPolicy
from tests.support.dns_server import start_dns_server

ZONE = "tls.chaos.example"
#: Deferred mail (TLS required and impossible) expires this soon, so the scenario ends.
MAX_AGE_S = "10"
SETTLE_TIMEOUT_S = 60


@dataclass(frozen=True)
class _Server:
    address: str
    behaviour: Behaviour
    #: The name its certificate is for (its MX host name unless the case is a wrong name).
    cert_name: str | None = None
    expired: bool = False


def _mx(name: str) -> str:
    return f"mx.{name}.{ZONE}"


SERVERS: dict[str, _Server] = {
    "good": _Server("127.0.0.41", "tls"),
    "expired": _Server("127.0.0.42", "tls", expired=True),
    "wrongname": _Server("127.0.0.43", "tls", cert_name="mx.elsewhere.chaos.example"),
    "reset": _Server("127.0.0.44", "reset"),
    "inject": _Server("127.0.0.45", "inject"),
    "plain": _Server("127.0.0.46", "plain"),
    "disabled": _Server("127.0.0.47", "tls"),
}


@dataclass(frozen=True)
class _Case:
    server: str
    tls: TlsPolicy
    #: Delivered: over TLS or not. None: never delivered (deferred 4.7.x, then expired).
    over_tls: bool | None

    @property
    def final(self) -> EventType:
        return EventType.EXPIRED if self.over_tls is None else EventType.DELIVERED


#: Recipient domain `<case>.tls.chaos.example`, its MX (a server above), policy, outcome.
CASES: dict[str, _Case] = {
    "good-required": _Case("good", "required", True),
    "expired-required": _Case("expired", "required", None),
    "expired-opportunistic": _Case("expired", "opportunistic", True),
    "wrongname-required": _Case("wrongname", "required", None),
    "reset-required": _Case("reset", "required", None),
    "reset-opportunistic": _Case("reset", "opportunistic", False),
    "inject-required": _Case("inject", "required", True),
    "inject-opportunistic": _Case("inject", "opportunistic", True),
    "plain-required": _Case("plain", "required", None),
    "plain-opportunistic": _Case("plain", "opportunistic", False),
    "disabled": _Case("disabled", "disabled", False),
}


def _domain(case: str) -> str:
    return f"{case}.{ZONE}"


def _rules() -> dict[str, Any]:
    return {
        **BASE_RULES,
        "domains": {_domain(name): {"tls": case.tls} for name, case in CASES.items()},
    }


def _dns_records() -> dict[str, Any]:
    records: dict[str, Any] = {}
    for name, case in CASES.items():
        records[_domain(name)] = {"MX": [(10, _mx(case.server))]}
    for name, server in SERVERS.items():
        records[_mx(name)] = {"A": [server.address]}
    return records


def _start_sinks(authority: Authority, port: int) -> dict[str, TlsSink]:
    sinks: dict[str, TlsSink] = {}
    try:
        for name, server in SERVERS.items():
            context = None
            if server.behaviour != "plain":
                context = authority.server_context(
                    server.cert_name or _mx(name), expired=server.expired
                )
            sinks[name] = TlsSink(server.address, port, server.behaviour, context)
    except BaseException:
        stop_all(sinks)
        raise
    return sinks


def _tls_stack(dns_address: str, port: int) -> tuple[ChaosStack, Authority]:
    """The pipeline, and the CA (in the run's folder) that its sender alone trusts."""
    stack = ChaosStack(
        "s13",
        rules=_rules(),
        env={
            "MAILRAIL_DNS": dns_address,
            "MAILRAIL_SMTP_PORT": str(port),
            "MAILRAIL_MAX_AGE_S": MAX_AGE_S,
        },
    )
    authority = Authority(stack.dir / "ca")
    stack.add_ingest()
    stack.add_router()
    # ssl.create_default_context() loads OpenSSL's default verify paths: SSL_CERT_FILE.
    stack.add_sender("sender-0", SSL_CERT_FILE=str(authority.ca_file))
    return stack, authority


def tls_faults(full: bool) -> Verdict:
    """13. Expired or wrong-name certificate, reset mid-handshake, plaintext injected after
    STARTTLS: deferred (4.7.x, then expired) where TLS is required, never sent in plaintext
    there; opportunistic TLS goes on unverified or falls back to plaintext on a new
    connection; the injected bytes are ignored."""
    verdict = Verdict("13", "TLS: bad certs, reset, injection")
    per_case = 3 if full else 1
    port = free_port(SERVERS["good"].address)
    dns = start_dns_server(_dns_records())
    sinks: dict[str, TlsSink] = {}
    try:
        stack, authority = _tls_stack(dns.address, port)
        sinks = _start_sinks(authority, port)
        with started(stack):
            rcpts = {
                name: [f"user{i}-s13@{_domain(name)}" for i in range(per_case)] for name in CASES
            }
            load = post_sync(
                f"http://{stack.http_addr}",
                API_KEY,
                [
                    {"from": "c@acme.example", "to": [r], "subject": name, "text": "tls"}
                    for name, addresses in rcpts.items()
                    for r in addresses
                ],
            )
            accepted_everything(verdict, load, len(CASES) * per_case)
            expect = {r: CASES[name].final for name, addresses in rcpts.items() for r in addresses}
            reader = EventReader(stack.bootstrap, stack.topic("mail.events"))
            try:
                if not wait_final(reader, load.pairs, SETTLE_TIMEOUT_S):
                    verdict.note(
                        f"not every recipient reached a final state within {SETTLE_TIMEOUT_S} s"
                    )
                events = list(reader.events)
            finally:
                reader.close()
            messages = [m for sink in sinks.values() for m in sink.messages]
            judge(verdict, load.pairs, events, messages, started=load.started, expect=expect)
            _check(verdict, stack, sinks, rcpts, events)
    finally:
        stop_all(sinks)
        dns.stop()
    return verdict


def _check(
    verdict: Verdict,
    stack: ChaosStack,
    sinks: dict[str, TlsSink],
    rcpts: dict[str, list[str]],
    events: list[DeliveryEvent],
) -> None:
    arrivals = {
        r.lower(): received.over_tls
        for sink in sinks.values()
        for received in sink.received
        for r in received.rcpt_tos
    }
    seen_rcpt = [(a.lower(), tls) for sink in sinks.values() for a, tls in sink.rcpts]
    required = {r.lower() for n, rs in rcpts.items() if CASES[n].tls == "required" for r in rs}
    verdict.check(
        "never plaintext where TLS is required",
        not [a for a, tls in seen_rcpt if a in required and not tls],
        f"{sum(1 for a, tls in seen_rcpt if a in required and not tls)} RCPT in plaintext",
    )
    refused = {n for n, case in CASES.items() if case.over_tls is None}
    envelope_sent = sorted(
        {a for a, _ in seen_rcpt if any(a in (r.lower() for r in rcpts[n]) for n in refused)}
    )
    verdict.check(
        "TLS required and impossible: no envelope sent at all",
        not envelope_sent,
        f"RCPT received for {envelope_sent[:3]}",
    )
    codes: dict[str, set[str]] = {}
    for name in refused:
        wanted = {r.lower() for r in rcpts[name]}
        codes[name] = {
            f"{e.smtp.code} {e.smtp.enhanced}"
            for e in events
            if e.recipient.lower() in wanted and e.type is EventType.DEFERRED and e.smtp
        }
    verdict.check(
        "TLS required and impossible: deferred 4.7.x (then expired)",
        all(c and all(" 4.7." in code for code in c) for c in codes.values()),
        "; ".join(f"{n}: {sorted(c)}" for n, c in sorted(codes.items())),
    )
    refusing = {
        n: (sinks[n].starttls, sinks[n].handshake_failures) for n in ("expired", "wrongname")
    }
    verdict.check(
        "bad certificates: STARTTLS tried, the handshake refused by the sender",
        all(tried >= 1 and failed >= 1 for tried, failed in refusing.values()),
        "; ".join(f"{n}: {t} STARTTLS, {f} handshakes failed" for n, (t, f) in refusing.items()),
    )
    wrong_transport = [
        f"{r} ({'TLS' if arrivals.get(r.lower()) else 'plaintext'})"
        for name, case in CASES.items()
        if case.over_tls is not None
        for r in rcpts[name]
        if r.lower() in arrivals and arrivals[r.lower()] != case.over_tls
    ]
    verdict.check(
        "delivered over TLS or in plaintext as the policy says",
        not wrong_transport,
        ", ".join(wrong_transport[:4])
        or "good, expired (unverified) and injected over TLS; "
        "reset, plain and disabled in plaintext",
    )
    fallbacks = [line for line in stack.log_lines("sender-0") if "in plaintext on a new" in line]
    verdict.check(
        "reset mid-handshake, opportunistic: retried in plaintext on a new connection",
        sinks["reset"].starttls >= 1
        and sinks["reset"].connections > sinks["reset"].starttls
        and bool(fallbacks),
        f"{sinks['reset'].starttls} handshakes reset, {sinks['reset'].connections} connections, "
        f"{len(fallbacks)} fallbacks logged",
    )
    injected = {
        e.smtp.code
        for e in events
        if e.type is EventType.DELIVERED
        and e.smtp
        and e.recipient.lower()
        in {r.lower() for n in ("inject-required", "inject-opportunistic") for r in rcpts[n]}
    }
    verdict.check(
        "plaintext injected after the 220 to STARTTLS ignored",
        injected == {250} and sinks["inject"].starttls >= 1,
        f"replies to the injected sessions' messages {sorted(injected)}",
    )
    verdict.check(
        "disabled: STARTTLS never sent",
        sinks["disabled"].starttls == 0,
        f"{sinks['disabled'].starttls} STARTTLS at the disabled destination's server",
    )
    connections = {name: sink.connections for name, sink in sinks.items()}
    verdict.note(f"connections per server: {connections}")
    errors = [f"{name}: {e}" for name, sink in sinks.items() for e in sink.errors]
    if errors:
        verdict.note(f"server-side session errors: {errors[:3]}")


SCENARIOS = [
    Scenario(13, "TLS: bad certs, reset, injection", tls_faults),
]
