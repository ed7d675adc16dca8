"""The Kafka security settings (MAILRAIL_KAFKA_SECURITY_PROTOCOL, MAILRAIL_KAFKA_SASL_*,
MAILRAIL_KAFKA_SSL_CA_LOCATION) reach librdkafka: in the config every client of every service
is built from, under librdkafka's names, and librdkafka accepts them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from services.bounce.settings import BounceSettings
from services.ingest.settings import IngestSettings
from services.router.settings import RouterSettings
from services.runtime.settings import ServiceSettings
from services.sender.settings import SenderSettings

#: Nothing listens there: the clients are built, never connected.
NOWHERE = "127.0.0.1:9"
PASSWORD = "s3cret-kafka-password"


def write_ca(path: Path) -> Path:
    """A self-signed CA certificate: librdkafka loads ssl.ca.location when a client is made."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailrail test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def all_settings() -> list[ServiceSettings]:
    """One settings object of every service, read from the environment as each one starts."""
    return [
        IngestSettings(),
        RouterSettings(),
        SenderSettings(pool="default"),
        BounceSettings(),
    ]


CASES = {
    "SASL_SSL with SCRAM and a private CA": (
        {
            "SECURITY_PROTOCOL": "SASL_SSL",
            "SASL_MECHANISM": "SCRAM-SHA-512",
            "SASL_USERNAME": "mailrail",
            "SASL_PASSWORD": PASSWORD,
            "SSL_CA_LOCATION": "<ca>",
        },
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "mailrail",
            "sasl.password": PASSWORD,
            "ssl.ca.location": "<ca>",
        },
    ),
    "TLS only": (
        {"SECURITY_PROTOCOL": "SSL", "SSL_CA_LOCATION": "<ca>"},
        {"security.protocol": "SSL", "ssl.ca.location": "<ca>"},
    ),
    "SASL PLAIN without TLS": (
        {
            "SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "SASL_MECHANISM": "PLAIN",
            "SASL_USERNAME": "mailrail",
            "SASL_PASSWORD": PASSWORD,
        },
        {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "mailrail",
            "sasl.password": PASSWORD,
        },
    ),
    "PLAINTEXT (the default)": ({}, {"security.protocol": "PLAINTEXT"}),
}
SECURITY_KEYS = {
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
}


@pytest.mark.parametrize("case", CASES)
def test_kafka_security_settings_reach_every_client_config(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variables, expected = CASES[case]
    ca = str(write_ca(tmp_path / "ca.crt"))
    monkeypatch.setenv("MAILRAIL_KAFKA_BOOTSTRAP", NOWHERE)
    for name, value in variables.items():
        monkeypatch.setenv(f"MAILRAIL_KAFKA_{name}", ca if value == "<ca>" else value)
    expected = {k: ca if v == "<ca>" else v for k, v in expected.items()}

    for settings in all_settings():
        for config in (
            settings.kafka_common(),
            settings.producer_config(),
            settings.consumer_config("mailrail-test"),
        ):
            assert {k: v for k, v in config.items() if k in SECURITY_KEYS} == expected
            assert config["bootstrap.servers"] == NOWHERE
        assert PASSWORD not in repr(settings)


@pytest.mark.parametrize("case", [c for c in CASES if "SSL" in CASES[c][1]["security.protocol"]])
def test_librdkafka_accepts_the_security_settings(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown property, a bad value or an unreadable CA fails right here, when the client
    is made (librdkafka loads the CA at creation); nothing connects."""
    variables, _ = CASES[case]
    ca = str(write_ca(tmp_path / "ca.crt"))
    monkeypatch.setenv("MAILRAIL_KAFKA_BOOTSTRAP", NOWHERE)
    for name, value in variables.items():
        monkeypatch.setenv(f"MAILRAIL_KAFKA_{name}", ca if value == "<ca>" else value)
    settings = SenderSettings(pool="default")

    Producer(settings.producer_config()).flush(0)
    Consumer(settings.consumer_config("mailrail-test")).close()
    AdminClient(settings.kafka_common())

    monkeypatch.setenv("MAILRAIL_KAFKA_SSL_CA_LOCATION", str(tmp_path / "missing.crt"))
    with pytest.raises(KafkaException, match=r"ssl\.ca\.location failed"):
        Producer(SenderSettings(pool="default").producer_config())


def test_an_unknown_security_protocol_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILRAIL_KAFKA_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValidationError, match="kafka_security_protocol"):
        ServiceSettings()
