from pathlib import Path

from pydantic import Field, SecretStr

from services.runtime.settings import ServiceSettings


class SenderSettings(ServiceSettings):
    pool: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    smart_host: str | None = None
    dns: str | None = None
    #: The port MX hosts are reached on (25; tests point it at a loopback server).
    smtp_port: int = 25
    smtp_timeout_s: float = 300.0
    #: An idle pooled SMTP session older than this is closed, not reused.
    smtp_idle_timeout_s: float = Field(default=30.0, gt=0)
    #: Delays after the 1st, 2nd, … deferral; the last repeats until `max_age_s`.
    retry_schedule_s: list[float] = [60, 300, 900, 1800, 3600, 7200, 14400]
    max_age_s: float = 3 * 24 * 3600
    verp_key: SecretStr = SecretStr("mailrail-local-verp-key")
    #: Records (batches) being delivered at once; at this the loop takes no more.
    max_in_flight: int = 200
    #: librdkafka counts its prefetch in compressed (lz4) bytes and holds it decompressed:
    #: 8 MiB of mail bodies was ~70 MiB resident. 1 MiB still holds several times the
    #: in-flight limit of one-recipient batches; the rest would be only resident memory.
    consumer_queue_kbytes: int = 1024
    consumer_fetch_kbytes: int = 1024
    #: A batch whose first rate slot is further away than this waits in a delay topic.
    max_quota_wait_s: float = 2.0
    #: Batches one destination may have in progress before more are held for `busy_hold_s`.
    max_batches_per_destination: int = 50
    busy_hold_s: float = 5.0
    #: How often mail held for a paused destination is checked again (resume takes effect).
    pause_recheck_s: float = 30.0
    #: DKIM key folder (`<domain>/<selector>.rsa.pem` or flat `<selector>._domainkey.<domain>.rsa.pem`,
    #: see `dkim_keys`); unset or empty: no signing.
    dkim_keys: Path | None = None
    #: Tenants whose mail is held (deferred) rather than sent without an aligned signature.
    dkim_required_tenants: list[str] = []
    #: DNSBL zones the pool's source addresses are looked up in; empty: no blocklist watch.
    dnsbl_zones: list[str] = []
    dnsbl_interval_s: float = Field(default=300.0, gt=0)
    #: Pause the pool (on `mail.control`) while one of its addresses is listed.
    dnsbl_pause: bool = False
    #: Zone → the destinations (throttle keys) that consult it; other zones pause every one.
    dnsbl_destinations: dict[str, list[str]] = {}
    #: Lifetime of a pause record; renewed while the listing lasts, so a stale one runs out.
    dnsbl_pause_s: float = Field(default=3600.0, gt=0)

    #: How often the sender refreshes its per-destination gauges and writes `mail.stats`.
    stats_interval_s: float = Field(default=5.0, gt=0)

    def service_name(self) -> str:
        return f"sender-{self.pool}"
