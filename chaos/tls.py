"""TLS on loopback for scenario 13: a private CA, certificates good and bad, and SMTP servers
that offer STARTTLS with them, break the handshake, or inject plaintext after their 220.

The sender trusts the CA through `SSL_CERT_FILE` (OpenSSL's default verify paths, which
`ssl.create_default_context()` loads), so "required" TLS can succeed against a good
certificate and must fail against an expired one or one for another name. In-process tests
pass `Authority.client_context()` to the SMTP pool instead.

A `TlsSink` behaves as one of:
- `tls`: STARTTLS with its certificate;
- `reset`: answers `220 Ready to start TLS`, waits for the client's first handshake bytes and
  resets the connection (RST) in the middle of the handshake;
- `inject`: STARTTLS with its certificate, but its `220` carries a plaintext reply behind it in
  the same write (RFC 3207 §4.2's injection), which the client must ignore;
- `plain`: no STARTTLS at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.smtp_server import ReceivedMessage

Behaviour = Literal["tls", "reset", "inject", "plain"]
INJECTED = "554 5.7.0 injected in plaintext after STARTTLS"
READY_TO_START_TLS = "220 Ready to start TLS"
SERVER_NAME = "mx.tls.chaos.example"
#: `reset`: how long to wait for the client's ClientHello before resetting anyway.
HANDSHAKE_WAIT_S = 5.0


@dataclass(frozen=True)
class Received:
    """A message the sink accepted, and how it came."""

    message: ReceivedMessage
    over_tls: bool
    ehlo: str

    @property
    def rcpt_tos(self) -> list[str]:
        return self.message.rcpt_tos


@dataclass
class _Handler:
    """Shared by every connection of one sink (hooks run on the sink's thread)."""

    received: list[Received] = field(default_factory=list)
    #: Connections accepted (not counting the controller's own start-up probe).
    connections: int = 0
    #: STARTTLS commands received.
    starttls: int = 0
    #: One entry per MAIL FROM received: whether it came over TLS.
    transactions: list[bool] = field(default_factory=list)
    #: Every RCPT TO received: (address, whether it came over TLS).
    rcpts: list[tuple[str, bool]] = field(default_factory=list)
    #: STARTTLS handshakes that failed at this end (certificate refused, connection reset).
    handshake_failures: int = 0
    #: Any other exception a session raised.
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_exception(self, error: Exception) -> str:
        """Counted, not logged: failed handshakes are what these servers are for."""
        with self.lock:
            if isinstance(error, TLSSetupException):
                self.handshake_failures += 1
            else:
                self.errors.append(repr(error))
        return f"500 Error: ({type(error).__name__}) {error}"

    async def handle_MAIL(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        with self.lock:
            self.transactions.append(session.ssl is not None)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self.lock:
            self.rcpts.append((address, session.ssl is not None))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
        message = ReceivedMessage(
            mail_from=str(envelope.mail_from or ""),
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"",
            peer=(str(peer[0]), int(peer[1])),
            received_at=datetime.now(UTC),
        )
        with self.lock:
            self.received.append(
                Received(message, session.ssl is not None, str(session.host_name or ""))
            )
        return "250 2.0.0 OK"


class _BreakingSMTP(SMTP):
    """One connection; STARTTLS as `behaviour` says."""

    def __init__(self, handler: _Handler, behaviour: Behaviour, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.counts = handler
        self.behaviour = behaviour

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # not the TLS upgrade of a connection already counted
            with self.counts.lock:
                self.counts.connections += 1
        super().connection_made(transport)

    async def push(self, status: Any) -> None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        if self.behaviour == "inject" and text.startswith(READY_TO_START_TLS):
            await super().push(f"{text}\r\n{INJECTED}")
            return
        await super().push(text)

    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802
        with self.counts.lock:
            self.counts.starttls += 1
        if self.behaviour != "reset":
            await super().smtp_STARTTLS(arg)
            return
        await self.push(READY_TO_START_TLS)
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self._reader.read(1), HANDSHAKE_WAIT_S)
        transport = self.transport
        if isinstance(transport, asyncio.Transport):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger 0: close() sends an RST, not a FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()


class _Controller(Controller):
    def __init__(
        self,
        handler: _Handler,
        host: str,
        port: int,
        behaviour: Behaviour,
        context: ssl.SSLContext | None,
    ) -> None:
        self.behaviour = behaviour
        super().__init__(
            handler, hostname=host, port=port, tls_context=context, server_hostname=SERVER_NAME
        )

    def factory(self) -> SMTP:
        return _BreakingSMTP(
            self.handler,
            self.behaviour,
            hostname=SERVER_NAME,
            tls_context=self.SMTP_kwargs.get("tls_context"),
        )


class TlsSink:
    """One SMTP server on `host:port` behaving as `behaviour`, with `context` for STARTTLS."""

    def __init__(
        self, host: str, port: int, behaviour: Behaviour, context: ssl.SSLContext | None
    ) -> None:
        self.host, self.port, self.behaviour = host, port, behaviour
        self.handler = _Handler()
        self._controller = _Controller(
            self.handler, host, port, behaviour, None if behaviour == "plain" else context
        )
        self._controller.start()
        with self.handler.lock:
            self.handler.connections = 0  # the controller's start-up probe

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def received(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.received)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """What arrived, in the form the oracle joins."""
        return [r.message for r in self.received]

    @property
    def connections(self) -> int:
        return self.handler.connections

    @property
    def starttls(self) -> int:
        return self.handler.starttls

    @property
    def handshake_failures(self) -> int:
        return self.handler.handshake_failures

    @property
    def errors(self) -> list[str]:
        with self.handler.lock:
            return list(self.handler.errors)

    @property
    def transactions(self) -> list[bool]:
        with self.handler.lock:
            return list(self.handler.transactions)

    @property
    def rcpts(self) -> list[tuple[str, bool]]:
        with self.handler.lock:
            return list(self.handler.rcpts)

    def stop(self) -> None:
        self._controller.stop()


class Authority:
    """A CA in `folder` (ca.pem) and server certificates it signs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mailrail chaos CA")])
        now = datetime.now(UTC)
        self._name = name
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def server_context(self, name: str, *, expired: bool = False) -> ssl.SSLContext:
        """A server context with a certificate for `name` (expired a day ago if asked)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        if expired:
            start, end = now - timedelta(days=30), now - timedelta(days=1)
        else:
            start, end = now - timedelta(days=1), now + timedelta(days=30)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        stem = f"{name}{'-expired' if expired else ''}"
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        return context


def stop_all(sinks: dict[str, TlsSink]) -> None:
    for sink in sinks.values():
        with contextlib.suppress(TimeoutError, RuntimeError, AssertionError):
            sink.stop()
