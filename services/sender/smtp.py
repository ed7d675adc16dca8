"""SMTP transactions over pooled, reused connections (aiosmtplib underneath).

A connection is reused for the same host up to `max_messages_per_connection`; at most
`max_connections` are open per host. Every outcome comes back as an `SmtpReply`, including
connection failures (4.4.1) and a connection lost mid-transaction (4.4.2): nothing raises.
"""

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiosmtplib

from schemas.records import SmtpReply

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30.0
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s+")


def reply_of(code: int, message: str) -> SmtpReply:
    """Split an SMTP reply's text into its RFC 3463 enhanced code and the rest."""
    text = " ".join(message.split())
    match = _ENHANCED.match(text)
    enhanced = match.group(1) if match and match.group(1)[0] == str(code)[0] else None
    if match:
        text = text[match.end() :]
    return SmtpReply(code=code, enhanced=enhanced, text=text[:500])


class ConnectFailed(Exception):
    def __init__(self, reply: SmtpReply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0


@dataclass
class _HostSlots:
    limit: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)


@dataclass(frozen=True)
class SmtpOptions:
    ehlo: str
    timeout_s: float = 300.0
    source_address: str | None = None
    tls: str = "opportunistic"


class SmtpPool:
    def __init__(
        self,
        options: SmtpOptions,
        max_connections: int = 10,
        max_messages_per_connection: int = 100,
    ) -> None:
        self._options = options
        self._max_connections = max_connections
        self._max_messages = max_messages_per_connection
        self._hosts: dict[tuple[str, int], _HostSlots] = defaultdict(
            lambda: _HostSlots(asyncio.Semaphore(self._max_connections))
        )

    @property
    def open_connections(self) -> int:
        return sum(len(slots.idle) for slots in self._hosts.values())

    async def send(
        self, address: str, port: int, mail_from: str, rcpt: str, data: bytes
    ) -> SmtpReply:
        """One transaction for one recipient. Raises `ConnectFailed` only if no session opened."""
        async with self._connection(address, port) as connection:
            try:
                errors, response = await connection.client.sendmail(mail_from, [rcpt], data)
            except aiosmtplib.SMTPRecipientsRefused as refused:
                connection.sent += 1
                reason = refused.recipients[0]
                return reply_of(reason.code, reason.message)
            except aiosmtplib.SMTPResponseException as exc:
                connection.sent += 1
                if exc.code == 421:
                    connection.client.close()
                return reply_of(exc.code, exc.message)
            except (aiosmtplib.SMTPException, OSError) as exc:
                connection.client.close()
                return SmtpReply(code=451, enhanced="4.4.2", text=f"connection lost: {exc}"[:500])
            connection.sent += 1
            if rcpt in errors:
                return reply_of(errors[rcpt].code, errors[rcpt].message)
            return reply_of(250, response)

    @asynccontextmanager
    async def _connection(self, address: str, port: int) -> AsyncIterator[_Connection]:
        slots = self._hosts[(address, port)]
        async with slots.limit:
            connection = None
            while slots.idle and connection is None:
                candidate = slots.idle.pop()
                if candidate.client.is_connected:
                    connection = candidate
            if connection is None:
                connection = await self._open(address, port)
            try:
                yield connection
            finally:
                if connection.client.is_connected and connection.sent < self._max_messages:
                    slots.idle.append(connection)
                else:
                    await _quit(connection.client)

    async def _open(self, address: str, port: int) -> _Connection:
        options = self._options
        client = aiosmtplib.SMTP(
            hostname=address,
            port=port,
            local_hostname=options.ehlo,
            source_address=(options.source_address, 0) if options.source_address else None,
            timeout=options.timeout_s,
            start_tls=None if options.tls == "opportunistic" else options.tls == "required",
            validate_certs=options.tls == "required",
        )
        try:
            await client.connect(timeout=CONNECT_TIMEOUT_S)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise ConnectFailed(reply_of(exc.code, exc.message)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise ConnectFailed(
                SmtpReply(
                    code=451, enhanced="4.4.1", text=f"connect to {address}:{port}: {exc}"[:500]
                )
            ) from None
        return _Connection(client)

    async def close(self) -> None:
        for slots in self._hosts.values():
            while slots.idle:
                await _quit(slots.idle.pop().client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    if client.is_connected:
        try:
            await asyncio.wait_for(client.quit(), 5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            client.close()
