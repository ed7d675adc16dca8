"""SMTP sessions over pooled, reused connections (aiosmtplib underneath).

One `SmtpSession` is one connection to one MX host, reused up to the destination's
`max_messages_per_connection`. `send()` runs one transaction for one recipient and always
returns an `SmtpReply` — connection failures and losses included — so callers never catch.
Where the server offers PIPELINING, MAIL, RCPT and DATA go in one round trip.

Timeouts are RFC 5321 §4.5.3.2's, not a library default: `connect_timeout_s` (30 s) for the
TCP connection only; `command_timeout_s` (5 minutes) for the 220 greeting, EHLO, STARTTLS and
its handshake, MAIL, RCPT and DATA; `data_timeout_s` (10 minutes) for writing the body and,
again, for the reply to the final dot.

TLS, per destination (`Shaping.tls`), as Postfix's `may` and `secure` levels:
- `opportunistic`: STARTTLS when the server offers it, its certificate not verified. If the
  upgrade fails (handshake error, connection reset), the session is opened once more, on a new
  connection, in plaintext (logged as a warning); a refused STARTTLS continues in plaintext.
- `required`: the server must offer STARTTLS and its certificate must verify for the MX host
  name (against `SmtpOptions.tls_context`, default `ssl.create_default_context()`: the
  system's trust store, or `SSL_CERT_FILE`). Anything else is a deferral (451 4.7.x) before
  any envelope command: mail never goes in plaintext.
- `disabled`: never STARTTLS.

Idle sessions are reused for at most `idle_timeout_s` (30 s): servers close idle connections
(RFC 5321 lets them after 5 minutes, many do sooner) and middleboxes drop them silently, and a
command on a silently dead connection waits out its 5-minute timeout. A reused session found
closed before the message went out (the server's close crossed our MAIL) is reported as
`stale`: safe to send again at once on a new connection, since nothing was delivered.
"""

import asyncio
import itertools
import logging
import re
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

from schemas.records import SmtpReply
from schemas.rules import TlsPolicy
from services.runtime import tracing
from services.sender import pipelining
from services.sender.pipelining import BodyNotSent, PipeliningProtocol

log = logging.getLogger(__name__)

pipelining.install()

CONNECT_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 300.0
DATA_TIMEOUT_S = 600.0
QUIT_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 30.0
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def reply_of(code: int, message: str) -> SmtpReply:
    """Split an SMTP reply's text into its RFC 3463 enhanced code and the rest."""
    text = " ".join(message.split())
    match = _ENHANCED.match(text)
    enhanced = match.group(1) if match and match.group(1)[0] == str(code)[0] else None
    if match:
        text = text[match.end() :]
    return SmtpReply(code=code, enhanced=enhanced, text=text[:500])


def _reply(response: SMTPResponse) -> SmtpReply:
    return reply_of(response.code, response.message)


def _lost(text: str) -> SmtpReply:
    return SmtpReply(code=451, enhanced="4.4.2", text=text[:500])


class ConnectFailed(Exception):
    """No session could be opened: the reply says why (4.4.1, a greeting, TLS failure).

    `from_server`: the reply is the server's own (a refusing greeting), not one made here.
    """

    def __init__(self, reply: SmtpReply, *, from_server: bool = False) -> None:
        super().__init__(reply.text)
        self.reply = reply
        self.from_server = from_server


class _UpgradeFailed(ConnectFailed):
    """STARTTLS was answered 220 but the TLS session did not come up (handshake error,
    certificate refused, connection reset): the connection is closed."""


@dataclass(frozen=True)
class SmtpOptions:
    """How the pool opens sessions.

    `source_addresses`: the local addresses new connections are made from, in turn (round
    robin; only those of the MX address's family); `source_address` is the one-address form
    of the same. Neither: the system chooses. `tls_context` verifies servers where TLS is
    required; None: `ssl.create_default_context()` (honours `SSL_CERT_FILE`).
    """

    ehlo: str
    source_address: str | None = None
    source_addresses: tuple[str, ...] = ()
    command_timeout_s: float = COMMAND_TIMEOUT_S
    data_timeout_s: float = DATA_TIMEOUT_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    #: An idle session older than this is closed, not reused.
    idle_timeout_s: float = IDLE_TIMEOUT_S
    tls_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if self.source_address and self.source_addresses:
            raise ValueError("give source_address or source_addresses, not both")

    @property
    def sources(self) -> tuple[str, ...]:
        if self.source_addresses:
            return tuple(self.source_addresses)
        return (self.source_address,) if self.source_address else ()


@dataclass
class SendResult:
    reply: SmtpReply
    #: The server may have the message although it did not say so (connection lost after
    #: the final dot, RFC 1047): a retry can deliver it twice.
    possible_duplicate: bool = False
    #: A reused session's connection was found closed before the message went out: nothing
    #: was delivered, and a new connection may send it at once (not a deferral).
    stale: bool = False


class SmtpSession:
    def __init__(
        self,
        client: aiosmtplib.SMTP,
        host: str,
        options: SmtpOptions | None = None,
        source: str | None = None,
    ) -> None:
        self.client = client
        self.host = host
        self.options = options or SmtpOptions(ehlo=client.local_hostname or "localhost")
        #: The local address this connection was made from (None: the system's choice).
        self.source = source
        #: Why TLS was given up for this session (opportunistic fallback), else None.
        self.tls_fallback: str | None = None
        self.sent = 0
        #: When the session was last put back in the pool (monotonic seconds).
        self.idle_since = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.client.is_connected

    @property
    def tls(self) -> bool:
        """True when the session runs over TLS (after STARTTLS)."""
        return self.client.is_connected and self.client.get_transport_info("sslcontext") is not None

    @property
    def pipelining(self) -> bool:
        return self.client.supports_extension("pipelining")

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> SendResult:
        """One transaction for one recipient."""
        return (await self.send_many(mail_from, [rcpt], data))[0]

    async def send_many(self, mail_from: str, rcpts: list[str], data: bytes) -> list[SendResult]:
        """One transaction for several recipients of the same bytes: a result per recipient.

        Traced as one span (`smtp transaction`): MX host, recipients, the reply (the first
        refusal, else the reply to the final dot) and its duration.
        """
        attributes = {"server.address": self.host, "smtp.recipients": len(rcpts)}
        with tracing.span("smtp transaction", attributes) as span:
            results = await self._transaction(mail_from, rcpts, data)
            if span.is_recording():
                reply = next((r.reply for r in results if r.reply.code >= 400), results[0].reply)
                span.set_attribute("smtp.reply.code", reply.code)
                span.set_attribute("smtp.reply.enhanced", reply.enhanced or "")
                span.set_attribute("smtp.reply.text", reply.text)
                span.set_attribute("smtp.accepted", sum(r.reply.code < 400 for r in results))
                if reply.code >= 400:
                    tracing.fail(span, f"{reply.code} {reply.text}"[:200])
            return results

    async def _transaction(self, mail_from: str, rcpts: list[str], data: bytes) -> list[SendResult]:
        """One transaction for several recipients of the same bytes: a result per recipient.

        DATA is never sent when every RCPT was refused; refused recipients keep their RCPT
        reply, accepted ones get the reply to the final dot.
        """
        client = self.client
        protocol = client.protocol

        def every(result: SendResult) -> list[SendResult]:
            return [result] * len(rcpts)

        reused = self.sent > 0
        if protocol is None or not client.is_connected:
            lost = _lost("connection lost before the transaction")
            return every(SendResult(lost, stale=reused))
        size_limit = _size_limit(client)
        if size_limit and len(data) > size_limit:
            text = f"message size {len(data)} exceeds the server's limit {size_limit}"
            return every(SendResult(SmtpReply(code=552, enhanced="5.3.4", text=text)))
        utf8 = not (mail_from.isascii() and all(r.isascii() for r in rcpts))
        if utf8 and not client.supports_extension("smtputf8"):
            text = "non-ASCII address and the server does not offer SMTPUTF8"
            return every(SendResult(SmtpReply(code=553, enhanced="5.6.7", text=text)))
        options = b" SMTPUTF8" if utf8 else b""
        if size_limit is not None:
            options += b" SIZE=%d" % len(data)
        if not data.isascii() and client.supports_extension("8bitmime"):
            options += b" BODY=8BITMIME"
        commands = [b"MAIL FROM:<" + mail_from.encode() + b">" + options + b"\r\n"]
        commands += [b"RCPT TO:<" + rcpt.encode() + b">\r\n" for rcpt in rcpts]
        commands.append(b"DATA\r\n")
        self.sent += 1
        try:
            if self.pipelining and isinstance(protocol, PipeliningProtocol):
                replies = await protocol.pipeline(commands, self.options.command_timeout_s)
            else:
                replies = await self._one_by_one(commands)
        except (aiosmtplib.SMTPException, OSError) as exc:
            # The body was not sent; on a reused session a closed connection (not a timeout)
            # is the server's idle close crossing our MAIL.
            client.close()
            stale = reused and not isinstance(exc, aiosmtplib.SMTPTimeoutError)
            return every(SendResult(_lost(f"connection lost: {exc}"), stale=stale))
        mail_reply, rcpt_replies = replies[0], replies[1 : 1 + len(rcpts)]
        if mail_reply.code >= 400:
            await self._abort(replies)
            return every(SendResult(_reply(mail_reply)))
        accepted = [r.code < 400 for r in rcpt_replies]
        data_reply = replies[1 + len(rcpts)] if len(replies) > 1 + len(rcpts) else None
        if not any(accepted) or data_reply is None or data_reply.code != 354:
            await self._abort(replies)
            refused = data_reply or rcpt_replies[-1]
            return [
                SendResult(_reply(rcpt_replies[i] if not ok or data_reply is None else refused))
                for i, ok in enumerate(accepted)
            ]
        final = await self._body(data)
        return [
            final if ok else SendResult(_reply(rcpt_replies[i])) for i, ok in enumerate(accepted)
        ]

    async def _one_by_one(self, commands: list[bytes]) -> list[SMTPResponse]:
        """Without PIPELINING: stop after a refused MAIL, and skip DATA if no RCPT passed."""
        protocol = self.client.protocol
        assert protocol is not None
        timeout = self.options.command_timeout_s
        replies = [await protocol.execute_command(commands[0][:-2], timeout=timeout)]
        if replies[0].code >= 400:
            return replies
        for command in commands[1:-1]:
            replies.append(await protocol.execute_command(command[:-2], timeout=timeout))
        if any(r.code < 400 for r in replies[1:]):
            replies.append(await protocol.execute_command(b"DATA", timeout=timeout))
        return replies

    async def _body(self, data: bytes) -> SendResult:
        """The body and the final dot: writing it may take `data_timeout_s`, and so may the
        reply. Only a connection lost (or silent) after the whole body was written can have
        left the message with the server."""
        client = self.client
        protocol = client.protocol
        assert protocol is not None
        body = _LEADING_DOT.sub(b"..", normalize_message_line_endings(data))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        timeout = self.options.data_timeout_s
        try:
            if isinstance(protocol, PipeliningProtocol):
                final = await protocol.data_block(body + b".\r\n", timeout, timeout)
            else:
                protocol.write(body + b".\r\n")
                async with _lock(protocol):
                    final = await protocol.read_response(timeout=timeout)
        except BodyNotSent as exc:
            client.close()
            return SendResult(_lost(f"connection lost during DATA: {exc}"))
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            return SendResult(_lost(f"no reply to the final dot: {exc}"), possible_duplicate=True)
        if final.code == 421:
            client.close()
        return SendResult(_reply(final))

    async def _abort(self, replies: list[SMTPResponse]) -> None:
        """After a refused MAIL or RCPT: end an accepted DATA with an empty body, then RSET."""
        protocol = self.client.protocol
        if protocol is None:
            return
        timeout = self.options.command_timeout_s
        try:
            if replies and replies[-1].code == 354:
                protocol.write(b".\r\n")
                async with _lock(protocol):
                    await protocol.read_response(timeout=timeout)
            if any(r.code == 421 for r in replies):
                self.client.close()
                return
            await protocol.execute_command(b"RSET", timeout=timeout)
        except (aiosmtplib.SMTPException, OSError):
            self.client.close()


@asynccontextmanager
async def _lock(protocol: object) -> AsyncIterator[None]:
    lock = getattr(protocol, "_command_lock", None)
    if lock is None:
        yield
        return
    async with lock:
        yield


def _size_limit(client: aiosmtplib.SMTP) -> int | None:
    if not client.supports_extension("size"):
        return None
    value = client.esmtp_extensions.get("size", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def _unverified_context() -> ssl.SSLContext:
    """Opportunistic TLS: encryption without authentication (RFC 7435), as Postfix's `may`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class _Host:
    idle: list[SmtpSession] = field(default_factory=list)
    open: int = 0


class SmtpPool:
    """Idle sessions per (address, port, TLS policy), reused until their message limit.

    New connections take the options' source addresses in turn; an idle session is reused
    whatever address it was opened from.
    """

    def __init__(self, options: SmtpOptions, max_idle_per_host: int = 100) -> None:
        self._options = options
        self._hosts: dict[tuple[str, int, str], _Host] = defaultdict(_Host)
        #: Idle sessions kept per host; one returned beyond that is closed.
        self._max_idle = max_idle_per_host
        self._verified = options.tls_context or ssl.create_default_context()
        self._unverified = _unverified_context()
        self._turn = itertools.count()

    @property
    def open_connections(self) -> int:
        return sum(host.open for host in self._hosts.values())

    @asynccontextmanager
    async def session(
        self, address: str, port: int, host_name: str, tls: TlsPolicy, max_messages: int
    ) -> AsyncIterator[SmtpSession]:
        """A session to `address:port`; raises ConnectFailed when none can be opened."""
        host = self._hosts[(address, port, tls)]
        await self._close_expired(host)
        session = None
        while host.idle and session is None:
            candidate = host.idle.pop()
            if candidate.alive:
                session = candidate
            else:
                host.open -= 1
        if session is None:
            session = await self._open(address, port, host_name, tls)
            host.open += 1
        try:
            yield session
        finally:
            if session.alive and session.sent < max_messages and len(host.idle) < self._max_idle:
                session.idle_since = time.monotonic()
                host.idle.append(session)
            else:
                host.open -= 1
                await _quit(session.client)

    async def _close_expired(self, host: _Host) -> None:
        """QUIT the host's sessions idle longer than the idle timeout (oldest first)."""
        cutoff = time.monotonic() - self._options.idle_timeout_s
        while host.idle and host.idle[0].idle_since < cutoff:
            host.open -= 1
            await _quit(host.idle.pop(0).client)

    def _source_for(self, address: str) -> str | None:
        """The next source address (round robin) of `address`'s family."""
        sources = self._options.sources
        if not sources:
            return None
        v6 = ":" in address
        usable = [s for s in sources if (":" in s) == v6]
        if not usable:
            family = "IPv6" if v6 else "IPv4"
            raise ConnectFailed(
                SmtpReply(
                    code=451,
                    enhanced="4.4.1",
                    text=f"no {family} source address in the pool for [{address}]",
                )
            )
        return usable[next(self._turn) % len(usable)]

    async def _open(self, address: str, port: int, host_name: str, tls: TlsPolicy) -> SmtpSession:
        attributes = {
            "server.address": host_name,
            "network.peer.address": address,
            "network.peer.port": port,
        }
        with tracing.span("smtp connect", attributes) as span:
            try:
                source = self._source_for(address)
                if source is not None:
                    span.set_attribute("network.local.address", source)
                try:
                    session = await self._connect(address, port, host_name, tls, source)
                except _UpgradeFailed as failed:
                    if tls != "opportunistic":
                        raise
                    session = await self._plaintext_retry(address, port, host_name, source, failed)
                    span.set_attribute("smtp.tls.fallback", failed.reply.text)
                span.set_attribute("smtp.tls", session.tls)
                return session
            except ConnectFailed as failed:
                span.set_attribute("smtp.reply.code", failed.reply.code)
                span.set_attribute("smtp.reply.text", failed.reply.text)
                tracing.fail(span, failed.reply.text[:200])
                raise

    async def _plaintext_retry(
        self, address: str, port: int, host_name: str, source: str | None, failed: ConnectFailed
    ) -> SmtpSession:
        """Opportunistic TLS whose upgrade failed: once more, on a new connection, without TLS."""
        log.warning(
            "%s; opportunistic TLS: retrying once in plaintext on a new connection",
            failed.reply.text,
        )
        try:
            session = await self._connect(address, port, host_name, "disabled", source)
        except ConnectFailed as again:
            text = f"{failed.reply.text}; the plaintext retry failed too: {again.reply.text}"
            reply = again.reply.model_copy(update={"text": text[:500]})
            raise ConnectFailed(reply, from_server=again.from_server) from None
        session.tls_fallback = failed.reply.text
        return session

    async def _connect(
        self, address: str, port: int, host_name: str, tls: TlsPolicy, source: str | None
    ) -> SmtpSession:
        options = self._options
        where = f"{host_name} [{address}]:{port}"
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if source:
                sock.bind((source, 0))
            await asyncio.wait_for(
                loop.sock_connect(sock, (address, port)), options.connect_timeout_s
            )
        except BaseException as exc:
            sock.close()
            if not isinstance(exc, OSError | TimeoutError):
                raise
            origin = f" from {source}" if source else ""
            raise ConnectFailed(
                SmtpReply(
                    code=451,
                    enhanced="4.4.1",
                    text=f"connect to {where}{origin}: {exc or 'timed out'}"[:500],
                )
            ) from None
        client = aiosmtplib.SMTP(
            hostname=host_name,
            sock=sock,
            local_hostname=options.ehlo,
            timeout=options.command_timeout_s,
            start_tls=False,
        )
        try:
            # The socket is connected already: this reads the 220 greeting (5 minutes).
            await client.connect(timeout=options.command_timeout_s)
            await client.ehlo()
            if tls != "disabled":
                await self._starttls(client, host_name, where, tls)
        except ConnectFailed:
            client.close()
            raise
        except (aiosmtplib.SMTPConnectResponseError, aiosmtplib.SMTPHeloError) as exc:
            # The server's own refusal (its greeting, or its answer to EHLO): a reply that
            # may mean "slow down" or "blocked" like any other.
            client.close()
            raise ConnectFailed(reply_of(exc.code, exc.message), from_server=True) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            client.close()
            raise ConnectFailed(
                SmtpReply(code=451, enhanced="4.4.1", text=f"session with {where}: {exc}"[:500])
            ) from None
        except BaseException:
            client.close()
            raise
        return SmtpSession(client, host_name, options, source)

    async def _starttls(
        self, client: aiosmtplib.SMTP, host_name: str, where: str, tls: TlsPolicy
    ) -> None:
        """STARTTLS as the policy says; raises ConnectFailed where the session must not go on."""
        required = tls == "required"
        if not client.supports_extension("starttls"):
            if required:
                raise ConnectFailed(
                    SmtpReply(
                        code=451,
                        enhanced="4.7.4",
                        text=f"TLS is required, but {where} does not offer STARTTLS"[:500],
                    )
                )
            return
        context = self._verified if required else self._unverified
        try:
            await client.starttls(
                server_hostname=host_name.rstrip("."),
                tls_context=context,
                timeout=self._options.command_timeout_s,
            )
        except aiosmtplib.SMTPResponseException as exc:
            # Refused (e.g. 454): no TLS layer was started, the plaintext session goes on.
            refusal = f"{exc.code} {' '.join(exc.message.split())}"
            if required:
                raise ConnectFailed(
                    SmtpReply(
                        code=451,
                        enhanced="4.7.4",
                        text=f"TLS is required, but {where} refused STARTTLS: {refusal}"[:500],
                    )
                ) from None
            if not client.is_connected:
                raise ConnectFailed(reply_of(exc.code, exc.message), from_server=True) from None
            log.info("%s refused STARTTLS (%s): going on in plaintext", where, refusal)
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise _UpgradeFailed(
                SmtpReply(
                    code=451,
                    enhanced="4.7.5",
                    text=f"TLS with {where} failed: {type(exc).__name__}: {exc}"[:500],
                )
            ) from None
        # RFC 3207 §4.2: what the server said before TLS is forgotten; ask again.
        await client.ehlo()

    async def close(self) -> None:
        for host in self._hosts.values():
            while host.idle:
                await _quit(host.idle.pop().client)
                host.open -= 1


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await asyncio.wait_for(client.quit(), QUIT_TIMEOUT_S)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
