"""A scriptable receiving SMTP server on loopback, for tests.

The server runs aiosmtpd on its own event loop in its own thread, so sync tests and
async tests (whose loop must stay free for the code under test) use it alike.

    script = SmtpScript(replies={"bob@x.test": "550 5.1.1 No such user"})
    with start_smtp_server(script=script) as srv:
        ...  # deliver to srv.host:srv.port
        [msg] = srv.wait_for(lambda msgs: len(msgs) >= 1)

Without a script the server follows a convention: recipients whose local part starts
with ``bounce`` get ``550 5.1.1 user unknown``, ``defer`` get ``451 4.3.0 try again later``,
everybody else ``250``.

Reply rules that hold for every scripted reply: a reply starting with ``421`` closes the
connection after it is sent (RFC 5321 §3.8), and ``reply_delay_s`` delays every reply,
including the greeting and the ``354`` that invites the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import functools
import ipaddress
import itertools
import logging
import ssl
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

logger = logging.getLogger(__name__)

SERVER_HOSTNAME = "mx.mailrail.test"
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
DEFAULT_WAIT_TIMEOUT_S = 5.0
WAIT_POLL_INTERVAL_S = 0.005
MID_DATA_READ_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 300.0
DEFAULT_MAX_SIZE_BYTES = 32 * 1024 * 1024

BOUNCE_REPLY = "550 5.1.1 user unknown"
DEFER_REPLY = "451 4.3.0 try again later"
RCPT_OK_REPLY = "250 2.1.5 OK"
MAIL_OK_REPLY = "250 2.1.0 OK"
TOO_MANY_CONNECTIONS_REPLY = "421 4.7.0 too many connections, try again later"
TOO_MANY_MESSAGES_REPLY = "421 4.7.0 too many messages on this connection"
BAD_SEQUENCE_REPLY = "503 5.5.1 bad sequence of commands"

RcptReplies = Mapping[str, str] | Callable[[str], str | None]
"""Per-recipient RCPT replies: a mapping, or a callable returning a reply or ``None``."""


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server answered with a 2xx to the final dot (or, in ``unanswered``, none)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: tuple[str, int]
    received_at: datetime

    def as_email(self) -> EmailMessage:
        """The data parsed as an RFC 5322 message (modern ``email.policy.default``)."""
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def header(self, name: str) -> str | None:
        """The first header ``name``, decoded, or ``None``."""
        value = self.as_email()[name]
        return None if value is None else str(value)


DataReply = str | Callable[[ReceivedMessage], str | None]
"""The reply to the final dot: fixed, or computed from the message (``None``: the default 250)."""


@dataclass(frozen=True)
class SmtpScript:
    """How the server answers. Every field is optional; the defaults behave like a healthy MX.

    ``replies`` maps a full address (case-insensitive) or, for a key without ``@``, a
    local-part prefix (longest prefix wins) to the RCPT reply; a callable gets the address
    and returns a reply or ``None``. Recipients no rule matches fall back to the
    bounce/defer convention (unless ``default_convention`` is false) and then to 250.
    """

    replies: RcptReplies | None = None
    default_convention: bool = True
    greeting: str | None = None
    """Replaces the 220 greeting, e.g. ``421 4.7.0 busy`` (the server then closes) or
    ``554 5.7.1 blocked`` (the server then answers 503 to everything but QUIT)."""
    mail_reply: str | None = None
    """Reply to every MAIL FROM, e.g. ``550 5.7.1 sender blocked``."""
    data_reply: DataReply | None = None
    """Reply to the final dot. A non-2xx reply means the message is not recorded."""
    reply_delay_s: float = 0.0
    """Delay before every reply."""
    command_delays_s: Mapping[str, float] | None = None
    """Extra delay before the reply to some commands, by verb: ``{"RCPT": 65}`` holds every
    RCPT reply 65 s. ``"GREETING"`` holds the 220, ``"DATA"`` the 354, ``"."`` the reply
    to the final dot. Applies to connections opened while the script has it."""
    disconnect_mid_data: bool = False
    """After the 354 and the first line of the body, close the connection."""
    drop_after_data: bool = False
    """Receive the whole body, then close the connection without replying to the final dot.
    The message lands in ``RunningSmtpServer.unanswered``, not ``messages``."""
    advertise_pipelining: bool = True
    advertise_size: bool = True
    advertise_smtputf8: bool = True
    advertise_8bitmime: bool = True
    advertise_enhancedstatuscodes: bool = True
    """Scripted and default MAIL/RCPT/DATA replies carry enhanced codes; aiosmtpd's own
    replies to other commands (RSET, NOOP, syntax errors) do not."""
    advertise_starttls: bool = False
    """Advertise STARTTLS; it works, with a throwaway self-signed certificate, unless
    ``starttls_reply`` is set, which is then the answer to STARTTLS."""
    starttls_reply: str | None = None
    max_size_bytes: int = DEFAULT_MAX_SIZE_BYTES
    """Enforced whether SIZE is advertised or not: larger bodies get 552."""
    max_connections: int | None = None
    """Connections beyond this many open at once are greeted with 421 and closed."""
    max_messages_per_connection: int | None = None
    """The MAIL FROM after this many accepted messages on a connection gets 421."""
    hang_up_on_mail_after: int | None = None
    """The MAIL FROM after this many accepted messages on a connection: close without a
    reply (a server timing an idle connection out just as the client reuses it)."""

    def rcpt_reply(self, address: str) -> str:
        """The reply this script gives to ``RCPT TO:<address>``."""
        if callable(self.replies):
            reply = self.replies(address)
            if reply is not None:
                return reply
        elif self.replies is not None:
            reply = _match_reply(self.replies, address)
            if reply is not None:
                return reply
        if self.default_convention:
            local = address.rpartition("@")[0].lower() if "@" in address else address.lower()
            if local.startswith("bounce"):
                return BOUNCE_REPLY
            if local.startswith("defer"):
                return DEFER_REPLY
        return RCPT_OK_REPLY


def _match_reply(replies: Mapping[str, str], address: str) -> str | None:
    lowered = address.lower()
    best: tuple[int, str] | None = None
    local = lowered.rpartition("@")[0] if "@" in lowered else lowered
    for key, reply in replies.items():
        key_l = key.lower()
        if "@" in key_l:
            if key_l == lowered:
                return reply
        elif local.startswith(key_l) and (best is None or len(key_l) > best[0]):
            best = (len(key_l), reply)
    return None if best is None else best[1]


def _is_positive(reply: str) -> bool:
    return reply[:1] == "2"


@dataclass(frozen=True)
class SmtpStats:
    """Counters since start (or ``reset()``).

    ``transactions`` counts MAIL FROM commands, ``data_commands`` DATA commands received
    (whatever the answer), ``messages`` bodies answered with 2xx.
    """

    connections: int = 0
    open_connections: int = 0
    max_open_connections: int = 0
    transactions: int = 0
    rcpt_commands: int = 0
    rcpt_accepted: int = 0
    rcpt_rejected: int = 0
    data_commands: int = 0
    messages: int = 0
    data_rejected: int = 0
    unanswered: int = 0


class _State:
    """Shared by every connection of one server; also the aiosmtpd handler (its ``handle_*`` hooks).

    Hooks run on the server thread; readers call from the test thread, hence the lock.
    """

    def __init__(self, script: SmtpScript) -> None:
        self.script = script
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._unanswered: list[ReceivedMessage] = []
        self._stats = SmtpStats()
        self._queue_ids = itertools.count(1)

    def bump(self, **deltas: int) -> SmtpStats:
        with self._lock:
            values = {k: getattr(self._stats, k) + v for k, v in deltas.items()}
            stats = replace(self._stats, **values)
            if stats.open_connections > stats.max_open_connections:
                stats = replace(stats, max_open_connections=stats.open_connections)
            self._stats = stats
            return stats

    def record(self, message: ReceivedMessage, *, answered: bool) -> None:
        with self._lock:
            (self._messages if answered else self._unanswered).append(message)
            if answered:
                self._stats = replace(self._stats, messages=self._stats.messages + 1)
            else:
                self._stats = replace(self._stats, unanswered=self._stats.unanswered + 1)

    def snapshot(self) -> tuple[list[ReceivedMessage], list[ReceivedMessage], SmtpStats]:
        with self._lock:
            return list(self._messages), list(self._unanswered), self._stats

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            self._unanswered.clear()
            self._stats = SmtpStats(
                open_connections=self._stats.open_connections,
                max_open_connections=self._stats.open_connections,
            )

    # aiosmtpd hooks -----------------------------------------------------------------------

    async def handle_EHLO(  # noqa: N802
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        script = server.script
        keep: list[str] = []
        for line in responses:
            text = line[4:]
            keyword = text.split(" ", 1)[0].upper()
            if keyword in {"AUTH", "HELP"} or (keyword == "SIZE" and not script.advertise_size):
                continue
            if keyword == "8BITMIME" and not script.advertise_8bitmime:
                continue
            keep.append(text)
        if script.advertise_pipelining:
            keep.append("PIPELINING")
        if script.advertise_starttls and "STARTTLS" not in keep and session.ssl is None:
            keep.append("STARTTLS")
        if script.advertise_enhancedstatuscodes:
            keep.append("ENHANCEDSTATUSCODES")
        return [f"250-{t}" for t in keep[:-1]] + [f"250 {keep[-1]}"]

    async def handle_MAIL(  # noqa: N802
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.bump(transactions=1)
        script = server.script
        limit = script.max_messages_per_connection
        if limit is not None and server.messages_on_connection >= limit:
            return TOO_MANY_MESSAGES_REPLY
        hang_up = script.hang_up_on_mail_after
        if hang_up is not None and server.messages_on_connection >= hang_up:
            await server.hang_up()
        if script.mail_reply is not None and not _is_positive(script.mail_reply):
            return script.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return script.mail_reply or MAIL_OK_REPLY

    async def handle_RCPT(  # noqa: N802
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = server.script.rcpt_reply(address)
        if _is_positive(reply):
            self.bump(rcpt_commands=1, rcpt_accepted=1)
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        else:
            self.bump(rcpt_commands=1, rcpt_rejected=1)
        return reply

    async def handle_DATA(  # noqa: N802
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope
    ) -> str:
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=server.peer,
            received_at=datetime.now(UTC),
        )
        script = server.script
        if script.drop_after_data:
            self.record(message, answered=False)
            await server.hang_up()
        reply: str | None = None
        if callable(script.data_reply):
            reply = script.data_reply(message)
        elif script.data_reply is not None:
            reply = script.data_reply
        if reply is None:
            reply = f"250 2.0.0 OK queued as MR{next(self._queue_ids):08d}"
        if _is_positive(reply):
            self.record(message, answered=True)
            server.messages_on_connection += 1
        else:
            self.bump(data_rejected=1)
        return reply


class _ScriptedSMTP(SMTP):
    """One connection. Adds the greeting, delay, 421-closes and mid-DATA disconnects."""

    def __init__(self, state: _State, script: SmtpScript, **kwargs: Any) -> None:
        super().__init__(state, **kwargs)
        self.state = state
        self.script = script
        self.peer: tuple[str, int] = ("", 0)
        self.messages_on_connection = 0
        self._first_reply: str | None = script.greeting
        self._command_delay_s = self._dot_delay_s = 0.0
        if script.command_delays_s:
            self._command_delay_s = script.command_delays_s.get("GREETING", 0.0)
            self._delay_commands(script.command_delays_s)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self.transport is None
        super().connection_made(transport)
        if not fresh:
            return  # the STARTTLS upgrade of a connection already counted
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        stats = self.state.bump(connections=1, open_connections=1)
        limit = self.script.max_connections
        if limit is not None and stats.open_connections > limit:
            self._first_reply = TOO_MANY_CONNECTIONS_REPLY
        elif (
            self._first_reply is not None
            and not _is_positive(self._first_reply)
            and not self._first_reply.startswith("421")
        ):
            refuse = self._refuse_command
            self._smtp_methods = {
                name: (method if name == "QUIT" else refuse)
                for name, method in self._smtp_methods.items()
            }

    def _delay_commands(self, delays: Mapping[str, float]) -> None:
        """Wrap the handlers of the delayed verbs: their first reply waits (see ``push``)."""
        for verb, method in list(self._smtp_methods.items()):
            first = delays.get(verb, 0.0)
            then = delays.get(".", 0.0) if verb == "DATA" else 0.0
            if first > 0 or then > 0:
                self._smtp_methods[verb] = self._delayed(method, first, then)

    def _delayed(
        self, method: Callable[[str | None], Any], first: float, then: float
    ) -> Callable[[str | None], Any]:
        @functools.wraps(method)
        async def run(arg: str | None) -> None:
            self._command_delay_s = first
            self._dot_delay_s = then
            try:
                await method(arg)
            finally:
                self._command_delay_s = self._dot_delay_s = 0.0

        return run

    def connection_lost(self, error: Exception | None) -> None:
        self.state.bump(open_connections=-1)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        if self._first_reply is not None:
            text, self._first_reply = self._first_reply, None
        delay = self.script.reply_delay_s + self._command_delay_s
        # The next reply of the same command (DATA: the final dot's) waits its own delay.
        self._command_delay_s, self._dot_delay_s = self._dot_delay_s, 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        await super().push(text)
        if text.startswith("421 ") and self.transport is not None:
            self.transport.close()

    async def _refuse_command(self, arg: str | None) -> None:
        await self.push(BAD_SEQUENCE_REPLY)

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        self.state.bump(data_commands=1)
        envelope = self.envelope
        if self.script.disconnect_mid_data and envelope is not None and envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with contextlib.suppress(
                TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError
            ):
                await asyncio.wait_for(self._reader.readuntil(b"\r\n"), MID_DATA_READ_TIMEOUT_S)
            await self.hang_up()
            return
        await super().smtp_DATA(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802
        if self.script.starttls_reply is not None:
            await self.push(self.script.starttls_reply)
            return
        await super().smtp_STARTTLS(arg)

    async def hang_up(self) -> None:
        """Close the connection without a reply; returns only if it was already gone."""
        if self.transport is None:
            return
        self.transport.close()
        # connection_lost() cancels the task running this coroutine.
        await asyncio.sleep(STOP_TIMEOUT_S)


@functools.cache
def _self_signed_tls_context() -> ssl.SSLContext:
    """A server context with a throwaway certificate for ``SERVER_HOSTNAME`` (made once)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_HOSTNAME)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVER_HOSTNAME),
                    x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        cert_path = Path(folder, "cert.pem")
        key_path = Path(folder, "key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context.load_cert_chain(cert_path, key_path)
    return context


class RunningSmtpServer:
    """A started server. Stop it with ``stop()`` or use it as a context manager."""

    def __init__(self, host: str, port: int, script: SmtpScript | None) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"test SMTP servers listen on loopback only, not {host}")
        self._state = _State(script or SmtpScript())
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._connections: weakref.WeakSet[_ScriptedSMTP] = weakref.WeakSet()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"smtp-server-{host}:{port}", daemon=True
        )
        self._thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(self._start(host, port), self._loop)
            self.host, self.port = future.result(START_TIMEOUT_S)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)
            self._loop.close()
            raise
        logger.debug("test SMTP server listening on %s:%d", self.host, self.port)

    async def _start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await self._loop.create_server(self._new_connection, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    def _new_connection(self) -> _ScriptedSMTP:
        script = self._state.script
        tls_context = None
        if script.advertise_starttls and script.starttls_reply is None:
            tls_context = _self_signed_tls_context()
        connection = _ScriptedSMTP(
            self._state,
            script,
            hostname=SERVER_HOSTNAME,
            ident="Mailrail test MX",
            loop=self._loop,
            enable_SMTPUTF8=script.advertise_smtputf8,
            data_size_limit=script.max_size_bytes,
            tls_context=tls_context,
            timeout=IDLE_TIMEOUT_S,
        )
        self._connections.add(connection)
        return connection

    @property
    def address(self) -> str:
        """``host:port``, the form ``MAILRAIL_SMART_HOST`` takes."""
        return f"{self.host}:{self.port}"

    @property
    def script(self) -> SmtpScript:
        return self._state.script

    def set_script(self, script: SmtpScript, *, open_connections: bool = False) -> None:
        """Answer by ``script`` from now on; connections already open keep their script
        unless ``open_connections`` (for clients that reuse connections)."""
        self._state.script = script
        if open_connections:
            for connection in list(self._connections):
                connection.script = script

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Every message accepted so far, oldest first (a copy)."""
        return self._state.snapshot()[0]

    @property
    def unanswered(self) -> list[ReceivedMessage]:
        """Messages received whole but never answered (``drop_after_data``)."""
        return self._state.snapshot()[1]

    @property
    def stats(self) -> SmtpStats:
        return self._state.snapshot()[2]

    def reset(self) -> None:
        """Forget messages and counters (open connections stay counted as open)."""
        self._state.reset()

    def messages_for(self, recipient: str) -> list[ReceivedMessage]:
        """Accepted messages whose envelope includes ``recipient`` (case-insensitive)."""
        wanted = recipient.lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.rcpt_tos)]

    def wait_for(
        self,
        predicate: Callable[[list[ReceivedMessage]], bool],
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    ) -> list[ReceivedMessage]:
        """Block until ``predicate(messages)`` holds and return those messages.

        Raises ``TimeoutError`` (listing what did arrive) after ``timeout_s``. From an async
        test whose loop runs the code that delivers, use ``await_for`` instead.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() >= deadline:
                raise self._timeout(messages, timeout_s)
            time.sleep(WAIT_POLL_INTERVAL_S)

    async def await_for(
        self,
        predicate: Callable[[list[ReceivedMessage]], bool],
        timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    ) -> list[ReceivedMessage]:
        """``wait_for`` that yields to the running event loop while it waits."""
        deadline = time.monotonic() + timeout_s
        while True:
            messages = self.messages
            if predicate(messages):
                return messages
            if time.monotonic() >= deadline:
                raise self._timeout(messages, timeout_s)
            await asyncio.sleep(WAIT_POLL_INTERVAL_S)

    def _timeout(self, messages: list[ReceivedMessage], timeout_s: float) -> TimeoutError:
        arrived = [(m.mail_from, m.rcpt_tos) for m in messages]
        return TimeoutError(
            f"condition not met within {timeout_s}s; {len(messages)} message(s) arrived: "
            f"{arrived!r}; stats: {self.stats}"
        )

    def stop(self) -> None:
        """Close the listener and every open connection, then end the thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            try:
                future.result(STOP_TIMEOUT_S)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(STOP_TIMEOUT_S)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            transport = connection.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            elif transport is not None:
                transport.close()
        await asyncio.sleep(0)
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> RunningSmtpServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_smtp_server(
    host: str = "127.0.0.1", port: int = 0, script: SmtpScript | None = None
) -> RunningSmtpServer:
    """Start a scriptable SMTP server on ``host:port`` (port 0: a free one) in its own thread."""
    return RunningSmtpServer(host, port, script)


class SmtpServerFactory(Protocol):
    """The ``smtp_server_factory`` fixture: ``factory(replies={...})`` or ``factory(script)``.

    Keyword arguments other than ``host`` and ``port`` are ``SmtpScript`` fields, applied on
    top of ``script`` if both are given.
    """

    def __call__(
        self,
        script: SmtpScript | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **script_fields: Any,
    ) -> RunningSmtpServer: ...
