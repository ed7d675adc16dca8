"""Throwaway DKIM keys made at test time, the DNS records that publish them, and a
dkimpy lookup function that asks a loopback DNS server.

    folder = write_key_folder(tmp_path, {"acme.example": ["a1.rsa", "e1.ed25519"]})
    dns = dns_server_factory(dkim_records(folder))
    assert verify_all(message, dkim_dnsfunc(dns.address))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dkim
import dns.resolver
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from services.sender.dkim_keys import load_keyring
from tests.support.dns_server import NameRecords

RSA_BITS = 2048
DnsFunc = Callable[..., bytes]


def private_key_pem(kind: str, bits: int = RSA_BITS) -> bytes:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    key = (
        rsa.generate_private_key(65537, bits)
        if kind == "rsa"
        else ed25519.Ed25519PrivateKey.generate()
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_key_folder(
    root: Path, keys: Mapping[str, Sequence[str]], config: dict[str, Any] | None = None
) -> Path:
    """`keys` maps a domain to `<selector>.<rsa|ed25519>` names; `config` becomes dkim.yaml."""
    folder = root / "dkim-keys"
    for domain, names in keys.items():
        (folder / domain).mkdir(parents=True, exist_ok=True)
        for name in names:
            kind = name.rsplit(".", 1)[1]
            (folder / domain / f"{name}.pem").write_bytes(private_key_pem(kind))
    if config is not None:
        (folder / "dkim.yaml").write_text(yaml.safe_dump(config))
    return folder


def dkim_records(folder: Path) -> dict[str, NameRecords]:
    """A TXT record per loaded key, at `<selector>._domainkey.<domain>`."""
    keyring = load_keyring(folder)
    return {
        key.dns_name: {"TXT": [key.dns_record()]} for keys in keyring.keys.values() for key in keys
    }


def dkim_dnsfunc(address: str) -> DnsFunc:
    """dkimpy's `dnsfunc(name, timeout=5)`: the TXT record's strings joined, via `address`."""
    host, _, port = address.rpartition(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)

    def lookup(name: bytes, timeout: int = 5, **_: Any) -> bytes:
        resolver.lifetime = float(timeout)
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


def verify_all(message: bytes, dnsfunc: DnsFunc) -> list[bool]:
    """dkimpy's verdict for every DKIM-Signature of the message, top first."""
    head = message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    count = sum(1 for line in head if line.lower().startswith(b"dkim-signature:"))
    return [_verify(message, index, dnsfunc) for index in range(count)]


def _verify(message: bytes, index: int, dnsfunc: DnsFunc) -> bool:
    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False
