"""Bad input and security: scenarios 16, 18 and 19."""

from __future__ import annotations

import base64
import json
import re
import smtplib
import time
from typing import Any

import httpx
from confluent_kafka import Producer

from chaos.load import Body, post_sync
from chaos.oracle import EventReader, Verdict
from chaos.scenarios import Scenario
from chaos.scenarios.common import relay_stack, settle_and_judge, sink_server, wait_until
from chaos.stack import API_KEY, OTHER_KEY, VERP_KEY, ChaosStack, started
from schemas.catalogue import RETRY_TIERS
from schemas.records import EventType, RejectedHeaders
from services.bounce.verp import encode_return_path
from tests.support.smtp_server import RunningSmtpServer

MAX_MESSAGE_BYTES = 64 * 1024
_BARE_LF = re.compile(rb"(?<!\r)\n")
_LONE_CR = re.compile(rb"\r(?!\n)")


def _poison_values(tag: str) -> dict[str, bytes | None]:
    """Kinds of poison: not JSON, JSON of the wrong shape, a schema version we do not know."""
    return {
        "malformed": b'{"v": 1, "tenant": "acme", "from": ',
        "wrong-shape": json.dumps([tag, 1, 2]).encode(),
        "unknown-version": json.dumps({"v": 2, "tenant": "acme", "note": tag}).encode(),
        "empty": None,
    }


def poison_records(full: bool) -> Verdict:
    """16. Poison records (malformed JSON, unknown schema version, oversized, empty) on every
    input topic: each lands in `mail.rejected` with the reason, and every consumer keeps going
    (mail sent afterwards is delivered, a suppression written afterwards is obeyed)."""
    verdict = Verdict("16", "poison records on every input topic")
    with sink_server() as sink:
        stack = relay_stack(
            "s16",
            sink,
            bounce=True,
            env={"MAILRAIL_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES)},
        )
        with started(stack):
            consumed = {
                "mail.submit": "ingest",
                "mail.accepted": "router",
                **{f"mail.retry.{tier}": "router" for tier in RETRY_TIERS},
                "mail.outbound.default": "sender-0",
                "mail.events": "bounce",
            }
            views = ["mail.suppression", "mail.control", "mail.ledger"]
            producer = Producer({"bootstrap.servers": stack.bootstrap, "log_level": 0})
            expected: dict[bytes, str] = {}
            metadata = stack.admin.list_topics(timeout=10).topics
            for name in [*consumed, *views]:
                topic = stack.topic(name)
                for partition in metadata[topic].partitions:
                    for kind, value in _poison_values(name).items():
                        key = f"poison-{kind}-{name}-{partition}".encode()
                        producer.produce(topic, value, key, partition=partition)
                        if name in consumed:
                            expected[key] = topic
            oversized = json.dumps(
                {
                    "tenant": "acme",
                    "from": "c@acme.example",
                    "to": ["big-s16@d0.chaos.example"],
                    "subject": "too big",
                    "text": "x" * (MAX_MESSAGE_BYTES * 4),
                }
            ).encode()
            producer.produce(stack.topic("mail.submit"), oversized, b"poison-oversized")
            expected[b"poison-oversized"] = stack.topic("mail.submit")
            verdict.check("poison written", producer.flush(30) == 0, f"{len(expected)} records")
            # After the poison: mail on every destination, and a suppression to obey.
            suppressed = "blocked-s16@d1.chaos.example"
            with httpx.Client(
                base_url=f"http://{stack.http_addr}",
                headers={"Authorization": f"Bearer {API_KEY}"},
                timeout=30,
            ) as client:
                put = client.put(f"/v1/suppressions/{suppressed}", json={"reason": "chaos"})
            verdict.check("suppression written", put.status_code == 200, f"{put.status_code}")
            bodies: list[Body] = [
                {
                    "from": "c@acme.example",
                    "to": [f"after-{m}-s16@d{m % 16}.chaos.example"],
                    "subject": f"after {m}",
                    "text": "after the poison",
                }
                for m in range(32)
            ]
            time.sleep(1.0)  # the suppression reaches the views (ingest, router)
            bodies.append(
                {"from": "c@acme.example", "to": [suppressed], "subject": "s", "text": "no"}
            )
            load = post_sync(f"http://{stack.http_addr}", API_KEY, bodies)
            verdict.check(
                "ingest accepted the mail after the poison",
                load.answers.get("202") == len(bodies),
                f"answers {dict(load.answers)}",
            )
            expect = {r: EventType.DELIVERED for _, r in load.pairs} | {
                suppressed: EventType.SUPPRESSED
            }
            settle_and_judge(verdict, stack, load, [sink], timeout_s=90, expect=expect)
            rejected = EventReader(stack.bootstrap, stack.topic("mail.rejected"))
            try:
                wait_until(
                    lambda: (
                        rejected.poll(0.5) >= 0 and set(expected) <= {k for k, _, _ in rejected.raw}
                    ),
                    30,
                )
                found = {k: dict(h) for k, _, h in rejected.raw if k in expected}
            finally:
                rejected.close()
            missing = sorted(k.decode() for k in set(expected) - set(found))
            unexplained = [
                k.decode()
                for k, headers in found.items()
                if not headers.get(RejectedHeaders.REASON)
                or headers.get(RejectedHeaders.SOURCE_TOPIC) != expected[k].encode()
            ]
            verdict.check(
                "every poison record dead-lettered with its reason",
                not missing and not unexplained,
                f"{len(found)} of {len(expected)} in mail.rejected; missing {missing[:6]}"
                f"{' …' if len(missing) > 6 else ''}; without reason/source {unexplained[:3]}",
            )
            alive = {name: stack.reap(name) for name in stack.members}
            verdict.check(
                "every consumer kept going",
                all(code is None for code in alive.values()),
                f"exited: { {n: c for n, c in alive.items() if c is not None} }",
            )
            oversized_reason = found.get(b"poison-oversized", {}).get(RejectedHeaders.REASON, b"")
            verdict.note(
                f"{len(expected)} poison records on {len(consumed)} consumed topics "
                f"(+ {len(views)} views); oversized: {oversized_reason.decode()!r}"
            )
    return verdict


INJECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("subject CRLF", {"subject": "hi\r\nBcc: evil-s18@chaos.example"}),
    ("subject LF", {"subject": "hi\nBcc: evil-s18@chaos.example"}),
    ("subject NUL", {"subject": "hi\x00there"}),
    ("display name CRLF", {"from": "Evil\r\nBcc: evil-s18@chaos.example <c@acme.example>"}),
    ("address CRLF", {"to": ["ok-s18@d0.chaos.example\r\nRCPT TO:<evil-s18@chaos.example>"]}),
    ("address NUL", {"to": ["ok\x00-s18@d0.chaos.example"]}),
    ("header value CRLF", {"headers": {"X-Campaign": "a\r\nBcc: evil-s18@chaos.example"}}),
    ("header name", {"headers": {"X-A\r\nBcc": "evil-s18@chaos.example"}}),
    (
        "variable in subject with CRLF",
        {
            "subject": "hi {{name}}",
            "to": [{"email": "var-s18@d0.chaos.example", "vars": {"name": "x\r\nBcc: evil"}}],
        },
    ),
    ("encoded-word newline", {"subject": "=?utf-8?q?hi=0D=0ABcc:_evil-s18@chaos.example?="}),
    ("encoded-word display name", {"from": "=?utf-8?q?E=0D=0ABcc:_evil?= <c@acme.example>"}),
    ("encoded-word display name, no colon", {"from": "=?utf-8?q?Evil=0D=0AX?= <c@acme.example>"}),
    ("encoded-word header value", {"headers": {"X-Campaign": "=?utf-8?b?YQ0KQmNjOiBldmls?="}}),
]

BODIES: list[tuple[str, str]] = [
    ("bare LF", "line one\nline two\n"),
    ("lone CR", "line one\rline two\r"),
    ("dot line LF", "before\n.\nafter\n"),
    ("dot line CRLF", "before\r\n.\r\nafter\r\n"),
    (
        "smuggling",
        "hello\r\n.\r\nMAIL FROM:<smuggler@chaos.example>\r\n"
        "RCPT TO:<smuggled-s18@chaos.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n",
    ),
    (
        "smuggling bare LF",
        "hello\n.\nMAIL FROM:<s@chaos.example>\nRCPT TO:<smuggled-s18@chaos.example>\n",
    ),
    ("smuggling LF dot CRLF", "hello\n.\r\nRSET\r\n"),
]


def header_injection(full: bool) -> Verdict:
    """18. CR, LF, NUL and encoded-word newlines in subject, display names, addresses and
    headers are refused (400) or safely encoded: the sink sees no extra header or recipient.
    Bare LF, lone CR and `\\n.\\n` in bodies (text and raw): exactly one message arrives per
    recipient, CRLF-normalised and dot-stuffed (no SMTP smuggling)."""
    verdict = Verdict("18", "header injection, SMTP smuggling")
    with sink_server() as sink:
        stack = relay_stack("s18", sink)
        with started(stack):
            base = {"from": "c@acme.example", "subject": "s", "text": "t"}
            requests: list[tuple[str, Body]] = []
            for index, (name, change) in enumerate(INJECTIONS):
                body = {**base, "to": [f"inj{index}-s18@d{index % 4}.chaos.example"], **change}
                requests.append((f"header: {name}", body))
            for index, (name, text) in enumerate(BODIES):
                rcpt = f"body{index}-s18@d{index % 4}.chaos.example"
                requests.append((f"text: {name}", {**base, "to": [rcpt], "text": text}))
                raw = (
                    f"From: c@acme.example\r\nTo: raw{index}-s18@chaos.example\r\n"
                    f"Subject: raw {name}\r\n\r\n{text}"
                ).encode()
                rcpt = f"raw{index}-s18@d{index % 4}.chaos.example"
                requests.append(
                    (
                        f"raw: {name}",
                        {
                            "from": "c@acme.example",
                            "to": [rcpt],
                            "raw": base64.b64encode(raw).decode(),
                        },
                    )
                )
            load = post_sync(
                f"http://{stack.http_addr}", API_KEY, [b for _, b in requests], concurrency=1
            )
            answered: dict[str, str] = {}
            accepted_ids = {r for _, r in load.pairs}
            refused_bodies = [json.dumps(b, sort_keys=True) for b, _ in load.refused]
            for name, body in requests:
                rcpts = [t if isinstance(t, str) else t["email"] for t in body["to"]]
                if any(r in accepted_ids for r in rcpts):
                    answered[name] = "accepted"
                elif json.dumps(body, sort_keys=True) in refused_bodies:
                    status = next(
                        s
                        for b, s in load.refused
                        if json.dumps(b, sort_keys=True) == json.dumps(body, sort_keys=True)
                    )
                    answered[name] = status
                else:
                    answered[name] = "?"
            settle_and_judge(verdict, stack, load, [sink], timeout_s=60)
            bodies_ok = all(
                answered[f"{kind}: {n}"] == "accepted"
                for n, _ in BODIES
                for kind in ("text", "raw")
            )
            verdict.check(
                "every body variant accepted",
                bodies_ok,
                str({k: v for k, v in answered.items() if not k.startswith("header")}),
            )
            injected_refused = {k: v for k, v in answered.items() if k.startswith("header")}
            verdict.check(
                "header injections refused with 400 or accepted",
                all(v in ("400", "accepted") for v in injected_refused.values()),
                str(injected_refused),
            )
            evil = [
                m
                for m in sink.messages
                if any("evil" in r or "smuggled" in r for r in m.rcpt_tos)
                or m.mail_from.startswith(("smuggler@", "s@chaos"))
            ]
            extra_headers = [
                (m.rcpt_tos, name)
                for m in sink.messages
                for name in ("Bcc",)
                if m.as_email()[name] is not None
            ]
            verdict.check(
                "no extra recipient, sender or Bcc header at the sink",
                not evil and not extra_headers,
                f"{len(evil)} smuggled/injected transactions, Bcc headers on {extra_headers}",
            )
            bad_endings = [
                m.rcpt_tos[0]
                for m in sink.messages
                if _BARE_LF.search(m.data) or _LONE_CR.search(m.data)
            ]
            verdict.check(
                "every message CRLF-normalised",
                not bad_endings,
                f"bare LF or lone CR in {bad_endings}",
            )
            per_rcpt = {r: len(sink.messages_for(r)) for r in accepted_ids}
            verdict.check(
                "exactly one message per accepted recipient, one transaction each",
                set(per_rcpt.values()) == {1} and sink.stats.transactions == len(accepted_ids),
                f"arrivals {sorted(set(per_rcpt.values()))}, {sink.stats.transactions} MAIL "
                f"commands for {len(accepted_ids)} recipients",
            )
            dot_lines = [
                m.rcpt_tos[0]
                for m in sink.messages
                if m.rcpt_tos[0].startswith(("body2", "body3", "raw2", "raw3"))
                and b"\r\n.\r\n" not in m.data
            ]
            verdict.check(
                "a lone dot line arrives as content (dot-stuffed on the wire)",
                not dot_lines,
                f"lost the dot line: {dot_lines}",
            )
    return verdict


def security(full: bool) -> Verdict:
    """19. The bounce listener is no open relay and a DSN for mail we never sent suppresses
    nobody; ingest refuses requests without a valid key; one tenant can neither read nor
    change another's messages or suppressions; no secret appears in any service's log."""
    verdict = Verdict("19", "relay, keys, tenants, secrets")
    with sink_server() as sink:
        # Spans as JSON lines on stdout (into the members' logs), to look for secrets there too.
        stack = relay_stack("s19", sink, bounce=True, env={"OTEL_TRACES_EXPORTER": "console"})
        bounce_addr = stack.members["bounce"].process.env["MAILRAIL_BOUNCE_SMTP_ADDR"]
        with started(stack):
            _check_listener(verdict, stack, bounce_addr)
            _check_keys_and_tenants(verdict, stack, sink)
            secrets = [API_KEY, OTHER_KEY, VERP_KEY]
            leaks = [
                (name, secret)
                for name in stack.members
                for secret in secrets
                for line in stack.log_lines(name)
                if secret in line
            ]
            spans = sum(
                1
                for name in stack.members
                for line in stack.log_lines(name)
                if '"trace_id"' in line
            )
            verdict.check(
                "no secret in any log or span",
                not leaks and spans > 0,
                f"{len(leaks)} lines with a secret (first: {leaks[:3]}); {spans} span lines read",
            )
    return verdict


def _check_listener(verdict: Verdict, stack: ChaosStack, address: str) -> None:
    host, _, port = address.rpartition(":")
    bounce_domain = str(stack.rules["bounce_domain"])
    try:
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            client.ehlo("relay-test.example")
            client.mail("spammer@relay-test.example")
            outside, _ = client.rcpt("victim@gmail.com")
            inside, _ = client.rcpt(f"postmaster@{bounce_domain}")
            client.rset()
    except OSError as exc:
        verdict.check("bounce listener answers", False, f"{address}: {exc}")
        return
    verdict.check(
        "bounce listener refuses other domains (no open relay)",
        outside >= 500 and inside == 250,
        f"RCPT victim@gmail.com → {outside}, postmaster@{bounce_domain} → {inside}",
    )
    # A DSN, well formed, for a message we never sent, to a valid-looking VERP address.
    victim = "innocent-s19@d0.chaos.example"
    verp = encode_return_path(
        "00000000000000000000000000000000", 0, bounce_domain, "acme", b"not-our-verp-key"
    )
    dsn = (
        f"From: MAILER-DAEMON@mx.example\r\nTo: {verp}\r\nSubject: Undelivered\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; "
        'boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n'
        "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example\r\n\r\n"
        f"Final-Recipient: rfc822; {victim}\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--b--\r\n"
    )
    try:
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            client.sendmail("", [f"postmaster@{bounce_domain}"], dsn.encode())
            sent = True
    except smtplib.SMTPException as exc:
        sent = False
        verdict.note(f"the forged DSN was refused: {exc}")
    time.sleep(3.0)
    reader = EventReader(stack.bootstrap, stack.topic("mail.suppression"))
    try:
        reader.catch_up()
        suppressed = [k for k, _, _ in reader.raw if k is not None and victim.encode() in k]
    finally:
        reader.close()
    verdict.check(
        "a DSN for mail we never sent suppresses nobody",
        not suppressed,
        f"forged DSN {'accepted' if sent else 'refused'}; suppression keys {suppressed}",
    )


def _check_keys_and_tenants(verdict: Verdict, stack: ChaosStack, sink: RunningSmtpServer) -> None:
    url = f"http://{stack.http_addr}"
    body = {"from": "c@acme.example", "to": ["t-s19@d0.chaos.example"], "subject": "s", "text": "t"}
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        codes = {
            "no key": anonymous.post("/v1/messages", json=body).status_code,
            "wrong key": anonymous.post(
                "/v1/messages", json=body, headers={"Authorization": "Bearer nope"}
            ).status_code,
            "bare bearer": anonymous.post(
                "/v1/messages", json=body, headers={"Authorization": "Bearer"}
            ).status_code,
            "basic auth": anonymous.post(
                "/v1/messages", json=body, headers={"Authorization": f"Basic {API_KEY}"}
            ).status_code,
        }
    verdict.check(
        "ingest refuses requests without a valid key",
        all(code in (401, 403) for code in codes.values()),
        str(codes),
    )
    acme = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    globex = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30
    )
    with acme, globex:
        posted = acme.post("/v1/messages", json=body)
        message_id = posted.json().get("id", "") if posted.status_code == 202 else ""
        address = "private-s19@d0.chaos.example"
        acme.put(f"/v1/suppressions/{address}", json={"reason": "chaos"})
        own = acme.get(f"/v1/messages/{message_id}").status_code
        seen = {
            "their message": globex.get(f"/v1/messages/{message_id}").status_code,
            "their suppression": globex.get(f"/v1/suppressions/{address}").status_code,
            "delete their suppression": globex.delete(f"/v1/suppressions/{address}").status_code,
        }
        listing = globex.get("/v1/suppressions")
        listed = address in listing.text
        still = acme.get(f"/v1/suppressions/{address}").status_code
    verdict.check(
        "one tenant can neither read nor change another's",
        own == 200 and all(c in (403, 404) for c in seen.values()) and not listed and still == 200,
        f"own message {own}; other tenant: {seen}, listed {listed}; still suppressed {still}",
    )
    verdict.check(
        "another tenant's message answers like a missing one (404, not confirming the id)",
        seen["their message"] == 404,
        f"answered {seen['their message']}",
    )


SCENARIOS = [
    Scenario(16, "poison records on every input topic", poison_records),
    Scenario(18, "header injection, SMTP smuggling", header_injection),
    Scenario(19, "relay, keys, tenants, secrets", security),
]
