"""`python -m services.doctor` against a loopback DNS server holding the records of each case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.doctor.__main__ import main, parse_args, run
from services.doctor.checks import Check, Status
from services.doctor.lookup import Dns
from services.doctor.spf import SpfEvaluator
from tests.support.dkim_keys import dkim_records, write_key_folder
from tests.support.dns_server import NULL_MX, DnsServerFactory, RunningDnsServer

DOMAIN = "acme.example"
BOUNCE = "bounces.acme.example"
IP4, IP6 = "192.0.2.10", "2001:db8::10"


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_key_folder(tmp_path_factory.mktemp("keys"), {DOMAIN: ["a1.rsa", "e1.ed25519"]})


def healthy(key_folder: Path) -> dict[str, Any]:
    return {
        DOMAIN: {
            "TXT": ["v=spf1 include:_spf.mailrail.test mx -all"],
            "MX": [(10, "mx.acme.example")],
        },
        "mx.acme.example": {"A": ["198.51.100.1"]},
        "_spf.mailrail.test": {"TXT": ["v=spf1 ip4:192.0.2.0/28 ip6:2001:db8::/64 -all"]},
        BOUNCE: {
            "TXT": ["v=spf1 include:_spf.mailrail.test -all"],
            "MX": [(10, "in.mailrail.test")],
        },
        "in.mailrail.test": {"A": ["192.0.2.50"]},
        f"_dmarc.{DOMAIN}": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@acme.example"]},
        IP4: {"PTR": ["mta1.mailrail.test"]},
        IP6: {"PTR": ["mta1.mailrail.test"]},
        "mta1.mailrail.test": {"A": [IP4], "AAAA": [IP6]},
        **dkim_records(key_folder),
    }


def doctor(
    dns: RunningDnsServer, key_folder: Path | None, *extra: str, domain: str = DOMAIN
) -> dict[str, Check]:
    argv = [
        domain,
        "--dns",
        dns.address,
        "--pool-ip",
        IP4,
        "--pool-ip",
        IP6,
        "--bounce-domain",
        BOUNCE,
    ]
    if key_folder is not None:
        argv += ["--dkim-keys", str(key_folder)]
    return {check.name: check for check in run(parse_args([*argv, *extra]))}


def start(factory: DnsServerFactory, key_folder: Path, **changes: Any) -> RunningDnsServer:
    records = healthy(key_folder)
    for name, entry in changes.items():
        name = name.replace("__", ".")
        if entry is None:
            records.pop(name, None)
        else:
            records[name] = entry
    return factory(records)


def test_healthy_domain_passes_every_check(
    dns_server_factory: DnsServerFactory, key_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dns = start(dns_server_factory, key_folder)
    argv = [
        DOMAIN,
        "--dns",
        dns.address,
        "--pool-ip",
        IP4,
        "--pool-ip",
        IP6,
        "--bounce-domain",
        BOUNCE,
        "--dkim-keys",
        str(key_folder),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "WARN" not in out and "fix:" not in out
    checks = doctor(dns, key_folder)
    assert set(checks) == {
        f"SPF {DOMAIN}",
        f"SPF {BOUNCE}",
        f"DKIM a1._domainkey.{DOMAIN}",
        f"DKIM e1._domainkey.{DOMAIN}",
        f"DMARC {DOMAIN}",
        "DMARC alignment",
        f"MX {BOUNCE}",
        f"PTR {IP4}",
        f"PTR {IP6}",
    }
    assert checks[f"SPF {DOMAIN}"].detail == f"pass for {IP4}, {IP6}; 2/10 DNS look-ups"
    assert checks[f"PTR {IP4}"].detail == f"mta1.mailrail.test ↔ {IP4}"


def failing(checks: dict[str, Check], name: str, status: Status = Status.FAIL) -> Check:
    check = checks[name]
    assert check.status is status, check
    assert check.fix, "every failure says how to fix it"
    return check


def test_missing_spf(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    dns = start(
        dns_server_factory, key_folder, **{"acme__example": {"MX": [(10, "mx.acme.example")]}}
    )
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert check.detail == "no SPF record"
    assert check.fix == f'publish TXT {DOMAIN} "v=spf1 ip4:{IP4} ip6:{IP6} -all"'


def test_spf_that_does_not_cover_the_pool(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(
        dns_server_factory,
        key_folder,
        **{"acme__example": {"TXT": ["v=spf1 ip4:203.0.113.0/24 ~all"]}},
    )
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert check.detail == f"does not cover {IP4}: softfail, {IP6}: softfail"
    assert check.fix.startswith(f"add ip4:{IP4} ip6:{IP6}")


def test_spf_over_the_lookup_limit(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    chain = {
        f"s{i}.spf.test": {"TXT": [f"v=spf1 include:s{i + 1}.spf.test -all"]} for i in range(11)
    }
    chain["s11.spf.test"] = {"TXT": [f"v=spf1 ip4:{IP4} ip6:{IP6} -all"]}
    dns = start(
        dns_server_factory,
        key_folder,
        **{"acme__example": {"TXT": ["v=spf1 include:s0.spf.test -all"]}},
    )
    dns.update(chain)  # type: ignore[arg-type]
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert check.detail == "permerror: more than 10 DNS look-ups"
    assert "flatten" in check.fix


def test_spf_over_the_limit_even_when_the_pool_matches_early(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    many = " ".join(f"a:h{i}.spf.test" for i in range(10))
    record = f"v=spf1 ip4:{IP4} ip6:{IP6} {many} include:_spf.mailrail.test -all"
    dns = start(dns_server_factory, key_folder, **{"acme__example": {"TXT": [record]}})
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert check.detail == "permerror for some senders: 11 DNS look-ups (limit 10)"


def test_two_spf_records(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    txt = ["v=spf1 ip4:192.0.2.0/24 -all", "v=spf1 -all"]
    dns = start(dns_server_factory, key_folder, **{"acme__example": {"TXT": txt}})
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert "2 SPF records" in check.detail and "merge" in check.fix


def test_spf_that_passes_everyone_is_a_warning(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder, **{"acme__example": {"TXT": ["v=spf1 +all"]}})
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}", Status.WARN)
    assert "passes any IP" in check.detail


def test_spf_dns_failure(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    dns = start(dns_server_factory, key_folder, **{"_spf__mailrail__test": "SERVFAIL"})
    check = failing(doctor(dns, key_folder), f"SPF {DOMAIN}")
    assert check.detail.startswith("temperror")


@pytest.mark.parametrize(
    ("record", "extra", "result"),
    [
        ("v=spf1 a:host.spf.test/24 -all", {"host.spf.test": {"A": ["192.0.2.99"]}}, "pass"),
        ("v=spf1 a -all", {}, "fail"),
        (
            "v=spf1 mx/28 -all",
            {"spf.test": {"MX": [(5, "m.spf.test")]}, "m.spf.test": {"A": ["192.0.2.1"]}},
            "pass",
        ),
        (
            "v=spf1 exists:%{i}.ok.spf.test -all",
            {f"{IP4}.ok.spf.test": {"A": ["127.0.0.2"]}},
            "pass",
        ),
        ("v=spf1 exists:%{ir}.%{d} -all", {"10.2.0.192.spf.test": {"A": ["127.0.0.2"]}}, "pass"),
        ("v=spf1 redirect=r.spf.test", {"r.spf.test": {"TXT": [f"v=spf1 ip4:{IP4} -all"]}}, "pass"),
        ("v=spf1 redirect=none.spf.test", {}, "permerror"),
        ("v=spf1 include:none.spf.test -all", {}, "permerror"),
        ("v=spf1 ptr:mailrail.test -all", {}, "pass"),
        ("v=spf1 ?all", {}, "neutral"),
        ("v=spf1 ip4:198.51.100.0/24", {}, "neutral"),
        ("v=spf1 a:v1.spf.test a:v2.spf.test a:v3.spf.test -all", {}, "permerror"),
        ("v=spf1 bogus:x -all", {}, "permerror"),
        ("v=spf1 ip4:192.0.2.10 exp=explain.spf.test -all", {}, "pass"),
    ],
)
def test_spf_evaluation(
    record: str,
    extra: dict[str, Any],
    result: str,
    dns_server_factory: DnsServerFactory,
    key_folder: Path,
) -> None:
    records = {**healthy(key_folder), "spf.test": {"TXT": [record]}}
    for name, entry in extra.items():
        records[name] = {**records.get(name, {}), **entry}
    dns = dns_server_factory(records)
    outcome = SpfEvaluator(Dns((dns.host, dns.port))).check(IP4, "spf.test")
    assert outcome.result == result, outcome


def test_dkim_published_key_differs(
    dns_server_factory: DnsServerFactory, key_folder: Path, tmp_path: Path
) -> None:
    other = dkim_records(write_key_folder(tmp_path, {DOMAIN: ["a1.rsa"]}))
    dns = start(
        dns_server_factory,
        key_folder,
        **{f"a1._domainkey.{DOMAIN}".replace(".", "__"): other[f"a1._domainkey.{DOMAIN}"]},
    )
    checks = doctor(dns, key_folder)
    check = failing(checks, f"DKIM a1._domainkey.{DOMAIN}")
    assert check.detail == "the published key differs from the private key"
    assert check.fix.startswith(f'publish TXT a1._domainkey.{DOMAIN} "v=DKIM1; k=rsa; p=MII')
    assert checks[f"DKIM e1._domainkey.{DOMAIN}"].status is Status.PASS


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        (None, "no DKIM key published"),
        ({"TXT": ["v=DKIM1; k=ed25519; p="]}, "the published key is revoked (empty p=)"),
        ({"TXT": ["v=DKIM1; k=rsa; p=AAAA"]}, "published k=rsa, the key is ed25519"),
        ({"TXT": ["v=DKIM1; k=ed25519; p=!!"]}, "p= is not valid base64"),
    ],
)
def test_dkim_record_problems(
    entry: Any, detail: str, dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(
        dns_server_factory, key_folder, **{f"e1._domainkey.{DOMAIN}".replace(".", "__"): entry}
    )
    assert failing(doctor(dns, key_folder), f"DKIM e1._domainkey.{DOMAIN}").detail == detail


def test_no_dkim_keys_fails_dkim_and_alignment(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder, **{"bounces__acme__example": None})
    checks = doctor(dns, None, "--bounce-domain", "bounces.mailrail.test")
    assert "give --dkim-keys" in failing(checks, f"DKIM {DOMAIN}").detail
    alignment = failing(checks, "DMARC alignment")
    assert alignment.detail == "return path bounces.mailrail.test: not aligned; no valid DKIM key"


def test_unaligned_bounce_domain_is_a_warning_when_dkim_aligns(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder)
    checks = doctor(dns, key_folder, "--bounce-domain", "bounces.mailrail.test")
    check = failing(checks, "DMARC alignment", Status.WARN)
    assert "DKIM d=acme.example: aligned" in check.detail and "bounces.acme.example" in check.fix


def test_strict_spf_alignment(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    dmarc = {"TXT": ["v=DMARC1; p=quarantine; aspf=s"]}
    dns = start(dns_server_factory, key_folder, **{"_dmarc__acme__example": dmarc})
    check = failing(doctor(dns, key_folder), "DMARC alignment", Status.WARN)
    assert f"return path {BOUNCE}: not aligned" in check.detail


@pytest.mark.parametrize(
    ("entry", "status", "detail"),
    [
        (None, Status.FAIL, "no DMARC record"),
        (
            {"TXT": ["v=DMARC1; p=none"]},
            Status.WARN,
            "p=none; no rua= (no aggregate reports); monitoring only",
        ),
        ({"TXT": ["v=DMARC1; p=maybe"]}, Status.FAIL, "invalid policy p='maybe'"),
        (
            {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
            Status.FAIL,
            f"2 DMARC records at _dmarc.{DOMAIN}",
        ),
    ],
)
def test_dmarc_cases(
    entry: Any, status: Status, detail: str, dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder, **{"_dmarc__acme__example": entry})
    assert failing(doctor(dns, key_folder), f"DMARC {DOMAIN}", status).detail == detail


def test_dmarc_of_a_subdomain_comes_from_the_organizational_domain(
    dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder)
    dns.set("news.acme.example", {"TXT": ["v=spf1 include:_spf.mailrail.test -all"]})
    checks = doctor(dns, key_folder, domain="news.acme.example")
    dmarc = checks["DMARC news.acme.example"]
    assert dmarc.status is Status.PASS and "(from _dmarc.acme.example)" in dmarc.detail
    assert checks["DMARC alignment"].status is Status.PASS
    assert f"DKIM a1._domainkey.{DOMAIN}" in checks


@pytest.mark.parametrize(
    ("entry", "status", "detail"),
    [
        (
            {"TXT": ["v=spf1 include:_spf.mailrail.test -all"]},
            Status.FAIL,
            "no MX and no address: bounces cannot arrive",
        ),
        (
            {"MX": NULL_MX, "TXT": ["v=spf1 include:_spf.mailrail.test -all"]},
            Status.FAIL,
            "null MX: the bounce domain accepts no mail",
        ),
        (
            {"A": ["192.0.2.50"], "TXT": ["v=spf1 include:_spf.mailrail.test -all"]},
            Status.WARN,
            "no MX; mail goes to its A record (implicit MX)",
        ),
        (
            {"MX": [(10, "gone.mailrail.test")], "TXT": ["v=spf1 include:_spf.mailrail.test -all"]},
            Status.FAIL,
            "10 gone.mailrail.test (no address)",
        ),
    ],
)
def test_bounce_domain_mx(
    entry: Any, status: Status, detail: str, dns_server_factory: DnsServerFactory, key_folder: Path
) -> None:
    dns = start(dns_server_factory, key_folder, **{"bounces__acme__example": entry})
    assert failing(doctor(dns, key_folder), f"MX {BOUNCE}", status).detail == detail


def test_missing_ptr(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    dns = start(dns_server_factory, key_folder)
    dns.set(IP4, None)
    check = failing(doctor(dns, key_folder), f"PTR {IP4}")
    assert check.detail == "no PTR record" and IP4 in check.fix


def test_ptr_not_forward_confirmed(dns_server_factory: DnsServerFactory, key_folder: Path) -> None:
    dns = start(dns_server_factory, key_folder)
    dns.set("mta1.mailrail.test", {"A": ["192.0.2.99"], "AAAA": [IP6]})
    checks = doctor(dns, key_folder)
    check = failing(checks, f"PTR {IP4}")
    assert check.detail == "not forward-confirmed: mta1.mailrail.test → 192.0.2.99"
    assert check.fix.startswith(f"publish A mta1.mailrail.test → {IP4}")
    assert checks[f"PTR {IP6}"].status is Status.PASS


def test_cli_prints_fixes_and_exits_1_on_failure(
    dns_server_factory: DnsServerFactory,
    key_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dns = start(dns_server_factory, key_folder, **{"_dmarc__acme__example": None})
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"bounce_domain: {BOUNCE}\npools:\n  - name: default\n    source_addresses: [{IP4}]\n"
    )
    assert (
        main([DOMAIN, "--dns", dns.address, "--rules", str(rules), "--dkim-keys", str(key_folder)])
        == 1
    )
    out = capsys.readouterr().out
    assert f"FAIL    DMARC {DOMAIN}" in out
    assert f"fix: publish TXT _dmarc.{DOMAIN}" in out
    assert f"PTR {IP4}" in out and f"PTR {IP6}" not in out
    assert out.rstrip().endswith("summary: 8 checks: 7 pass, 0 warn, 1 fail")
