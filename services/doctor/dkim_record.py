"""DKIM check: the key published for each selector is the public half of our private key."""

import base64
import binascii

from services.doctor.checks import Check, Status, parse_tags
from services.doctor.lookup import Dns, DnsError
from services.sender.dkim_keys import DkimKey, Keyring

GENERATE = "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out {dir}/{domain}/<selector>.rsa.pem"


def signing_domain(keyring: Keyring, domain: str) -> str | None:
    """The domain whose keys sign mail from `domain`: itself or its nearest parent with keys."""
    labels = domain.lower().rstrip(".").split(".")
    for start in range(len(labels) - 1):
        candidate = ".".join(labels[start:])
        if candidate in keyring.keys:
            return candidate
    return None


def check_dkim(dns: Dns, domain: str, keyring: Keyring | None, keys_dir: str) -> list[Check]:
    """One row per key of the signing domain (active or idle: both must be published)."""
    signer = signing_domain(keyring, domain) if keyring else None
    if keyring is None or signer is None:
        where = f"in {keys_dir}" if keys_dir else "(give --dkim-keys or MAILRAIL_DKIM_KEYS)"
        return [
            Check(
                f"DKIM {domain}",
                Status.FAIL,
                f"no DKIM key for {domain} {where}",
                GENERATE.format(dir=keys_dir or "<keys>", domain=domain),
            )
        ]
    active = keyring.active[signer]
    return [check_key(dns, key, key in active) for key in keyring.keys[signer]]


def check_key(dns: Dns, key: DkimKey, active: bool = True) -> Check:
    name = f"DKIM {key.dns_name}"
    fix = f'publish TXT {key.dns_name} "{key.dns_record()}"'
    try:
        records = [r for r in dns.txt(key.dns_name) if "p=" in r.replace(" ", "")]
    except DnsError as exc:
        return Check(name, Status.FAIL, f"DNS error: {exc}", "check the domain's name servers")
    if not records:
        return Check(name, Status.FAIL, "no DKIM key published", fix)
    if len(records) > 1:
        return Check(name, Status.FAIL, f"{len(records)} key records; verifiers need one", fix)
    tags = parse_tags(records[0])
    kind = "rsa" if key.algorithm == "rsa-sha256" else "ed25519"
    if tags.get("v", "DKIM1") != "DKIM1" or tags.get("k", "rsa") != kind:
        return Check(
            name, Status.FAIL, f"published k={tags.get('k', 'rsa')}, the key is {kind}", fix
        )
    if not tags.get("p"):
        return Check(name, Status.FAIL, "the published key is revoked (empty p=)", fix)
    if "h" in tags and "sha256" not in tags["h"].split(":"):
        return Check(name, Status.FAIL, f"h={tags['h']} excludes sha256", fix)
    try:
        published = base64.b64decode(tags["p"], validate=True)
    except (binascii.Error, ValueError):
        return Check(name, Status.FAIL, "p= is not valid base64", fix)
    if published != base64.b64decode(key.public_key_b64()):
        return Check(name, Status.FAIL, "the published key differs from the private key", fix)
    state = "signing" if active else "idle"
    if "y" in tags.get("t", "").split(":"):
        return Check(
            name, Status.WARN, f"{kind} key matches ({state}); t=y testing mode", "drop t=y"
        )
    return Check(name, Status.PASS, f"{kind} key matches the private key ({state})")
