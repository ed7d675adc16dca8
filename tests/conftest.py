"""Fixtures shared by every test: factories for loopback SMTP and DNS servers.

Each factory starts as many servers as a test asks for and stops them all at teardown.

    def test_bounce(smtp_server_factory: SmtpServerFactory) -> None:
        mx = smtp_server_factory(replies={"bob@example.test": "550 5.1.1 No such user"})

    async def test_mx(dns_server_factory: DnsServerFactory) -> None:
        dns_server = dns_server_factory({"example.test": {"MX": [(10, "mx.example.test")]}})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.dns_server import DnsServerFactory, Records, RunningDnsServer, start_dns_server
from tests.support.smtp_server import (
    RunningSmtpServer,
    SmtpScript,
    SmtpServerFactory,
    start_smtp_server,
)


@pytest.fixture
def smtp_server_factory() -> Iterator[SmtpServerFactory]:
    """``factory(script=None, *, host="127.0.0.1", port=0, **SmtpScript fields)``."""
    servers: list[RunningSmtpServer] = []

    def start(
        script: SmtpScript | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        **script_fields: Any,
    ) -> RunningSmtpServer:
        if script_fields:
            script = dataclasses.replace(script or SmtpScript(), **script_fields)
        server = start_smtp_server(host, port, script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def dns_server_factory() -> Iterator[DnsServerFactory]:
    """``factory(records=None, *, host="127.0.0.1", port=0)``."""
    servers: list[RunningDnsServer] = []

    def start(
        records: Records | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> RunningDnsServer:
        server = start_dns_server(records, host, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
