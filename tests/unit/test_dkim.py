"""DKIM signing: every signature verifies with dkimpy against keys published on a loopback
DNS server, for every kind of message the sender composes; key folders fail loudly."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from schemas.api import Attachment, Content
from schemas.records import BatchRecipient, DeliveryBatch, DeliveryEvent, EventType
from schemas.rules import Pool, Rules
from services.runtime.controls import Controls
from services.sender.compose import compose
from services.sender.deliver import Deliverer, DeliveryPolicy
from services.sender.dkim import DkimSigner, Signed
from services.sender.dkim_keys import DkimKeyError, Keyring, load_keyring
from services.sender.smtp import SmtpOptions, SmtpPool
from tests.support.dkim_keys import (
    DnsFunc,
    dkim_dnsfunc,
    dkim_records,
    private_key_pem,
    verify_all,
    write_key_folder,
)
from tests.support.dns_server import RunningDnsServer, start_dns_server
from tests.support.smtp_server import SmtpServerFactory

KEYS = {
    "acme.example": ["a1.rsa", "a2.rsa", "e1.ed25519"],
    "mailrail.test": ["p1.ed25519"],
    "restricted.example": ["r1.rsa"],
}
CONFIG = {
    "platform_domains": ["mailrail.test"],
    "domains": {
        "acme.example": {"active": ["a2", "e1"]},
        "restricted.example": {"tenants": ["other"]},
    },
}


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_key_folder(tmp_path_factory.mktemp("dkim"), KEYS, CONFIG)


@pytest.fixture(scope="module")
def keyring(key_folder: Path) -> Keyring:
    return load_keyring(key_folder)


@pytest.fixture(scope="module")
def dns_server(key_folder: Path) -> Iterator[RunningDnsServer]:
    with start_dns_server(dkim_records(key_folder)) as server:
        yield server


@pytest.fixture(scope="module")
def dnsfunc(dns_server: RunningDnsServer) -> DnsFunc:
    return dkim_dnsfunc(dns_server.address)


@pytest.fixture
def signer(keyring: Keyring) -> DkimSigner:
    return DkimSigner(keyring, frozenset({"strict"}))


def batch(
    content: Content, sender: str = "Shop <shop@acme.example>", rcpt: str = "u@x.example"
) -> DeliveryBatch:
    return DeliveryBatch(
        message_id="m1",
        tenant="acme",
        pool="default",
        throttle_key="x.example",
        domain="x.example",
        from_=sender,
        content=content,
        recipients=[BatchRecipient(email=rcpt, index=0, vars={"name": "Zoë"})],
        accepted_at=datetime.now(UTC),
    )


def raw(message: bytes) -> Content:
    return Content(raw=base64.b64encode(message).decode())


PDF = base64.b64encode(bytes(range(256)) * 40).decode()
LONG_WORDS = " ".join(f"word{i}" for i in range(400))
MESSAGES: dict[str, DeliveryBatch] = {
    "plain": batch(Content(subject="Hello", text="Hi {{name}}\nbye")),
    "non-ascii subject and body": batch(
        Content(
            subject="Grüße, {{name}} — 你好 ✓",
            text="Ünïcödé body\nzweite Zeile €",
            html="<p>Grüße {{name}}</p>",
        )
    ),
    "long lines": batch(
        Content(
            subject="S " + "x" * 900,
            text="a" * 5000 + "\n" + LONG_WORDS,
            html="<p>" + "b" * 3000 + "</p>",
        )
    ),
    "attachments": batch(
        Content(
            subject="Invoice",
            text="See attached",
            attachments=[
                Attachment(filename="invoice.pdf", content_type="application/pdf", content=PDF),
                Attachment(
                    filename="notes ü.txt", content_type="text/plain", content="aGkgdGhlcmUK"
                ),
            ],
        )
    ),
    "unsubscribe headers and reply-to": batch(
        Content(
            subject="News",
            text="news",
            reply_to="Help <help@acme.example>",
            headers={"Feedback-ID": "c1:acme:mailrail"},
        )
    ),
    "smtputf8 recipient": batch(Content(subject="Hi", text="x"), rcpt="zoë@x.example"),
    "raw with bare LF, tabs, trailing spaces and empty lines": batch(
        raw(
            b"From: Shop <shop@acme.example>\nTo: u@x.example\nSubject:  spaced\t\tsubject  \n"
            b"  folded continuation\nDate: Mon, 1 Jan 2026 00:00:00 +0000\n\n"
            b"line  with   spaces \t\n\ttabbed\n" + b"y" * 990 + b"\n\n\n\n"
        )
    ),
    "raw with empty body": batch(raw(b"From: shop@acme.example\r\nSubject: empty\r\n\r\n")),
    "raw multipart": batch(
        raw(
            b"From: =?utf-8?q?Sh=C3=B6p?= <shop@acme.example>\r\nTo: u@x.example\r\nSubject: mp\r\n"
            b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\n"
        )
    ),
}


#: What the pipeline adds itself (List-Unsubscribe may not come from the tenant).
UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://acme.example/u/1>, <mailto:u@acme.example>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def signed_message(signer: DkimSigner, name: str) -> Signed:
    message_batch = MESSAGES[name]
    return signer.sign(compose(message_batch, message_batch.recipients[0], UNSUBSCRIBE), "acme")


@pytest.mark.parametrize("name", list(MESSAGES))
def test_every_signature_verifies(name: str, signer: DkimSigner, dnsfunc: DnsFunc) -> None:
    signed = signed_message(signer, name)
    assert signed.summary == "aligned: acme.example/a2, acme.example/e1, mailrail.test/p1"
    assert verify_all(signed.data, dnsfunc) == [True, True, True]
    first = signed.data.split(b"\r\n\r\n")[0]
    assert all(
        len(line) <= 78
        for line in first.split(b"\r\n")
        if line[:1] in b"\t" or line.startswith(b"DKIM")
    )


def test_rsa_public_key_needs_several_txt_strings(
    keyring: Keyring, dns_server: RunningDnsServer
) -> None:
    import dns.resolver

    [rsa_key] = [k for k in keyring.active["acme.example"] if k.algorithm == "rsa-sha256"]
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [dns_server.host], dns_server.port
    [record] = resolver.resolve(rsa_key.dns_name, "TXT")
    assert len(record.strings) >= 2
    assert b"".join(record.strings).decode() == rsa_key.dns_record()


def test_headers_signed_and_from_oversigned(signer: DkimSigner) -> None:
    signed = signed_message(signer, "unsubscribe headers and reply-to")
    sig = dkim.DKIM(signed.data)
    sig.verify_headerprep(0)
    names = [n.decode() for n in sig.include_headers]
    assert names.count("from") == 2 and names.count("subject") == 2
    for present in (
        "to",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "reply-to",
        "list-unsubscribe",
        "list-unsubscribe-post",
        "feedback-id",
    ):
        assert present in names
    assert "cc" not in names


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.replace(b"\r\n\r\nnews", b"\r\n\r\nnewz"),
        lambda m: b"From: evil@attacker.example\r\n" + m,
        lambda m: b"Subject: changed\r\n" + m,
        lambda m: m.replace(
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x"
        ),
    ],
    ids=["body", "added From", "added Subject", "changed header"],
)
def test_tampering_breaks_every_signature(
    tamper: object, signer: DkimSigner, dnsfunc: DnsFunc
) -> None:
    signed = signed_message(signer, "unsubscribe headers and reply-to")
    changed = tamper(signed.data)  # type: ignore[operator]
    assert changed != signed.data
    assert verify_all(changed, dnsfunc) == [False, False, False]


def test_subdomain_signed_by_parent_key(signer: DkimSigner, dnsfunc: DnsFunc) -> None:
    message = b"From: news@mail.acme.example\r\nSubject: s\r\n\r\nbody\r\n"
    signed = signer.sign(message, "acme")
    assert signed.summary.startswith("aligned: acme.example/a2")
    assert all(verify_all(signed.data, dnsfunc))


def test_domain_without_key_gets_only_the_platform_signature(
    signer: DkimSigner, dnsfunc: DnsFunc
) -> None:
    signed = signer.sign(b"From: a@nokey.example\r\nSubject: s\r\n\r\nbody\r\n", "acme")
    assert signed.summary == "unaligned: mailrail.test/p1 (no key for nokey.example)"
    assert verify_all(signed.data, dnsfunc) == [True]


def test_platform_domain_as_from_is_signed_once(signer: DkimSigner, dnsfunc: DnsFunc) -> None:
    signed = signer.sign(b"From: news@mailrail.test\r\nSubject: s\r\n\r\nbody\r\n", "acme")
    assert signed.summary == "aligned: mailrail.test/p1"
    assert verify_all(signed.data, dnsfunc) == [True]


def test_unsigned_without_any_key(key_folder: Path, tmp_path: Path) -> None:
    folder = write_key_folder(tmp_path, {"acme.example": ["k.ed25519"]})
    message = b"From: a@nokey.example\r\nSubject: s\r\n\r\nbody\r\n"
    signed = DkimSigner(load_keyring(folder), frozenset()).sign(message, "acme")
    assert signed == Signed(message, "unsigned: no key for nokey.example")
    no_from = DkimSigner(load_keyring(folder), frozenset()).sign(b"Subject: s\r\n\r\nb\r\n", "acme")
    assert no_from.summary == "unsigned: no From header"


def test_domain_restricted_to_tenants(signer: DkimSigner) -> None:
    message = b"From: a@restricted.example\r\n\r\nbody\r\n"
    assert signer.sign(message, "other").summary.startswith("aligned: restricted.example/r1")
    assert signer.sign(message, "acme").summary.startswith("unaligned: mailrail.test/p1")


def test_rotation_keeps_idle_selector_loaded_but_not_signing(keyring: Keyring) -> None:
    assert [k.selector for k in keyring.keys["acme.example"]] == ["a1", "a2", "e1"]
    assert [k.selector for k in keyring.active["acme.example"]] == ["a2", "e1"]


def test_refusal_only_for_required_tenants_without_an_aligned_key(signer: DkimSigner) -> None:
    def tenant_batch(tenant: str, sender: str, content: Content | None = None) -> DeliveryBatch:
        return batch(content or Content(subject="s", text="t"), sender).model_copy(
            update={"tenant": tenant}
        )

    assert signer.refusal(tenant_batch("acme", "a@nokey.example")) is None
    assert signer.refusal(tenant_batch("strict", "a@acme.example")) is None
    reply = signer.refusal(tenant_batch("strict", "a@nokey.example"))
    assert reply is not None and reply.code == 451
    assert (
        reply.text
        == "held: tenant strict requires DKIM signing and there is no key for nokey.example"
    )
    raw_from_header = raw(b"From: x@nokey.example\r\nSubject: s\r\n\r\nb\r\n")
    assert signer.refusal(tenant_batch("strict", "a@acme.example", raw_from_header)) is not None


def a_file(folder: Path) -> Path:
    """MAILRAIL_DKIM_KEYS pointing at a file (an empty or missing folder is no keys)."""
    (folder / "keys.pem").write_bytes(private_key_pem("ed25519"))
    return folder / "keys.pem"


def write_pem(folder: Path, name: str, data: bytes) -> Path:
    (folder / "acme.example").mkdir(parents=True, exist_ok=True)
    (folder / "acme.example" / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (a_file, "not a folder"),
        (
            lambda f: write_pem(f, "k1.pem", private_key_pem("ed25519")),
            "name must be <selector>.rsa.pem",
        ),
        (lambda f: write_pem(f, "k1.rsa.pem", b"garbage"), "not a PEM private key"),
        (
            lambda f: write_pem(f, "k1.rsa.pem", private_key_pem("ed25519")),
            "named .rsa.pem but holds a Ed25519 key",
        ),
        (
            lambda f: write_pem(
                f,
                "k1.rsa.pem",
                rsa.generate_private_key(65537, 2048).private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"pw"),
                ),
            ),
            "password-protected",
        ),
    ],
    ids=["a file", "bad name", "garbage", "wrong kind", "encrypted"],
)
def test_bad_key_folder_fails_with_the_file_and_reason(
    setup: object, message: str, tmp_path: Path
) -> None:
    folder = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(DkimKeyError, match=message):
        load_keyring(folder)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("platform_domains: [other.example]\n", "other.example has no key folder"),
        (
            "domains: {acme.example: {active: [zz]}}\n",
            r"active selectors \['zz'\] have no key file",
        ),
        ("domains: {acme.example: {actve: [k]}}\n", "actve"),
        ("domains: [\n", "dkim.yaml"),
    ],
)
def test_bad_config_fails(config: str, message: str, tmp_path: Path) -> None:
    folder = write_key_folder(tmp_path, {"acme.example": ["k.ed25519"]})
    (folder / "dkim.yaml").write_text(config)
    with pytest.raises(DkimKeyError, match=message):
        load_keyring(folder)


def test_secret_mount_entries_and_other_files_are_skipped(tmp_path: Path) -> None:
    folder = write_key_folder(tmp_path, {"acme.example": ["k.ed25519"]})
    (folder / "..data").mkdir()
    (folder / "acme.example" / "k.dns.txt").write_text("v=DKIM1; ...")
    (folder / "acme.example" / ".hidden.pem").write_text("x")
    assert [k.selector for k in load_keyring(folder).active["acme.example"]] == ["k"]


def test_signing_cost_per_message(keyring: Keyring) -> None:
    """Fails only if signing got an order of magnitude slower (e.g. pure-Python RSA)."""
    body = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n" * 68
    costs: dict[str, float] = {}
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        [key] = [k for k in keyring.active["acme.example"] if k.algorithm == algorithm]
        one = Keyring({}, {"acme.example": [key]}, {}, [])
        signer = DkimSigner(one, frozenset())
        message = b"From: a@acme.example\r\nTo: b@x.example\r\nSubject: s\r\n\r\n" + body
        assert 5000 <= len(message) <= 5500
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20):
                signer.sign(message, "acme")
            best = min(best, (time.perf_counter() - started) / 20)
        costs[algorithm] = best * 1e6
    print(f"DKIM signing, 5 KB message: {costs}")
    assert costs["rsa-sha256"] < 5000 and costs["ed25519-sha256"] < 1000


async def test_deliverer_sends_signed_and_holds_required_tenant_without_key(
    keyring: Keyring, dnsfunc: DnsFunc, smtp_server_factory: SmtpServerFactory
) -> None:
    sink = smtp_server_factory()
    smtp = SmtpPool(SmtpOptions(ehlo="sender.mailrail.test"))
    policy = DeliveryPolicy(
        bounce_domain="bounces.mailrail.test",
        verp_key=b"test-verp-key-0123456789",
        retry_schedule_s=[60.0],
        max_age=timedelta(days=1),
        smart_host=(sink.host, sink.port),
    )
    signer = DkimSigner(keyring, frozenset({"strict"}))
    deliverer = Deliverer(
        Pool(name="default"), Rules(), policy, smtp, None, Controls(), signer=signer
    )
    try:
        sent = await deliverer.deliver(MESSAGES["attachments"])
        held = await deliverer.deliver(
            batch(Content(subject="s", text="t"), "a@nokey.example", "held@x.example").model_copy(
                update={"tenant": "strict"}
            )
        )
    finally:
        await smtp.close()
    [arrived] = sink.messages_for("u@x.example")
    assert verify_all(arrived.data, dnsfunc) == [True, True, True]
    [delivered] = [
        DeliveryEvent.model_validate_json(o.value or b"") for o in sent if o.topic == "mail.events"
    ]
    assert delivered.type is EventType.DELIVERED
    assert delivered.dkim == "aligned: acme.example/a2, acme.example/e1, mailrail.test/p1"
    assert not sink.messages_for("held@x.example")
    [deferred] = [
        DeliveryEvent.model_validate_json(o.value or b"") for o in held if o.topic == "mail.events"
    ]
    assert deferred.type is EventType.DEFERRED and deferred.smtp is not None
    assert deferred.smtp.text.startswith("held: tenant strict requires DKIM signing")
    assert deferred.dkim is not None and deferred.dkim.startswith("unsigned: held")
    assert any(o.topic.startswith("mail.retry.") for o in held)


# --- the flat layout (a Kubernetes Secret's keys), mixed layouts, no keys ------------------


def write_flat(folder: Path, names: dict[str, str]) -> Path:
    """`names` maps a flat file name to its key kind (rsa or ed25519)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, kind in names.items():
        (folder / name).write_bytes(private_key_pem(kind))
    return folder


def as_secret_volume(folder: Path) -> Path:
    """The folder as the kubelet mounts a Secret: `..<timestamp>/` with the files, `..data`
    linking to it, and one top-level symlink per key through `..data`."""
    stamp = folder / "..2026_05_01_00_00_00.000000001"
    stamp.mkdir()
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith("."):
            entry.rename(stamp / entry.name)
    (folder / "..data").symlink_to(stamp.name)
    for entry in sorted(stamp.iterdir()):
        (folder / entry.name).symlink_to(Path("..data") / entry.name)
    return folder


def test_flat_layout_loads_and_signs(tmp_path: Path) -> None:
    folder = write_flat(
        tmp_path / "keys",
        {
            "s2026a._domainkey.acme.example.rsa.pem": "rsa",
            "s2026e._domainkey.acme.example.ed25519.pem": "ed25519",
            # A domain with more dots, a selector with one: split at the first "._domainkey.".
            "mr.1._domainkey.mail.platform.example.ed25519.pem": "ed25519",
        },
    )
    (folder / "dkim.yaml").write_text("platform_domains: [mail.platform.example]\n")
    keyring = load_keyring(as_secret_volume(folder))
    assert [k.dns_name for k in keyring.keys["acme.example"]] == [
        "s2026a._domainkey.acme.example",
        "s2026e._domainkey.acme.example",
    ]
    assert [k.dns_name for k in keyring.platform] == ["mr.1._domainkey.mail.platform.example"]
    with start_dns_server(dkim_records(folder)) as dns_server:
        message = b"From: Shop <shop@acme.example>\r\nSubject: s\r\n\r\nbody\r\n"
        signed = DkimSigner(keyring, frozenset()).sign(message, "acme")
        assert signed.summary == (
            "aligned: acme.example/s2026a, acme.example/s2026e, mail.platform.example/mr.1"
        )
        assert verify_all(signed.data, dkim_dnsfunc(dns_server.address)) == [True, True, True]


def test_mixed_layouts_make_one_keyring(tmp_path: Path) -> None:
    folder = write_key_folder(tmp_path, {"acme.example": ["a1.rsa"], "other.example": ["o1.rsa"]})
    write_flat(
        folder,
        {
            "a2._domainkey.acme.example.ed25519.pem": "ed25519",
            "n1._domainkey.new.example.ed25519.pem": "ed25519",
        },
    )
    (folder / "dkim.yaml").write_text("domains: {acme.example: {active: [a2]}}\n")
    keyring = load_keyring(folder)
    assert {d: [k.selector for k in keys] for d, keys in keyring.keys.items()} == {
        "acme.example": ["a1", "a2"],
        "new.example": ["n1"],
        "other.example": ["o1"],
    }
    assert [k.selector for k in keyring.active["acme.example"]] == ["a2"]

    # The same key in both layouts is a mistake, not a choice.
    write_flat(folder, {"a1._domainkey.acme.example.rsa.pem": "rsa"})
    with pytest.raises(DkimKeyError, match="the same key as") as raised:
        load_keyring(folder)
    assert str(folder / "acme.example" / "a1.rsa.pem") in str(raised.value)
    assert str(folder / "a1._domainkey.acme.example.rsa.pem") in str(raised.value)


@pytest.mark.parametrize(
    "name",
    [
        "acme.example.s2026a.rsa.pem",  # the domain first, no _domainkey
        "s2026a._domainkey.acme.example.pem",  # no algorithm
        "s2026a._domainkey.acme.example.dsa.pem",  # not rsa or ed25519
        "s2026a._domainkey.localhost.rsa.pem",  # not a domain name
        "-bad-._domainkey.acme.example.rsa.pem",  # not a selector
        "tls.pem",  # something else entirely
    ],
)
def test_flat_name_it_cannot_read_is_refused_with_its_path(name: str, tmp_path: Path) -> None:
    folder = write_key_folder(tmp_path, {"acme.example": ["k.ed25519"]})
    (folder / name).write_bytes(private_key_pem("rsa"))
    with pytest.raises(DkimKeyError) as raised:
        load_keyring(folder)
    assert str(raised.value).startswith(f"{folder / name}: name must be <selector>._domainkey.")


@pytest.mark.parametrize("where", ["empty", "missing", "empty Secret volume"])
def test_empty_or_missing_folder_is_no_keys(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "keys"
    if where != "missing":
        folder.mkdir()
    if where == "empty Secret volume":
        as_secret_volume(folder)
    with caplog.at_level("WARNING", logger="services.sender.dkim_keys"):
        keyring = load_keyring(folder)
    assert keyring.keys == {} and keyring.active == {} and keyring.platform == []
    assert [r.getMessage() for r in caplog.records] == ["no DKIM keys: mail is sent unsigned"]

    signer = DkimSigner(keyring, frozenset({"strict"}))
    message = b"From: a@acme.example\r\nSubject: s\r\n\r\nbody\r\n"
    assert signer.sign(message, "acme") == Signed(message, "unsigned: no key for acme.example")
    content = Content(subject="s", text="t")
    assert signer.refusal(batch(content, "a@acme.example")) is None
    held = signer.refusal(batch(content, "a@acme.example").model_copy(update={"tenant": "strict"}))
    assert held is not None and held.code == 451
    assert held.text == (
        "held: tenant strict requires DKIM signing and there is no key for acme.example"
    )


def test_config_naming_a_domain_without_keys_still_fails(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "dkim.yaml").write_text("platform_domains: [mailrail.example]\n")
    with pytest.raises(DkimKeyError, match=r"mailrail\.example has no key folder"):
        load_keyring(folder)
