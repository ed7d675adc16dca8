"""DKIM private keys from a folder (`MAILRAIL_DKIM_KEYS`, a Kubernetes Secret mount).

Two layouts, read once at start, which may be mixed in one folder:

    <folder>/dkim.yaml                                   optional, see `KeyConfig`
    <folder>/<selector>._domainkey.<domain>.rsa.pem      flat: the file name is the DNS name
    <folder>/<selector>._domainkey.<domain>.ed25519.pem  (what a Secret can hold: no `/`)
    <folder>/<domain>/<selector>.rsa.pem                 sub-folder per domain
    <folder>/<domain>/<selector>.ed25519.pem

RSA keys are PKCS#1 or PKCS#8 (2048 bits; 1024 minimum), Ed25519 keys PKCS#8. A flat name is
split at its first `._domainkey.`, so domains may contain dots. Anything wrong (a `.pem` name
neither layout reads, a bad key, the same key in both layouts) fails the start with the path
and the reason. An empty or missing folder is no keys: mail goes out unsigned, with one
warning in the log (tenants in `MAILRAIL_DKIM_REQUIRED_TENANTS` are held, see `dkim.py`).

Names starting with a dot (a Secret mount's `..data`) and files not ending in `.pem` are
skipped. Without `dkim.yaml` every key of a domain signs (one RSA plus one Ed25519 key gives
the two signatures RFC 8463 recommends). For a rotation keep both selectors' keys in the
folder and name the one that signs in `active`; the other stays published in DNS.
"""

import base64
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

CONFIG_FILE = "dkim.yaml"
MIN_RSA_BITS = 1024  # RFC 8301: verifiers reject smaller keys
ADVISED_RSA_BITS = 2048

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_KEY_FILE = re.compile(
    r"^(?P<selector>[a-z0-9](?:[a-z0-9_.-]*[a-z0-9])?)\.(?P<kind>rsa|ed25519)\.pem$"
)
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
_DOMAINKEY = "._domainkey."
FLAT_NAME = "<selector>._domainkey.<domain>.(rsa|ed25519).pem"


class DkimKeyError(Exception):
    """The key folder cannot be used; the message names the file and what to do."""


class DomainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Selectors that sign; the domain's other keys are loaded but idle. Default: all.
    active: list[str] | None = Field(default=None, min_length=1)
    #: Only these tenants' mail is signed with this domain's keys. Default: any tenant.
    tenants: list[str] | None = None


class KeyConfig(BaseModel):
    """`dkim.yaml`, e.g.

    platform_domains: [mailrail.example]   # sign every message with these too
    domains:
      acme.example: {active: [s2026b], tenants: [acme]}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    platform_domains: list[str] = Field(default_factory=list)
    domains: dict[str, DomainConfig] = Field(default_factory=dict)


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: Algorithm
    private: PrivateKey = field(repr=False)

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def sign(self, data: bytes) -> bytes:
        """The signature over the header hash input (RFC 8463: Ed25519 signs its SHA-256)."""
        if isinstance(self.private, rsa.RSAPrivateKey):
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return self.private.sign(digest.finalize())

    def public_key_b64(self) -> str:
        """The `p=` value: SubjectPublicKeyInfo DER for RSA, the raw 32 bytes for Ed25519."""
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            der = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            der = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(der).decode()

    def dns_record(self) -> str:
        """The TXT record to publish at `dns_name`."""
        return f"v=DKIM1; k={_kind(self)}; p={self.public_key_b64()}"


@dataclass(frozen=True)
class Keyring:
    #: Every key loaded, by domain (active or not): what the doctor checks against DNS.
    keys: dict[str, list[DkimKey]]
    #: The keys that sign, by domain.
    active: dict[str, list[DkimKey]]
    #: Domains whose keys sign only some tenants' mail.
    tenants: dict[str, frozenset[str]]
    #: Keys that sign every message (the platform's own domains).
    platform: list[DkimKey]

    def signing_domain(self, from_domain: str, tenant: str) -> str | None:
        """The From domain, or its nearest parent, whose keys may sign this tenant's mail.

        A parent's signature is aligned under DMARC's default relaxed alignment.
        """
        labels = from_domain.lower().rstrip(".").split(".")
        for start in range(len(labels) - 1):
            domain = ".".join(labels[start:])
            if domain in self.active:
                allowed = self.tenants.get(domain)
                return domain if allowed is None or tenant in allowed else None
        return None


def load_keyring(folder: Path) -> Keyring:
    """Read and check every key under `folder`; raises `DkimKeyError`.

    An empty or missing folder gives an empty keyring (nothing is signed) and one warning.
    """
    if folder.exists() and not folder.is_dir():
        raise DkimKeyError(f"MAILRAIL_DKIM_KEYS={folder}: not a folder")
    config = _load_config(folder / CONFIG_FILE)
    # (domain, name in the sub-folder layout) → where it came from and the key. Keys sort by
    # that name, whichever layout they came from.
    found: dict[tuple[str, str], tuple[Path, DkimKey]] = {}
    for path, key in _read_keys(folder):
        slot = (key.domain, f"{key.selector}.{_kind(key)}.pem")
        if slot in found:
            raise DkimKeyError(
                f"{path}: the same key as {found[slot][0]} ({key.dns_name}, {_kind(key)}); "
                "keep one of them"
            )
        found[slot] = (path, key)
    keys: dict[str, list[DkimKey]] = {}
    for slot in sorted(found):
        keys.setdefault(slot[0], []).append(found[slot][1])
    for domain in [*config.domains, *config.platform_domains]:
        if domain not in keys:
            raise DkimKeyError(
                f"{folder / CONFIG_FILE}: {domain} has no key folder {domain}/ and no "
                f"<selector>._domainkey.{domain}.(rsa|ed25519).pem file"
            )
    if not keys:
        log.warning(
            "no DKIM keys: mail is sent unsigned",
            extra={
                "folder": str(folder),
                "expected": f"{FLAT_NAME} or <domain>/<selector>.(rsa|ed25519).pem",
            },
        )
        return Keyring({}, {}, {}, [])
    active = {domain: _active(domain, loaded, config) for domain, loaded in keys.items()}
    tenants = {
        domain: frozenset(entry.tenants)
        for domain, entry in config.domains.items()
        if entry.tenants is not None
    }
    platform = [key for domain in config.platform_domains for key in active[domain]]
    for domain, signing in active.items():
        log.info(
            "DKIM keys loaded",
            extra={
                "domain": domain,
                "selectors": [f"{k.selector}:{k.algorithm}" for k in signing],
            },
        )
    return Keyring(keys, active, tenants, platform)


def _read_keys(folder: Path) -> list[tuple[Path, DkimKey]]:
    """Every key file of both layouts, with its path; nothing for a missing folder."""
    if not folder.is_dir():
        return []
    result: list[tuple[Path, DkimKey]] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            domain = entry.name.lower()
            if not _DOMAIN.match(domain):
                raise DkimKeyError(
                    f"{entry}: folder name must be a domain name such as acme.example"
                )
            result.extend(
                (path, _load_key(domain, path)) for path in sorted(entry.iterdir()) if _is_pem(path)
            )
        elif _is_pem(entry):
            result.append((entry, _load_flat_key(entry)))
    return result


def _kind(key: DkimKey) -> str:
    return "rsa" if key.algorithm == "rsa-sha256" else "ed25519"


def _is_pem(path: Path) -> bool:
    return not path.name.startswith(".") and path.name.endswith(".pem") and path.is_file()


def _load_config(path: Path) -> KeyConfig:
    if not path.exists():
        return KeyConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return KeyConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise DkimKeyError(f"{path}: {exc}") from None


def _active(domain: str, found: list[DkimKey], config: KeyConfig) -> list[DkimKey]:
    entry = config.domains.get(domain)
    if entry is None or entry.active is None:
        return found
    by_selector = {key.selector: key for key in found}
    missing = [s for s in entry.active if s not in by_selector]
    if missing:
        raise DkimKeyError(f"{CONFIG_FILE}: {domain} active selectors {missing} have no key file")
    return [key for key in found if key.selector in entry.active]


def _load_flat_key(path: Path) -> DkimKey:
    """A key of the flat layout: `<selector>._domainkey.<domain>.<alg>.pem`."""
    selector, sep, rest = path.name.partition(_DOMAINKEY)
    domain, dot, tail = rest.rpartition(".")
    domain, _, kind = domain.rpartition(".")
    key_name = f"{selector}.{kind}.{tail}"
    if not (sep and dot and _DOMAIN.match(domain.lower()) and _KEY_FILE.match(key_name)):
        raise DkimKeyError(
            f"{path}: name must be {FLAT_NAME}, e.g. s2026a._domainkey.acme.example.rsa.pem"
            " (or put the key in a folder named after its domain: <domain>/<selector>.rsa.pem)"
        )
    return _load_key(domain.lower(), path, key_name)


def _load_key(domain: str, path: Path, name: str | None = None) -> DkimKey:
    match = _KEY_FILE.match(name or path.name)
    if match is None:
        raise DkimKeyError(f"{path}: name must be <selector>.rsa.pem or <selector>.ed25519.pem")
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise DkimKeyError(f"{path}: password-protected keys are not supported") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{path}: not a PEM private key ({exc})") from None
    kind = match["kind"]
    if kind == "rsa" and isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise DkimKeyError(f"{path}: {private.key_size}-bit RSA key; use {ADVISED_RSA_BITS}")
        if private.key_size < ADVISED_RSA_BITS:
            log.warning("small DKIM RSA key", extra={"path": str(path), "bits": private.key_size})
        return DkimKey(domain, match["selector"], "rsa-sha256", private)
    if kind == "ed25519" and isinstance(private, ed25519.Ed25519PrivateKey):
        return DkimKey(domain, match["selector"], "ed25519-sha256", private)
    actual = type(private).__name__.removeprefix("_").removesuffix("PrivateKey")
    raise DkimKeyError(f"{path}: named .{kind}.pem but holds a {actual} key")
