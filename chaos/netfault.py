"""An SMTP-aware TCP proxy on loopback that breaks one transaction per recipient, once.

It sits between the sender and a healthy sink and follows the client's side of the dialogue
(commands, then the body after `DATA`). For a transaction whose recipients were not broken
before, it either
- `cut`: forwards only the first half of the body, then closes both connections (the sink
  never sees the final dot and stores nothing), or
- `swallow`: forwards the whole body, then drops the sink's reply to the final dot and closes
  the client's connection (the sink stored the message; the sender never heard so: RFC 1047).
Later transactions of the same recipients pass untouched, so a retry can succeed.

Two more modes slow every transaction down instead: `slow-rcpt` holds the sink's reply to
each RCPT (with PIPELINING, the replies to MAIL, RCPT and DATA together) for `delay_s`;
`slow-dot` holds its reply to each final dot for `delay_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["cut", "swallow", "slow-rcpt", "slow-dot"]
START_TIMEOUT_S = 5.0
END_OF_DATA = b"\r\n.\r\n"


@dataclass
class FaultStats:
    connections: int = 0
    cut: list[str] = field(default_factory=list)
    swallowed: list[str] = field(default_factory=list)
    #: Replies held back by a slow mode, and for how long in all.
    held: int = 0
    held_s: float = 0.0


class FaultProxy:
    def __init__(
        self, upstream: tuple[str, int], mode: Mode, host: str = "127.0.0.1", delay_s: float = 0.0
    ) -> None:
        self.upstream = upstream
        self.mode = mode
        self.delay_s = delay_s
        self.stats = FaultStats()
        self._broken: set[str] = set()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(host), self._loop)
        self._server, self.port = future.result(START_TIMEOUT_S)
        self.host = host

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _listen(self, host: str) -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(self._serve, host, 0)
        return server, int(server.sockets[0].getsockname()[1])

    def _first_time(self, recipients: list[str]) -> bool:
        with self._lock:
            fresh = bool(recipients) and not any(r in self._broken for r in recipients)
            self._broken.update(recipients)
            return fresh

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        swallow = asyncio.Event()
        hold = asyncio.Event()
        done = asyncio.Event()

        async def downstream() -> None:
            """Sink → client, except a reply the client must never see."""
            buffer = b""
            while not done.is_set():
                chunk = await server_r.read(65536)
                if not chunk:
                    break
                if hold.is_set():
                    hold.clear()
                    started = time.monotonic()
                    await asyncio.sleep(self.delay_s)
                    self.stats.held += 1
                    self.stats.held_s += time.monotonic() - started
                if swallow.is_set():
                    buffer += chunk
                    if b"\r\n" in buffer:  # the reply to the final dot: drop it, hang up
                        done.set()
                        break
                    continue
                client_w.write(chunk)
                await client_w.drain()
            done.set()

        async def upstream() -> None:
            """Client → sink, following the dialogue; breaks one transaction per recipient."""
            recipients: list[str] = []
            pending = b""
            while not done.is_set():
                chunk = await client_r.read(65536)
                if not chunk:
                    break
                pending += chunk
                while True:
                    line_end = pending.find(b"\r\n")
                    if line_end < 0:
                        break
                    line = pending[: line_end + 2]
                    upper = line.upper()
                    if upper.startswith(b"RCPT TO:"):
                        recipients.append(_address(line))
                        if self.mode == "slow-rcpt":
                            hold.set()
                    if upper.startswith(b"DATA"):
                        server_w.write(line)
                        pending = pending[line_end + 2 :]
                        read = await _read_body(client_r, pending)
                        if read is None:
                            done.set()
                            return
                        body, pending = read
                        broken = self._first_time(recipients)
                        if broken and self.mode == "cut":
                            self.stats.cut += recipients
                            server_w.write(body[: len(body) // 2])
                            await server_w.drain()
                            done.set()
                            return
                        if broken and self.mode == "swallow":
                            self.stats.swallowed += recipients
                            swallow.set()
                        if self.mode == "slow-dot":
                            hold.set()
                        server_w.write(body)
                        recipients = []
                        continue
                    if upper.startswith((b"RSET", b"MAIL FROM:")):
                        recipients = [] if upper.startswith(b"RSET") else recipients
                    server_w.write(line)
                    pending = pending[line_end + 2 :]
                await server_w.drain()
            done.set()

        tasks = [asyncio.create_task(downstream()), asyncio.create_task(upstream())]
        await done.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.close()

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            current = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is not current:
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(START_TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(START_TIMEOUT_S)


def _address(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    start, end = text.find("<"), text.find(">")
    return text[start + 1 : end].lower() if 0 <= start < end else text[8:].strip().lower()


async def _read_body(reader: asyncio.StreamReader, pending: bytes) -> tuple[bytes, bytes] | None:
    """(the body up to and including the final dot, what follows), None if the client left."""
    body = pending
    while END_OF_DATA not in body and not body.startswith(b".\r\n"):
        chunk = await reader.read(65536)
        if not chunk:
            return None
        body += chunk
    end = body.find(END_OF_DATA) + len(END_OF_DATA) if END_OF_DATA in body else 3
    return body[:end], body[end:]


@contextmanager
def fault_proxy(
    upstream: tuple[str, int], mode: Mode, delay_s: float = 0.0
) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, mode, delay_s=delay_s)
    try:
        yield proxy
    finally:
        proxy.stop()
