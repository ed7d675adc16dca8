"""The domain checks: each returns rows of the report, with the fix for each failure."""

import ipaddress
from dataclasses import dataclass
from enum import StrEnum

from services.doctor.lookup import Dns, DnsError
from services.doctor.spf import LOOKUP_LIMIT, SpfEvaluator


class Status(StrEnum):
    PASS = "PASS"  # noqa: S105 (a result, not a password)
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def org_domain(domain: str) -> str:
    """The organizational domain, approximated as the last two labels (no public suffix list)."""
    return ".".join(domain.lower().rstrip(".").split(".")[-2:])


def aligned(domain: str, other: str, strict: bool) -> bool:
    """DMARC identifier alignment: equal (strict) or the same organizational domain (relaxed)."""
    if strict:
        return domain.lower() == other.lower()
    return org_domain(domain) == org_domain(other)


def check_spf(dns: Dns, domain: str, ips: list[str]) -> Check:
    """The domain's one SPF record parses, stays within 10 look-ups and passes every pool IP."""
    name = f"SPF {domain}"
    spf = SpfEvaluator(dns)
    suggestion = " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips)
    try:
        records = spf.records(domain)
    except DnsError as exc:
        return Check(name, Status.FAIL, f"DNS error: {exc}", "check the domain's name servers")
    if not records:
        return Check(
            name,
            Status.FAIL,
            "no SPF record",
            f'publish TXT {domain} "v=spf1 {suggestion or "ip4:<pool IP>"} -all"',
        )
    if not ips:
        outcome = spf.check("192.0.2.0", domain)  # TEST-NET: parses and counts look-ups only
        if outcome.result in ("permerror", "temperror"):
            return Check(
                name, Status.FAIL, f"{outcome.result}: {outcome.detail}", _spf_fix(outcome.detail)
            )
        return Check(name, Status.WARN, "parses; no pool IPs given to check it covers them")
    outcomes = {ip: spf.check(ip, domain) for ip in ips}
    errors = [o for o in outcomes.values() if o.result in ("permerror", "temperror")]
    if errors:
        return Check(
            name, Status.FAIL, f"{errors[0].result}: {errors[0].detail}", _spf_fix(errors[0].detail)
        )
    missing = [ip for ip, o in outcomes.items() if o.result != "pass"]
    if missing:
        results = ", ".join(f"{ip}: {outcomes[ip].result}" for ip in missing)
        add = " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in missing)
        return Check(
            name,
            Status.FAIL,
            f"does not cover {results}",
            f"add {add} before the all term of {domain}'s SPF record",
        )
    lookups = spf.lookup_count(domain)
    if lookups > LOOKUP_LIMIT:
        detail = f"permerror for some senders: {lookups} DNS look-ups (limit {LOOKUP_LIMIT})"
        return Check(name, Status.FAIL, detail, _spf_fix("look-ups"))
    too_wide = [ip for ip, o in outcomes.items() if o.detail.endswith(("+all", " all"))]
    detail = f"pass for {', '.join(ips)}; {lookups}/{LOOKUP_LIMIT} DNS look-ups"
    if too_wide:
        return Check(
            name, Status.WARN, detail + "; passes any IP (+all)", "end the record with -all or ~all"
        )
    return Check(name, Status.PASS, detail)


def _spf_fix(detail: str) -> str:
    if "look-ups" in detail:
        return (
            "flatten includes (replace them with the ip4/ip6 ranges they publish) to stay within 10"
        )
    if "SPF records" in detail:
        return "merge the SPF records into one TXT record"
    return "correct the SPF record (RFC 7208 syntax)"


def parse_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags[key.strip().lower()] = "".join(value.split())
    return tags


def check_dmarc(dns: Dns, domain: str) -> tuple[Check, dict[str, str]]:
    """The DMARC record (the domain's, else its organizational domain's) and its policy."""
    name = f"DMARC {domain}"
    fix = f'publish TXT _dmarc.{domain} "v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}"'
    candidates = [domain] + ([org_domain(domain)] if org_domain(domain) != domain else [])
    try:
        for where in candidates:
            records = [
                r for r in dns.txt(f"_dmarc.{where}") if r.replace(" ", "").startswith("v=DMARC1")
            ]
            if records:
                break
    except DnsError as exc:
        return Check(name, Status.FAIL, f"DNS error: {exc}", "check the domain's name servers"), {}
    if not records:
        return Check(name, Status.FAIL, "no DMARC record", fix), {}
    if len(records) > 1:
        return Check(
            name, Status.FAIL, f"{len(records)} DMARC records at _dmarc.{where}", "keep one"
        ), {}
    tags = parse_tags(records[0])
    policy = tags.get("p", "").lower()
    inherited = f" (from _dmarc.{where})" if where != domain else ""
    if policy not in ("none", "quarantine", "reject"):
        return Check(name, Status.FAIL, f"invalid policy p={policy!r}{inherited}", fix), tags
    reports = "reports to " + tags["rua"] if "rua" in tags else "no rua= (no aggregate reports)"
    detail = f"p={policy}{inherited}; {reports}"
    if policy == "none":
        return Check(
            name,
            Status.WARN,
            detail + "; monitoring only",
            "once reports show aligned mail, move to p=quarantine, then p=reject",
        ), tags
    return Check(name, Status.PASS, detail), tags


def check_alignment(
    domain: str, tags: dict[str, str], bounce_domain: str | None, dkim_domain: str | None
) -> Check:
    """DMARC passes when SPF (return-path domain) or DKIM (d=) is aligned with the From domain."""
    name = "DMARC alignment"
    spf_ok = bounce_domain is not None and aligned(domain, bounce_domain, tags.get("aspf") == "s")
    dkim_ok = dkim_domain is not None and aligned(domain, dkim_domain, tags.get("adkim") == "s")
    spf_text = (
        f"return path {bounce_domain}: {'aligned' if spf_ok else 'not aligned'}"
        if bounce_domain
        else "no bounce domain given"
    )
    dkim_text = (
        f"DKIM d={dkim_domain}: {'aligned' if dkim_ok else 'not aligned'}"
        if dkim_domain
        else "no valid DKIM key"
    )
    detail = f"{spf_text}; {dkim_text}"
    bounce_fix = f"use a bounce domain under {org_domain(domain)} (e.g. bounces.{domain}, MX to the bounce server)"
    if spf_ok and dkim_ok:
        return Check(name, Status.PASS, detail)
    if dkim_ok:
        return Check(name, Status.WARN, detail + "; DMARC rests on DKIM alone", bounce_fix)
    return Check(name, Status.FAIL, detail, f"fix the DKIM rows, or {bounce_fix}")


def check_bounce_mx(dns: Dns, bounce_domain: str) -> Check:
    """Bounces (DSNs) reach us: the return-path domain has an MX whose hosts resolve."""
    name = f"MX {bounce_domain}"
    fix = f"publish MX {bounce_domain} → the host that runs the bounce service (MAILRAIL_BOUNCE_SMTP_ADDR)"
    try:
        records = dns.mx(bounce_domain)
        if records == [(0, "")] or records == [(0, ".")]:
            return Check(name, Status.FAIL, "null MX: the bounce domain accepts no mail", fix)
        if not records:
            if dns.addresses(bounce_domain):
                return Check(
                    name, Status.WARN, "no MX; mail goes to its A record (implicit MX)", fix
                )
            return Check(name, Status.FAIL, "no MX and no address: bounces cannot arrive", fix)
        hosts = [(pref, host, dns.addresses(host)) for pref, host in records]
    except DnsError as exc:
        return Check(name, Status.FAIL, f"DNS error: {exc}", "check the domain's name servers")
    unresolved = [host for _, host, addresses in hosts if not addresses]
    detail = ", ".join(
        f"{pref} {host} ({' '.join(addrs) or 'no address'})" for pref, host, addrs in hosts
    )
    if len(unresolved) == len(hosts):
        return Check(name, Status.FAIL, detail, f"publish A records for {', '.join(unresolved)}")
    if unresolved:
        return Check(name, Status.WARN, detail, f"publish A records for {', '.join(unresolved)}")
    return Check(name, Status.PASS, detail)


def check_ptr(dns: Dns, ip: str) -> Check:
    """Forward-confirmed reverse DNS: the IP's PTR name resolves back to the IP."""
    name = f"PTR {ip}"
    try:
        names = dns.ptr(ip)
        if not names:
            return Check(
                name,
                Status.FAIL,
                "no PTR record",
                f"ask the owner of {ip} to set its PTR to a host name (e.g. mta1.<domain>) with A → {ip}",
            )
        forward = {n: dns.addresses(n, ipaddress.ip_address(ip).version) for n in names}
    except DnsError as exc:
        return Check(
            name, Status.FAIL, f"DNS error: {exc}", "check the reverse zone's name servers"
        )
    confirmed = [n for n, addresses in forward.items() if ip in addresses]
    if confirmed:
        return Check(name, Status.PASS, f"{confirmed[0]} ↔ {ip}")
    seen = "; ".join(f"{n} → {' '.join(a) or 'no address'}" for n, a in forward.items())
    return Check(
        name,
        Status.FAIL,
        f"not forward-confirmed: {seen}",
        f"publish A {names[0]} → {ip} (or point the PTR at a name that resolves to {ip})",
    )
