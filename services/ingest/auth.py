"""API keys: each belongs to one tenant; only hashes are kept in memory."""

import hashlib
import hmac
import re
from pathlib import Path

TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _tenant(name: str, where: str) -> str:
    if not TENANT_PATTERN.match(name):
        raise ValueError(f"{where}: tenant {name!r} must match {TENANT_PATTERN.pattern}")
    return name


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    def __init__(self, hashed: dict[str, str]) -> None:
        """`hashed` maps the SHA-256 hex of a key to its tenant."""
        self._hashed = hashed

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
    def from_file(cls, path: Path) -> "ApiKeys":
        """Lines of `tenant:sha256hex` (comments with #), e.g. from a Kubernetes Secret."""
        hashed = {}
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, digest = line.partition(":")
            if not sep or len(digest) != 64:
                raise ValueError(f"{path}:{number}: expected tenant:sha256-hex")
            hashed[digest.lower()] = _tenant(tenant, f"{path}:{number}")
        return cls(hashed)

    def merged(self, other: "ApiKeys") -> "ApiKeys":
        return ApiKeys(self._hashed | other._hashed)

    def tenant_for(self, key: str) -> str | None:
        digest = hash_key(key)
        for known, tenant in self._hashed.items():
            if hmac.compare_digest(known, digest):
                return tenant
        return None

    def __len__(self) -> int:
        return len(self._hashed)
