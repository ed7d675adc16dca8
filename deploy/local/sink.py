"""The local receiving SMTP server: accepts everything and shows what arrived.

    python -m deploy.local.sink --listen 127.0.0.1:2526 [--maildir deploy/local/run/inbox]
                                [--quiet] [--stats-file path]

Every message is answered 250. Unless ``--quiet``, one line per message goes to stdout
(time, envelope sender, recipients, Subject, size). With ``--maildir`` each message is
written to ``<maildir>/<ns-timestamp>-<seq>.eml``, preceded by ``Return-Path`` and
``X-Envelope-To`` headers that keep the envelope. Counters (messages, recipients,
bytes, connections) are written as JSON to ``--stats-file`` every second, once at
start (with the bound address, useful with port 0) and once on exit, and printed on
exit. SIGINT or SIGTERM closes the listener and every open connection: a transaction
not yet answered stays unanswered, so the client delivers it again elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.header
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

logger = logging.getLogger(__name__)

SINK_HOSTNAME = "sink.mailrail.local"
STATS_INTERVAL_S = 1.0
IDLE_TIMEOUT_S = 300.0
MAX_MESSAGE_SIZE_BYTES = 64 * 1024 * 1024
SHOWN_RECIPIENTS = 3
SUBJECT_SHOWN_CHARS = 120

_SUBJECT_RE = re.compile(rb"^Subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_HEADER_END_RE = re.compile(rb"\r?\n\r?\n")


@dataclass
class SinkStats:
    """What arrived since start. ``bytes`` counts message data as received (after DATA)."""

    listen: str = ""
    messages: int = 0
    recipients: int = 0
    bytes: int = 0
    connections: int = 0
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    started_monotonic: float = field(default_factory=time.monotonic, repr=False)

    def as_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data.pop("started_monotonic")
        data["updated_at"] = datetime.now(UTC).isoformat()
        data["uptime_s"] = round(time.monotonic() - self.started_monotonic, 3)
        data["pid"] = os.getpid()
        return json.dumps(data, sort_keys=True)


def subject_of(data: bytes) -> str:
    """The decoded Subject header of a raw message, or ``""``."""
    end = _HEADER_END_RE.search(data)
    head = data if end is None else data[: end.start()]
    match = _SUBJECT_RE.search(head)
    if match is None:
        return ""
    raw = re.sub(rb"\r?\n[ \t]", b" ", match.group(1)).decode("utf-8", "replace").strip()
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError):
        return raw


def describe(mail_from: str, rcpt_tos: Sequence[str], data: bytes) -> str:
    """The one line printed per message."""
    shown = ", ".join(rcpt_tos[:SHOWN_RECIPIENTS])
    if len(rcpt_tos) > SHOWN_RECIPIENTS:
        shown += f" (+{len(rcpt_tos) - SHOWN_RECIPIENTS} more)"
    subject = subject_of(data)
    if len(subject) > SUBJECT_SHOWN_CHARS:
        subject = subject[: SUBJECT_SHOWN_CHARS - 1] + "…"
    stamp = datetime.now().astimezone().strftime("%H:%M:%S")
    return f"{stamp}  {mail_from or '<>'} -> {shown}  {subject!r}  {len(data)} bytes"


class SinkHandler:
    """aiosmtpd handler: count, and optionally show and store, every message."""

    def __init__(self, stats: SinkStats, *, quiet: bool, maildir: Path | None) -> None:
        self.stats = stats
        self.quiet = quiet
        self.maildir = maildir
        self._sequence = 0

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        data = envelope.original_content or b""
        stats = self.stats
        stats.messages += 1
        stats.recipients += len(envelope.rcpt_tos)
        stats.bytes += len(data)
        if self.maildir is not None or not self.quiet:
            mail_from = envelope.mail_from or ""
            if self.maildir is not None:
                self._store(mail_from, envelope.rcpt_tos, data)
            if not self.quiet:
                print(describe(mail_from, envelope.rcpt_tos, data), flush=True)
        return "250 2.0.0 OK"

    def _store(self, mail_from: str, rcpt_tos: Sequence[str], data: bytes) -> None:
        assert self.maildir is not None
        self._sequence += 1
        name = f"{time.time_ns()}-{self._sequence:06d}.eml"
        envelope = f"Return-Path: <{mail_from}>\r\nX-Envelope-To: {', '.join(rcpt_tos)}\r\n"
        partial = self.maildir / (name + ".part")
        partial.write_bytes(envelope.encode("utf-8", "surrogateescape") + data)
        partial.replace(self.maildir / name)


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` on a loopback address (``localhost`` means 127.0.0.1)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise argparse.ArgumentTypeError(f"the sink listens on loopback addresses only, not {host}")
    port = int(port_text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return host, port


def write_stats(path: Path, stats: SinkStats) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(stats.as_json() + "\n")
    partial.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.sink",
        description="Local receiving SMTP server: accepts every message and shows it.",
    )
    parser.add_argument(
        "--listen", type=parse_listen, default=("127.0.0.1", 2526), help="HOST:PORT (port 0: any)"
    )
    parser.add_argument("--maildir", type=Path, help="folder to write each message to as .eml")
    parser.add_argument("--quiet", action="store_true", help="no line per message")
    parser.add_argument("--stats-file", type=Path, help="JSON counters, rewritten every second")
    return parser


async def serve(args: argparse.Namespace) -> SinkStats:
    """Run until SIGINT/SIGTERM; return the final counters. The folders must exist."""
    host, port = args.listen
    maildir: Path | None = args.maildir
    stats_file: Path | None = args.stats_file

    loop = asyncio.get_running_loop()
    stats = SinkStats()
    handler = SinkHandler(stats, quiet=args.quiet, maildir=maildir)
    connections: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def new_connection() -> SMTP:
        stats.connections += 1
        connection = SMTP(
            handler,
            hostname=SINK_HOSTNAME,
            ident="Mailrail local sink",
            loop=loop,
            enable_SMTPUTF8=True,
            data_size_limit=MAX_MESSAGE_SIZE_BYTES,
            timeout=IDLE_TIMEOUT_S,
        )
        connections.add(connection)
        return connection

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    server = await loop.create_server(new_connection, host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    stats.listen = f"{bound_host}:{bound_port}"
    print(f"sink listening on {stats.listen}", flush=True)
    if stats_file is not None:
        write_stats(stats_file, stats)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_INTERVAL_S)
            if stats_file is not None:
                write_stats(stats_file, stats)
    finally:
        server.close()
        for connection in list(connections):
            transport = connection.transport
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        await asyncio.sleep(0)
        await server.wait_closed()
        if stats_file is not None:
            write_stats(stats_file, stats)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.maildir is not None:
        args.maildir.mkdir(parents=True, exist_ok=True)
    if args.stats_file is not None:
        args.stats_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    stats = asyncio.run(serve(args))
    print(f"sink stopped: {stats.as_json()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
