"""The loopback test servers, exercised with real clients (aiosmtplib, smtplib, dnspython)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import pytest

from deploy.local.sink import parse_listen, subject_of
from tests.support.dns_server import NULL_MX, DnsServerFactory, RunningDnsServer
from tests.support.smtp_server import (
    BOUNCE_REPLY,
    DEFER_REPLY,
    RCPT_OK_REPLY,
    RunningSmtpServer,
    SmtpScript,
    SmtpServerFactory,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT_S = 5.0
BODY = b"From: sender@mailrail.test\r\nSubject: Hello\r\n\r\nHello there.\r\n"


def client(server: RunningSmtpServer, **kwargs: object) -> aiosmtplib.SMTP:
    return aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        timeout=CLIENT_TIMEOUT_S,
        **kwargs,  # type: ignore[arg-type]
    )


async def send(
    server: RunningSmtpServer, recipients: list[str], body: bytes = BODY
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    smtp = client(server)
    await smtp.connect()
    try:
        return await smtp.sendmail("sender@mailrail.test", recipients, body)
    finally:
        smtp.close()


# SMTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        ("bob@example.test", RCPT_OK_REPLY),
        ("bounce-17@example.test", BOUNCE_REPLY),
        ("Deferred.Alice@example.test", DEFER_REPLY),
        ("user@bounce.test", RCPT_OK_REPLY),
    ],
)
def test_default_convention_keys_on_the_local_part(address: str, reply: str) -> None:
    assert SmtpScript().rcpt_reply(address) == reply


def test_scripted_replies_match_address_then_longest_prefix() -> None:
    script = SmtpScript(
        replies={
            "Vip@Example.test": "250 2.1.5 vip",
            "v": "550 5.1.1 v",
            "vi": "452 4.2.2 mailbox full",
        }
    )
    assert script.rcpt_reply("vip@example.test") == "250 2.1.5 vip"
    assert script.rcpt_reply("vincent@example.test") == "452 4.2.2 mailbox full"
    assert script.rcpt_reply("val@example.test") == "550 5.1.1 v"
    assert script.rcpt_reply("bounce@example.test") == BOUNCE_REPLY
    assert SmtpScript(replies={}, default_convention=False).rcpt_reply("bounce@x") == RCPT_OK_REPLY


async def test_mixed_recipient_replies_in_one_transaction(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(replies={"gone@example.test": "550 5.1.1 No such user"})

    refused, _ = await send(
        server,
        ["ok@example.test", "gone@example.test", "defer1@example.test", "bounce@example.test"],
    )

    assert {r: (e.code, e.message) for r, e in refused.items()} == {
        "gone@example.test": (550, "5.1.1 No such user"),
        "defer1@example.test": (451, "4.3.0 try again later"),
        "bounce@example.test": (550, "5.1.1 user unknown"),
    }
    [message] = server.messages
    assert message.rcpt_tos == ["ok@example.test"]
    assert message.mail_from == "sender@mailrail.test"
    assert message.data == BODY
    assert message.header("Subject") == "Hello"
    assert message.peer[0] == "127.0.0.1"
    assert server.stats.rcpt_accepted == 1
    assert server.stats.rcpt_rejected == 3


async def test_every_recipient_refused_means_no_data_command(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(replies=lambda rcpt: "550 5.1.1 No such user")

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send(server, ["a@example.test", "b@example.test"])

    assert [r.code for r in refused.value.recipients] == [550, 550]
    assert server.stats.transactions == 1
    assert server.stats.data_commands == 0
    assert server.messages == []


async def test_callable_replies_can_greylist(smtp_server_factory: SmtpServerFactory) -> None:
    seen: set[str] = set()

    def greylist(rcpt: str) -> str | None:
        if rcpt in seen:
            return None
        seen.add(rcpt)
        return "451 4.7.1 Try again later"

    server = smtp_server_factory(replies=greylist)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await send(server, ["grey@example.test"])
    await send(server, ["grey@example.test"])

    assert len(server.messages_for("GREY@example.test")) == 1


async def test_greeting_421_refuses_the_connection(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory(greeting="421 4.7.0 Too busy, come back later")

    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as error:
        await client(server).connect()

    assert error.value.code == 421
    assert server.stats.connections == 1
    assert server.stats.transactions == 0


async def test_greeting_554_answers_503_until_quit(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory(greeting="554 5.7.1 You are blocked")
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        assert (await reader.readline()).startswith(b"554 5.7.1")
        writer.write(b"EHLO client.test\r\n")
        assert (await reader.readline()).startswith(b"503 ")
        writer.write(b"QUIT\r\n")
        assert (await reader.readline()).startswith(b"221 ")
    finally:
        writer.close()


async def test_disconnect_mid_data_raises_on_the_client(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(disconnect_mid_data=True)

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(server, ["ok@example.test"], BODY + b"more\r\n" * 2000)

    assert server.stats.data_commands == 1
    assert server.messages == []


async def test_drop_after_data_keeps_the_message_as_unanswered(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(drop_after_data=True)

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send(server, ["ok@example.test"])

    assert server.messages == []
    [message] = server.unanswered
    assert message.data == BODY


async def test_data_reply_rejects_the_message(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory(data_reply="552 5.3.4 Message too big for this mailbox")

    with pytest.raises(aiosmtplib.SMTPDataError) as error:
        await send(server, ["ok@example.test"])

    assert error.value.code == 552
    assert server.messages == []
    assert server.stats.data_rejected == 1


async def test_connections_and_transactions_are_counted(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory()
    smtp = client(server)
    await smtp.connect()
    for n in range(3):
        await smtp.sendmail("sender@mailrail.test", [f"r{n}@example.test"], BODY)
    await smtp.quit()
    await send(server, ["again@example.test"])

    messages = server.wait_for(lambda msgs: len(msgs) == 4)
    stats = server.stats
    assert (stats.connections, stats.transactions, stats.messages) == (2, 4, 4)
    assert len({m.peer for m in messages[:3]}) == 1
    assert messages[3].peer != messages[0].peer


async def test_max_messages_per_connection_closes_with_421(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(max_messages_per_connection=1)
    smtp = client(server)
    await smtp.connect()
    await smtp.sendmail("sender@mailrail.test", ["a@example.test"], BODY)

    with pytest.raises(aiosmtplib.SMTPSenderRefused) as error:
        await smtp.sendmail("sender@mailrail.test", ["b@example.test"], BODY)

    assert error.value.code == 421
    assert len(server.messages) == 1


async def test_max_connections_greets_the_extra_one_with_421(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(max_connections=1)
    first = client(server)
    await first.connect()
    try:
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as error:
            await client(server).connect()
        assert error.value.code == 421
        assert server.stats.max_open_connections == 2
    finally:
        first.close()


async def test_extensions_are_advertised_as_scripted(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    full = smtp_server_factory()
    bare = smtp_server_factory(
        advertise_pipelining=False, advertise_size=False, advertise_smtputf8=False
    )
    extensions: list[set[str]] = []
    for server in (full, bare):
        smtp = client(server)
        await smtp.connect()
        extensions.append(set(smtp.esmtp_extensions))
        smtp.close()

    assert {"pipelining", "size", "smtputf8", "8bitmime"} <= extensions[0]
    assert extensions[0].isdisjoint({"starttls", "auth"})
    assert extensions[1].isdisjoint({"pipelining", "size", "smtputf8"})


async def test_starttls_works_or_fails_as_scripted(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    tls = smtp_server_factory(advertise_starttls=True)
    smtp = client(tls, start_tls=True, validate_certs=False)
    await smtp.connect()
    await smtp.sendmail("sender@mailrail.test", ["ok@example.test"], BODY)
    assert smtp.get_transport_info("sslcontext") is not None
    smtp.close()
    assert len(tls.messages) == 1

    broken = smtp_server_factory(
        advertise_starttls=True, starttls_reply="454 4.7.0 TLS not available"
    )
    smtp = client(broken, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("starttls")
    with pytest.raises(aiosmtplib.SMTPResponseException) as error:
        await smtp.starttls(validate_certs=False)
    assert error.value.code == 454
    smtp.close()


async def test_reply_delay_slows_every_reply(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory(reply_delay_s=0.03)
    started = time.monotonic()
    await send(server, ["ok@example.test"])
    # greeting, EHLO, MAIL, RCPT, DATA (354), final dot: six replies
    assert time.monotonic() - started >= 0.18


def test_sync_client_and_waiting(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory()
    with smtplib.SMTP(server.host, server.port, timeout=CLIENT_TIMEOUT_S) as smtp:
        smtp.sendmail("sender@mailrail.test", ["x@example.test", "y@example.test"], BODY)

    [message] = server.wait_for(lambda msgs: len(msgs) == 1, timeout_s=2.0)
    assert server.messages_for("y@example.test") == [message]
    assert server.messages_for("z@example.test") == []
    with pytest.raises(TimeoutError, match="1 message"):
        server.wait_for(lambda msgs: len(msgs) == 2, timeout_s=0.05)


async def test_await_for_lets_the_test_loop_deliver(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory()
    delivery = asyncio.create_task(send(server, ["late@example.test"]))

    [message] = await server.await_for(lambda msgs: len(msgs) == 1, timeout_s=2.0)

    await delivery
    assert message.rcpt_tos == ["late@example.test"]


# DNS -------------------------------------------------------------------------------------

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9


@pytest.fixture
def dns_server(dns_server_factory: DnsServerFactory) -> RunningDnsServer:
    return dns_server_factory(
        {
            "example.test": {
                "MX": [(20, "mx2.example.test"), (10, "mx1.example.test")],
                "TXT": ["v=spf1 ip4:127.0.0.0/8 -all"],
                "ttl": 42,
            },
            "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
            "sel._domainkey.example.test": {"TXT": [DKIM_KEY]},
            "nullmx.test": {"MX": NULL_MX},
            "broken.test": "SERVFAIL",
            "slow.test": "TIMEOUT",
            "half.test": {"MX": "SERVFAIL", "A": ["127.0.0.3"]},
            "alias.test": {"CNAME": "mx1.example.test"},
            "127.0.0.2": {"PTR": ["mx1.example.test"]},
            "big.test": {"TXT": [f"{n:03d}" + "x" * 200 for n in range(5)]},
        }
    )


@pytest.fixture
def resolver(dns_server: RunningDnsServer) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = dns_server.port
    resolver.lifetime = 0.3
    return resolver


async def test_dns_mx_a_and_ttl(
    dns_server: RunningDnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    mx = await resolver.resolve("example.test", "MX")
    a = await resolver.resolve("mx1.example.test", "A")
    aaaa = await resolver.resolve("mx1.example.test", "AAAA")

    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx1.example.test."),
        (20, "mx2.example.test."),
    ]
    assert mx.rrset is not None and mx.rrset.ttl == 42
    assert [r.address for r in a] == ["127.0.0.2"]
    assert [r.address for r in aaaa] == ["::1"]
    assert dns_server.address == f"127.0.0.1:{dns_server.port}"


@pytest.mark.parametrize("tcp", [False, True])
async def test_dns_long_txt_is_split_in_255_byte_strings(
    resolver: dns.asyncresolver.Resolver, tcp: bool
) -> None:
    answer = await resolver.resolve("sel._domainkey.example.test", "TXT", tcp=tcp)

    [record] = list(answer)
    assert [len(s) for s in record.strings[:-1]] == [255] * (len(record.strings) - 1)
    assert b"".join(record.strings).decode() == DKIM_KEY


async def test_dns_large_udp_answer_is_truncated_then_retried_over_tcp(
    dns_server: RunningDnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    resolver.use_edns(False)

    answer = await resolver.resolve("big.test", "TXT")

    assert len(answer) == 5
    assert [q.protocol for q in dns_server.queries if q.name == "big.test"] == ["udp", "tcp"]


async def test_dns_null_mx_cname_and_ptr(resolver: dns.asyncresolver.Resolver) -> None:
    null = await resolver.resolve("nullmx.test", "MX")
    alias = await resolver.resolve("alias.test", "A")
    ptr = await resolver.resolve_address("127.0.0.2")

    assert [(r.preference, r.exchange) for r in null] == [(0, dns.name.root)]
    assert alias.canonical_name.to_text() == "mx1.example.test."
    assert [r.address for r in alias] == ["127.0.0.2"]
    assert [r.target.to_text() for r in ptr] == ["mx1.example.test."]


@pytest.mark.parametrize(
    ("name", "rdtype", "error"),
    [
        ("absent.test", "MX", dns.resolver.NXDOMAIN),
        ("mx1.example.test", "MX", dns.resolver.NoAnswer),
        ("broken.test", "MX", dns.resolver.NoNameservers),
        ("half.test", "MX", dns.resolver.NoNameservers),
        ("slow.test", "MX", dns.exception.Timeout),
    ],
)
async def test_dns_failures(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await resolver.resolve(name, rdtype)


async def test_dns_records_change_at_runtime(
    dns_server: RunningDnsServer, resolver: dns.asyncresolver.Resolver
) -> None:
    assert [r.address for r in await resolver.resolve("half.test", "A")] == ["127.0.0.3"]

    dns_server.set("half.test", {"A": ["127.0.0.9"], "ttl": 1})
    dns_server.set("example.test", None)

    answer = await resolver.resolve("half.test", "A")
    assert [r.address for r in answer] == ["127.0.0.9"]
    assert answer.rrset is not None and answer.rrset.ttl == 1
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("example.test", "MX")
    assert dns_server.query_count("half.test", "A") == 2


def test_dns_rejects_malformed_records(dns_server_factory: DnsServerFactory) -> None:
    with pytest.raises(ValueError, match="MX records"):
        dns_server_factory({"x.test": {"MX": ["mx.x.test"]}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="special"):
        dns_server_factory({"x.test": "NOTIMP"})  # type: ignore[dict-item]


# Sink ------------------------------------------------------------------------------------


def test_sink_listens_on_loopback_only() -> None:
    assert parse_listen("127.0.0.5:2526") == ("127.0.0.5", 2526)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    for bad in ("0.0.0.0:25", "10.0.0.1:25", "example.test:25", "127.0.0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_listen(bad)


def test_sink_decodes_subjects() -> None:
    assert subject_of(b"Subject: =?utf-8?q?H=C3=A9llo?=\r\n folded\r\n\r\nSubject: body") == (
        "Héllo folded"
    )
    assert subject_of(b"From: a@b\r\n\r\nSubject: not a header\r\n") == ""


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    stats_file = tmp_path / "stats.json"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "deploy.local.sink", "--listen", "127.0.0.1:0"),
            *("--maildir", str(tmp_path / "inbox"), "--stats-file", str(stats_file)),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process, tmp_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def poll(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_sink_receives_stores_and_counts(sink: tuple[subprocess.Popen[str], Path]) -> None:
    process, folder = sink
    stats_file = folder / "stats.json"
    poll(stats_file.exists)
    host, port = parse_listen(json.loads(stats_file.read_text())["listen"])

    with smtplib.SMTP(host, port, timeout=CLIENT_TIMEOUT_S) as smtp:
        smtp.sendmail("sender@mailrail.test", ["a@example.test", "b@example.test"], BODY)
    poll(lambda: any((folder / "inbox").glob("*.eml")))
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=5)

    assert process.returncode == 0, err
    [stored] = (folder / "inbox").glob("*.eml")
    assert stored.read_bytes() == (
        b"Return-Path: <sender@mailrail.test>\r\n"
        b"X-Envelope-To: a@example.test, b@example.test\r\n" + BODY
    )
    stats = json.loads(stats_file.read_text())
    assert (stats["messages"], stats["recipients"], stats["bytes"]) == (1, 2, len(BODY))
    lines = out.splitlines()
    assert any(
        "sender@mailrail.test -> a@example.test, b@example.test" in line and "'Hello'" in line
        for line in lines
    ), out
    assert lines[-1].startswith("sink stopped: ")
    assert json.loads(lines[-1].removeprefix("sink stopped: "))["messages"] == 1
