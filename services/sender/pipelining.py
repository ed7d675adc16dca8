"""ESMTP PIPELINING (RFC 2920) on top of aiosmtplib.

aiosmtplib sends one command and waits for its reply; its protocol parses one reply per
`data_received` and drops data that arrives while a parsed reply awaits pickup, so several
replies in flight would be lost. `PipeliningProtocol` extends it: while a pipelined group is
in flight it collects every complete reply from the buffer. Outside a group it behaves
exactly like the original, so it is installed as aiosmtplib's protocol class.

It also never lets bytes a server sent unasked pass for the reply to the next command:
whatever is still buffered when a command (or a pipelined group, or a message body) is
about to be written cannot be its reply, and is dropped. aiosmtplib itself drops what follows
the `220` to STARTTLS (RFC 3207 §4.2, plaintext injection); this covers every other command.
"""

import asyncio
import logging
from typing import cast

import aiosmtplib.smtp
from aiosmtplib.errors import SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse

log = logging.getLogger(__name__)


class BodyNotSent(SMTPServerDisconnected):
    """The message body could not be handed to the network in full (connection lost, or the
    transport stayed full past the timeout). The connection is aborted, so the final dot
    never reaches the server: the message cannot have been accepted."""


class PipeliningProtocol(SMTPProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._group: list[SMTPResponse] | None = None
        self._group_size = 0
        self._group_waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._group is None:
            super().data_received(data)
            return
        self._buffer.extend(data)
        try:
            while (response := self._read_response_from_buffer()) is not None:
                self._group.append(response)
        except Exception as exc:
            self._fail_group(exc)
            return
        if len(self._group) >= self._group_size:
            self._settle_group()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        if exc is not None:
            lost.__cause__ = exc
        self._fail_group(lost)
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        self._fail_group(SMTPServerDisconnected("Unexpected EOF received"))
        return super().eof_received()

    def _settle_group(self) -> None:
        if self._group_waiter is not None and not self._group_waiter.done():
            self._group_waiter.set_result(None)

    def _fail_group(self, exc: BaseException) -> None:
        if self._group_waiter is not None and not self._group_waiter.done():
            self._group_waiter.set_exception(exc)
            self._group_waiter.exception()

    def _discard_unsolicited(self) -> None:
        """Before a command is written: buffered bytes cannot be its reply; drop them."""
        if self._buffer:
            log.warning(
                "ignoring %d bytes the server sent unasked: %r",
                len(self._buffer),
                bytes(self._buffer[:80]),
            )
            del self._buffer[:]

    async def execute_command(self, *args: bytes, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109
        if self._command_lock is not None and not self._command_lock.locked():
            # Free now, so acquired without yielding below: nothing else owns the buffer.
            self._discard_unsolicited()
        return await super().execute_command(*args, timeout=timeout)

    async def data_block(
        self,
        block: bytes,
        write_timeout: float | None,
        reply_timeout: float | None,
    ) -> SMTPResponse:
        """Write the message body (dot-stuffed, ending in the final dot), wait at most
        `write_timeout` for the transport to take it, then at most `reply_timeout` for the
        reply to the final dot.

        Raises BodyNotSent when the body could not be written in full (the transport is
        aborted, never flushed: the dot is not sent), SMTPServerDisconnected or
        SMTPReadTimeoutError when the body went but no reply came.
        """
        if self._command_lock is None:
            raise BodyNotSent("Server not connected")
        async with self._command_lock:
            self._discard_unsolicited()
            # Armed before the write: a reply that lands while the body drains is kept.
            self._response_pending = True
            try:
                self.write(block)
                await asyncio.wait_for(self._drain_helper(), write_timeout)
            except (OSError, TimeoutError) as exc:
                self._response_pending = False
                if self.transport is not None:
                    cast(asyncio.WriteTransport, self.transport).abort()
                reason = str(exc) or f"the body was not written within {write_timeout} s"
                raise BodyNotSent(reason) from exc
            return await self.read_response(timeout=reply_timeout)

    async def pipeline(self, commands: list[bytes], timeout: float | None) -> list[SMTPResponse]:  # noqa: ASYNC109
        """Write the commands at once and return their replies, in order.

        Raises SMTPServerDisconnected if the connection drops before every reply arrived.
        """
        if self._command_lock is None:
            raise SMTPServerDisconnected("Server not connected")
        async with self._command_lock:
            self._group = []
            self._group_size = len(commands)
            self._group_waiter = self._loop.create_future()
            try:
                self._discard_unsolicited()
                self.write(b"".join(commands))
                if len(self._group) < self._group_size:
                    await asyncio.wait_for(self._group_waiter, timeout)
                return self._group[: self._group_size]
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None
            finally:
                self._group = None
                self._group_waiter = None


def install() -> None:
    """Make every aiosmtplib connection use the pipelining-capable protocol."""
    if getattr(aiosmtplib.smtp, "SMTPProtocol") is SMTPProtocol:  # noqa: B009
        setattr(aiosmtplib.smtp, "SMTPProtocol", PipeliningProtocol)  # noqa: B010
