"""API keys: each belongs to one tenant; only keyed hashes are kept, in memory and on disk.

Keys file lines (e.g. from a Kubernetes Secret), `#` starts a comment:

    acme:hmac-sha256:<hex HMAC-SHA256(pepper, key)>   # preferred
    acme:<hex SHA-256(key)>                           # plain digest, still accepted

The pepper (`MAILRAIL_API_KEY_PEPPER`) lives in a different Secret from the keys file, so a
leaked keys file alone does not even let an attacker check guesses offline. A slow password
hash (argon2, bcrypt) would add tens of milliseconds of CPU to every request and buys nothing
for keys that are 256-bit random tokens (`python -m services.ingest.auth new <tenant>` makes
one); a digest of such a key cannot be inverted.

Lookup is one dictionary probe by digest: an attacker cannot steer digests, so the probe
leaks nothing about stored keys, and the cost does not grow with the number of keys.
"""

import argparse
import hashlib
import hmac
import re
import secrets
from pathlib import Path

from services.ingest.errors import ApiError

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
HMAC_SCHEME = "hmac-sha256"


def _tenant(name: str, where: str) -> str:
    if not TENANT_PATTERN.match(name):
        raise ValueError(f"{where}: tenant {name!r} must match {TENANT_PATTERN.pattern}")
    return name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hmac_key(key: str, pepper: bytes) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


class ApiKeys:
    def __init__(
        self, hashed: dict[str, str], peppered: dict[str, str] | None = None, pepper: bytes = b""
    ) -> None:
        """`hashed` maps SHA-256 hex → tenant; `peppered` maps HMAC-SHA256(pepper) hex → tenant."""
        self._hashed = hashed
        self._peppered = peppered or {}
        self._pepper = pepper
        if self._peppered and not pepper:
            raise ValueError("hmac-sha256 keys need MAILRAIL_API_KEY_PEPPER")

    @classmethod
    def from_pairs(cls, pairs: str) -> "ApiKeys":
        """`tenant:key,tenant:key` (local runs)."""
        hashed = {}
        for pair in filter(None, (p.strip() for p in pairs.split(","))):
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant or not key:
                raise ValueError("MAILRAIL_API_KEYS must be comma-separated tenant:key pairs")
            hashed[hash_key(key)] = _tenant(tenant, "MAILRAIL_API_KEYS")
        return cls(hashed)

    @classmethod
    def from_file(cls, path: Path, pepper: bytes = b"") -> "ApiKeys":
        """Lines of `tenant:hmac-sha256:<hex>` or `tenant:<sha256 hex>` (comments with #)."""
        hashed: dict[str, str] = {}
        peppered: dict[str, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            tenant, _, rest = line.partition(":")
            scheme, sep, digest = rest.rpartition(":")
            where = f"{path}:{number}"
            if not _HEX64.match(digest) or (sep and scheme != HMAC_SCHEME):
                raise ValueError(f"{where}: expected tenant:{HMAC_SCHEME}:<hex> or tenant:<hex>")
            target = peppered if sep else hashed
            target[digest.lower()] = _tenant(tenant, where)
        if peppered and not pepper:
            raise ValueError(f"{path}: {HMAC_SCHEME} lines need MAILRAIL_API_KEY_PEPPER")
        return cls(hashed, peppered, pepper)

    def merged(self, other: "ApiKeys") -> "ApiKeys":
        return ApiKeys(
            self._hashed | other._hashed,
            self._peppered | other._peppered,
            other._pepper or self._pepper,
        )

    def tenant_for(self, key: str) -> str | None:
        if self._peppered:
            tenant = self._peppered.get(hmac_key(key, self._pepper))
            if tenant is not None:
                return tenant
        return self._hashed.get(hash_key(key)) if self._hashed else None

    def __len__(self) -> int:
        return len(self._hashed) + len(self._peppered)


def tenant_of(keys: ApiKeys, authorization: str | None) -> str:
    """The tenant of an `Authorization: Bearer <key>` header, or 401."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer <api key>")
    tenant = keys.tenant_for(token.strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key")
    return tenant


def main() -> None:
    """`python -m services.ingest.auth new <tenant> [--pepper-file F]`: a new key and its line."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["new"])
    parser.add_argument("tenant")
    parser.add_argument("--pepper-file", type=Path)
    args = parser.parse_args()
    tenant = _tenant(args.tenant, "tenant")
    key = f"mr_{secrets.token_urlsafe(32)}"
    if args.pepper_file is not None:
        line = f"{tenant}:{HMAC_SCHEME}:{hmac_key(key, args.pepper_file.read_bytes().strip())}"
    else:
        line = f"{tenant}:{hash_key(key)}"
    print(f"key (give to the tenant, store nowhere): {key}")
    print(f"keys file line: {line}")


if __name__ == "__main__":
    main()
