"""The sender's SMTP client (`SmtpPool`, `SmtpSession`) against loopback servers: RFC 5321
timeouts, the TLS policies (with chaos/tls.py's private CA, broken handshakes and injected
plaintext), source-address rotation. No Kafka."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from chaos.tls import INJECTED, Authority, Behaviour, TlsSink
from schemas.rules import TlsPolicy
from services.sender.smtp import ConnectFailed, SendResult, SmtpOptions, SmtpPool
from tests.support.smtp_server import SmtpServerFactory

MX = "mx.tls.test"
EHLO = "out.mailrail.test"
MESSAGE = b"From: a@mailrail.test\r\nTo: b@tls.test\r\nSubject: hi\r\n\r\nhello\r\n"

SinkFactory = Callable[..., TlsSink]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "ca")


@pytest.fixture
def tls_sink(authority: Authority) -> Iterator[SinkFactory]:
    """`tls_sink(behaviour, name=MX, expired=False, host=...)`: a chaos/tls.py server whose
    certificate (signed by `authority`) is for `name`."""
    started: list[TlsSink] = []

    def start(
        behaviour: Behaviour = "tls",
        *,
        name: str = MX,
        expired: bool = False,
        context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> TlsSink:
        context = context or authority.server_context(name, expired=expired)
        sink = TlsSink(host, free_port(host), behaviour, context)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


def pool_for(authority: Authority) -> SmtpPool:
    """A pool that trusts `authority` (and nothing else) where TLS is required."""
    return SmtpPool(
        SmtpOptions(ehlo=EHLO, connect_timeout_s=3, tls_context=authority.client_context())
    )


async def deliver(
    pool: SmtpPool, host: str, port: int, tls: TlsPolicy, rcpt: str = "b@tls.test"
) -> tuple[SendResult, bool, str | None]:
    """One message on a session of its own: (result, over TLS, TLS fallback reason)."""
    async with pool.session(host, port, MX, tls, max_messages=1) as session:
        result = await session.send("a@mailrail.test", rcpt, MESSAGE)
        return result, session.tls, session.tls_fallback


# -- TLS policy ----------------------------------------------------------------------------


async def test_required_tls_with_a_good_certificate_delivers_over_tls(
    authority: Authority, tls_sink: SinkFactory
) -> None:
    sink = tls_sink("tls")
    pool = pool_for(authority)
    result, over_tls, fallback = await deliver(pool, sink.host, sink.port, "required")
    assert result.reply.code == 250 and over_tls and fallback is None
    [received] = sink.received
    assert received.over_tls and received.rcpt_tos == ["b@tls.test"]
    assert sink.transactions == [True] and sink.connections == 1
    await pool.close()


@pytest.mark.parametrize("problem", ["expired", "wrong name", "untrusted"])
async def test_required_tls_with_a_bad_certificate_defers_and_sends_nothing(
    authority: Authority, tls_sink: SinkFactory, tmp_path: Path, problem: str
) -> None:
    if problem == "expired":
        sink = tls_sink("tls", expired=True)
    elif problem == "wrong name":
        sink = tls_sink("tls", name="other.tls.test")
    else:
        stranger = Authority(tmp_path / "other-ca")
        sink = tls_sink("tls", context=stranger.server_context(MX))
    pool = pool_for(authority)
    with pytest.raises(ConnectFailed) as failed:
        await deliver(pool, sink.host, sink.port, "required")
    reply = failed.value.reply
    assert reply.code == 451 and reply.enhanced == "4.7.5", reply
    assert "certificate" in reply.text.lower() or "hostname" in reply.text.lower(), reply.text
    # No plaintext retry, no envelope command, nothing received.
    assert sink.connections == 1 and sink.transactions == [] and sink.received == []
    assert pool.open_connections == 0


async def test_opportunistic_tls_does_not_verify_the_certificate(
    authority: Authority, tls_sink: SinkFactory
) -> None:
    sink = tls_sink("tls", expired=True, name="other.tls.test")
    result, over_tls, _ = await deliver(pool_for(authority), sink.host, sink.port, "opportunistic")
    assert result.reply.code == 250 and over_tls
    assert [r.over_tls for r in sink.received] == [True]


async def test_reset_mid_handshake_with_opportunistic_tls_retries_in_plaintext(
    authority: Authority, tls_sink: SinkFactory, caplog: pytest.LogCaptureFixture
) -> None:
    sink = tls_sink("reset")
    caplog.set_level(logging.WARNING, logger="services.sender.smtp")
    result, over_tls, fallback = await deliver(
        pool_for(authority), sink.host, sink.port, "opportunistic"
    )
    assert result.reply.code == 250 and not over_tls
    assert fallback is not None and "TLS with" in fallback
    # The first connection died in the handshake; the message went on a second, in plaintext.
    assert sink.connections == 2 and sink.starttls == 1
    assert [r.over_tls for r in sink.received] == [False] and sink.transactions == [False]
    assert any("retrying once in plaintext" in r.getMessage() for r in caplog.records)


async def test_reset_mid_handshake_with_required_tls_defers(
    authority: Authority, tls_sink: SinkFactory
) -> None:
    sink = tls_sink("reset")
    with pytest.raises(ConnectFailed) as failed:
        await deliver(pool_for(authority), sink.host, sink.port, "required")
    assert failed.value.reply.code == 451 and failed.value.reply.enhanced == "4.7.5"
    assert sink.connections == 1 and sink.transactions == [] and sink.received == []


@pytest.mark.parametrize("tls", ["required", "opportunistic"])
async def test_plaintext_injected_after_the_starttls_220_is_ignored(
    authority: Authority, tls_sink: SinkFactory, tls: TlsPolicy
) -> None:
    sink = tls_sink("inject")
    result, over_tls, fallback = await deliver(pool_for(authority), sink.host, sink.port, tls)
    # Read as the reply to EHLO, MAIL or RCPT, the injected 554 would have failed the message.
    assert result.reply.code == 250 and INJECTED not in result.reply.text
    assert over_tls and fallback is None
    assert [r.over_tls for r in sink.received] == [True] and sink.connections == 1


async def test_required_tls_without_starttls_defers_and_sends_nothing(
    authority: Authority, tls_sink: SinkFactory
) -> None:
    sink = tls_sink("plain")
    with pytest.raises(ConnectFailed) as failed:
        await deliver(pool_for(authority), sink.host, sink.port, "required")
    assert failed.value.reply.code == 451 and failed.value.reply.enhanced == "4.7.4"
    assert sink.transactions == [] and sink.received == []


async def test_disabled_tls_never_starts_tls(authority: Authority, tls_sink: SinkFactory) -> None:
    sink = tls_sink("tls")
    result, over_tls, _ = await deliver(pool_for(authority), sink.host, sink.port, "disabled")
    assert result.reply.code == 250 and not over_tls
    assert sink.starttls == 0 and [r.over_tls for r in sink.received] == [False]


async def test_starttls_refused_goes_on_in_plaintext_only_when_opportunistic(
    authority: Authority, smtp_server_factory: SmtpServerFactory
) -> None:
    server = smtp_server_factory(
        advertise_starttls=True, starttls_reply="454 4.7.0 TLS not available"
    )
    pool = pool_for(authority)
    result, over_tls, _ = await deliver(pool, server.host, server.port, "opportunistic")
    assert result.reply.code == 250 and not over_tls and server.stats.connections == 1
    with pytest.raises(ConnectFailed) as failed:
        await deliver(pool, server.host, server.port, "required")
    assert failed.value.reply.code == 451 and failed.value.reply.enhanced == "4.7.4"
    assert "454" in failed.value.reply.text and len(server.messages) == 1


# -- source addresses ----------------------------------------------------------------------


async def test_new_connections_rotate_over_the_source_addresses(tls_sink: SinkFactory) -> None:
    sink = tls_sink("plain")
    pool = SmtpPool(SmtpOptions(ehlo=EHLO, source_addresses=("127.0.0.2", "127.0.0.3")))
    for n in range(4):
        async with pool.session(sink.host, sink.port, MX, "disabled", max_messages=1) as session:
            await session.send("a@mailrail.test", f"r{n}@tls.test", MESSAGE)
    assert [r.message.peer[0] for r in sink.received] == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert {r.ehlo for r in sink.received} == {EHLO}

    # Two sessions open at once come from both addresses as well.
    async def hold(rcpt: str, ready: asyncio.Event, go: asyncio.Event) -> str | None:
        async with pool.session(sink.host, sink.port, MX, "disabled", max_messages=5) as s:
            ready.set()
            await go.wait()
            await s.send("a@mailrail.test", rcpt, MESSAGE)
            return s.source

    ready = [asyncio.Event(), asyncio.Event()]
    go = asyncio.Event()
    tasks = [asyncio.create_task(hold(f"c{i}@tls.test", ready[i], go)) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 10)
    go.set()
    assert sorted(s or "" for s in await asyncio.gather(*tasks)) == ["127.0.0.2", "127.0.0.3"]
    assert pool.open_connections == 2
    await pool.close()


async def test_a_single_source_address_still_works(tls_sink: SinkFactory) -> None:
    sink = tls_sink("plain")
    pool = SmtpPool(SmtpOptions(ehlo=EHLO, source_address="127.0.0.3"))
    for n in range(2):
        async with pool.session(sink.host, sink.port, MX, "disabled", max_messages=1) as session:
            await session.send("a@mailrail.test", f"s{n}@tls.test", MESSAGE)
    assert [r.message.peer[0] for r in sink.received] == ["127.0.0.3", "127.0.0.3"]
    with pytest.raises(ValueError, match="not both"):
        SmtpOptions(ehlo=EHLO, source_address="127.0.0.2", source_addresses=("127.0.0.3",))


async def test_no_source_address_of_the_servers_family_is_a_connect_failure() -> None:
    pool = SmtpPool(SmtpOptions(ehlo=EHLO, source_addresses=("127.0.0.2",)))
    with pytest.raises(ConnectFailed) as failed:
        async with pool.session("::1", 25, MX, "disabled", max_messages=1):
            pass
    assert failed.value.reply.enhanced == "4.4.1" and "IPv6" in failed.value.reply.text


# -- RFC 5321 timeouts ---------------------------------------------------------------------


async def test_an_idle_session_is_reused_only_within_the_idle_timeout(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory()
    pool = SmtpPool(SmtpOptions(ehlo=EHLO, idle_timeout_s=0.5))

    async def one(rcpt: str) -> None:
        async with pool.session(server.host, server.port, MX, "disabled", 100) as session:
            assert (await session.send("a@mailrail.test", rcpt, MESSAGE)).reply.code == 250

    await one("b@idle.test")
    await one("c@idle.test")  # at once: the same connection
    assert server.stats.connections == 1
    await asyncio.sleep(0.8)
    await one("d@idle.test")  # idle too long: QUIT, and a new connection
    assert server.stats.connections == 2 and pool.open_connections == 1
    deadline = time.monotonic() + 10
    while server.stats.open_connections > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert server.stats.open_connections == 1
    await pool.close()


async def test_a_reused_session_closed_by_the_server_is_stale_a_fresh_one_is_not(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(hang_up_on_mail_after=1)
    pool = SmtpPool(SmtpOptions(ehlo=EHLO))
    async with pool.session(server.host, server.port, MX, "disabled", 100) as session:
        first = await session.send("a@mailrail.test", "b@stale.test", MESSAGE)
        second = await session.send("a@mailrail.test", "c@stale.test", MESSAGE)
    assert first.reply.code == 250 and not first.stale
    assert second.reply.code == 451 and second.stale and not second.possible_duplicate
    server.set_script(dataclasses.replace(server.script, hang_up_on_mail_after=0))
    async with pool.session(server.host, server.port, MX, "disabled", 100) as session:
        fresh = await session.send("a@mailrail.test", "d@stale.test", MESSAGE)
    assert fresh.reply.code == 451 and not fresh.stale
    assert [m.rcpt_tos for m in server.messages] == [["b@stale.test"]]


async def test_the_greeting_is_read_with_the_command_timeout_not_the_connect_timeout(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    server = smtp_server_factory(command_delays_s={"GREETING": 1.5})
    pool = SmtpPool(SmtpOptions(ehlo=EHLO, connect_timeout_s=0.5, command_timeout_s=10))
    async with pool.session(server.host, server.port, MX, "disabled", max_messages=1) as session:
        result = await session.send("a@mailrail.test", "b@slow.test", MESSAGE)
    assert result.reply.code == 250 and len(server.messages) == 1


async def test_the_final_dot_waits_data_timeout_s(smtp_server_factory: SmtpServerFactory) -> None:
    server = smtp_server_factory(command_delays_s={".": 1.5})
    patient = SmtpPool(SmtpOptions(ehlo=EHLO, command_timeout_s=0.5, data_timeout_s=10))
    async with patient.session(server.host, server.port, MX, "disabled", 1) as session:
        result = await session.send("a@mailrail.test", "b@slow.test", MESSAGE)
    assert result.reply.code == 250
    hasty = SmtpPool(SmtpOptions(ehlo=EHLO, command_timeout_s=10, data_timeout_s=0.5))
    async with hasty.session(server.host, server.port, MX, "disabled", 1) as session:
        result = await session.send("a@mailrail.test", "c@slow.test", MESSAGE)
    assert result.reply.code == 451 and result.reply.enhanced == "4.4.2"
    assert result.possible_duplicate and "final dot" in result.reply.text


@asynccontextmanager
async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[str, int]]:
    """A hand-written SMTP server on this test's own loop."""
    tasks: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass  # stopped by the test's end (3.11 logs a cancelled client task as an error)
        finally:
            writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _converse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: dict[bytes, bytes]
) -> None:
    """Greet, then answer each command line by its verb until DATA has been answered."""
    writer.write(b"220 raw.test ESMTP\r\n")
    while line := await reader.readline():
        verb = line.split(b" ", 1)[0].strip().upper()
        writer.write(replies.get(verb, b"250 OK\r\n"))
        await writer.drain()
        if verb == b"DATA":
            return


async def test_a_body_the_server_does_not_read_times_out_without_a_possible_duplicate() -> None:
    async def never_reads_the_body(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _converse(reader, w, {b"EHLO": b"250 raw.test\r\n", b"DATA": b"354 go on\r\n"})
        await asyncio.sleep(30)  # the body fills the socket buffers and stays there

    async with raw_server(never_reads_the_body) as (host, port):
        pool = SmtpPool(SmtpOptions(ehlo=EHLO, data_timeout_s=1.0))
        async with pool.session(host, port, MX, "disabled", 1) as session:
            started = asyncio.get_running_loop().time()
            result = await session.send("a@mailrail.test", "b@raw.test", b"x" * 48_000_000)
            took = asyncio.get_running_loop().time() - started
    assert result.reply.code == 451 and "during DATA" in result.reply.text
    assert not result.possible_duplicate and took < 10


async def test_a_second_reply_to_one_command_is_not_taken_for_the_next_one() -> None:
    async def answers_mail_twice(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _converse(
            reader,
            w,
            {
                b"EHLO": b"250 raw.test\r\n",
                b"MAIL": b"250 2.1.0 OK\r\n554 5.7.0 bogus extra reply\r\n",
                b"DATA": b"354 go on\r\n",
            },
        )
        while await reader.readline() not in (b".\r\n", b""):
            pass
        w.write(b"250 2.0.0 queued\r\n")
        await w.drain()
        await reader.readline()

    async with raw_server(answers_mail_twice) as (host, port):
        pool = SmtpPool(SmtpOptions(ehlo=EHLO))
        async with pool.session(host, port, MX, "disabled", 1) as session:
            result = await session.send("a@mailrail.test", "b@raw.test", MESSAGE)
    assert result.reply.code == 250 and result.reply.text == "queued"


@pytest.mark.timeout(240)
async def test_rcpt_answered_after_65_s_still_gets_the_message(
    smtp_server_factory: SmtpServerFactory,
) -> None:
    """Past aiosmtplib's 60 s default, inside RFC 5321's 5 minutes; pipelined and not."""
    servers = [
        smtp_server_factory(command_delays_s={"RCPT": 65}, advertise_pipelining=pipelining)
        for pipelining in (True, False)
    ]
    pool = SmtpPool(SmtpOptions(ehlo=EHLO))

    async def one(port: int) -> SendResult:
        async with pool.session("127.0.0.1", port, MX, "opportunistic", 1) as session:
            return await session.send("a@mailrail.test", "b@slow.test", MESSAGE)

    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(*(one(s.port) for s in servers))
    assert asyncio.get_running_loop().time() - started >= 65
    assert [r.reply.code for r in results] == [250, 250]
    assert [len(s.messages) for s in servers] == [1, 1]
