"""ESMTP PIPELINING (RFC 2920) on top of aiosmtplib.

aiosmtplib sends one command and waits for its reply; its protocol parses one reply per
`data_received` and drops data that arrives while a parsed reply awaits pickup, so several
replies in flight would be lost. `PipeliningProtocol` extends it: while a pipelined group is
in flight it collects every complete reply from the buffer. Outside a group it behaves
exactly like the original, so it is installed as aiosmtplib's protocol class.
"""

import asyncio

import aiosmtplib.smtp
from aiosmtplib.errors import SMTPServerDisconnected
from aiosmtplib.protocol import SMTPProtocol
from aiosmtplib.response import SMTPResponse


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
                # Replies already buffered (none are expected) would belong to this group.
                while (response := self._read_response_from_buffer()) is not None:
                    self._group.append(response)
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
