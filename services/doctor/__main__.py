"""`python -m services.doctor DOMAIN [--dns host:port] [--pool-ip IP ...] [--bounce-domain D]
[--dkim-keys DIR] [--rules FILE]` (or `make doctor DOMAIN=...`).

Checks the domain's SPF (covers the pool IPs, within 10 look-ups), DKIM (the key published
for each selector is our private key's), DMARC (present, policy, alignment with the bounce
domain), the bounce domain's MX and each pool IP's forward-confirmed reverse DNS. Prints a
table with the fix for each failure; exits 1 if any check failed, else 0. Options default to
MAILRAIL_DNS, MAILRAIL_DKIM_KEYS and MAILRAIL_RULES (pool IPs and bounce domain from there).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from schemas.rules import load_rules
from services.doctor.checks import (
    Check,
    Status,
    check_alignment,
    check_bounce_mx,
    check_dmarc,
    check_ptr,
    check_spf,
)
from services.doctor.dkim_record import check_dkim, signing_domain
from services.doctor.lookup import Dns
from services.doctor.report import render
from services.runtime.settings import split_host_port
from services.sender.dkim_keys import DkimKeyError, Keyring, load_keyring


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.doctor", description=__doc__)
    parser.add_argument("domain", help="the sending (From) domain")
    parser.add_argument("--dns", default=os.environ.get("MAILRAIL_DNS"), help="host:port")
    parser.add_argument("--pool-ip", action="append", default=[], help="a pool source IP")
    parser.add_argument("--bounce-domain", help="the return-path domain (default: rules file)")
    parser.add_argument("--dkim-keys", default=os.environ.get("MAILRAIL_DKIM_KEYS"))
    parser.add_argument("--rules", default=os.environ.get("MAILRAIL_RULES"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[Check]:
    domain = args.domain.lower().rstrip(".")
    dns = Dns(split_host_port(args.dns, 53) if args.dns else None)
    ips: list[str] = list(args.pool_ip)
    bounce_domain: str | None = args.bounce_domain
    if args.rules:
        rules = load_rules(Path(args.rules))
        ips = ips or [ip for pool in rules.pools for ip in pool.source_addresses]
        bounce_domain = bounce_domain or rules.bounce_domain
    checks = [check_spf(dns, domain, ips)]
    if bounce_domain and bounce_domain != domain:
        checks.append(check_spf(dns, bounce_domain, ips))
    keyring: Keyring | None = None
    if args.dkim_keys:
        try:
            keyring = load_keyring(Path(args.dkim_keys))
        except DkimKeyError as exc:
            checks.append(Check("DKIM keys", Status.FAIL, str(exc), "fix the key folder"))
    dkim_checks = check_dkim(dns, domain, keyring, args.dkim_keys or "")
    checks += dkim_checks
    dkim_ok = all(c.status is not Status.FAIL for c in dkim_checks)
    dmarc, tags = check_dmarc(dns, domain)
    checks.append(dmarc)
    dkim_domain = signing_domain(keyring, domain) if keyring and dkim_ok else None
    checks.append(check_alignment(domain, tags, bounce_domain, dkim_domain))
    if bounce_domain:
        checks.append(check_bounce_mx(dns, bounce_domain))
    else:
        checks.append(
            Check(
                "MX bounce domain",
                Status.WARN,
                "no bounce domain given",
                "pass --bounce-domain or --rules",
            )
        )
    checks += [check_ptr(dns, ip) for ip in ips]
    if not ips:
        checks.append(
            Check("PTR pool IPs", Status.WARN, "no pool IPs given", "pass --pool-ip or --rules")
        )
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    checks = run(args)
    sys.stdout.write(render(args.domain, checks))
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
