import socket
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from schemas.catalogue import TOPIC_PREFIX
from services.runtime.settings import ServiceSettings, split_host_port


class IngestSettings(ServiceSettings):
    http_addr: str = "127.0.0.1:8080"
    #: `tenant:key,tenant:key` for local runs; production uses `api_keys_file` (hashed keys).
    api_keys: SecretStr | None = None
    #: Lines of `tenant:<sha256 hex>` or `tenant:hmac-sha256:<hex>` (see services/ingest/auth.py).
    api_keys_file: Path | None = None
    #: The HMAC key of `hmac-sha256` lines: kept in another Secret than the keys file.
    api_key_pepper: SecretStr | None = None
    max_message_bytes: int = 10 * 1024 * 1024
    #: How long a request's records may wait to join a transaction before it answers 503.
    produce_timeout_s: float = 5.0
    #: How long one transaction may take to commit before Kafka aborts it.
    transaction_timeout_s: float = 10.0
    #: Stable per replica, unique in the cluster (unset: `ingest-<host>-<HTTP port>`), so a
    #: restarted replica aborts what its predecessor left open instead of waiting it out.
    transactional_id: str | None = None
    retry_after_s: int = 5
    group_id: str = "mailrail-ingest"
    #: Whether this replica also consumes `mail.submit` (HTTP-only replicas say false).
    submit_consumer: bool = True
    #: Per-tenant ingest rate, in recipients per second, enforced by each replica separately.
    rate_recipients_per_s: float = 10_000.0
    rate_burst_recipients: int = 20_000
    #: Per-tenant overrides: `acme:500,globex:2000` (recipients per second).
    tenant_rates: str = ""
    #: A pending idempotency claim older than this is presumed dead and may be taken over.
    idempotency_lease_s: float = 30.0
    #: Most keys remembered at once (oldest forgotten first, before their 24 h are up).
    idempotency_max_keys: int = 1_000_000
    #: The status view keeps events of messages accepted within this window ...
    status_window_s: float = 3 * 86400.0
    #: ... and at most this many events (oldest messages dropped first), on disk.
    status_max_events: int = 10_000_000
    #: Where the status view's file is kept across restarts (unset: a temporary folder,
    #: rebuilt from mail.events at every start). In Kubernetes: an emptyDir volume.
    state_dir: Path | None = None
    #: Webhook endpoints per tenant (YAML or JSON file, or the same JSON inline).
    webhooks_file: Path | None = None
    webhooks: SecretStr | None = None
    webhook_group_id: str = "mailrail-webhooks"
    #: Where a webhook consumer group that has no committed offset starts.
    webhook_start: Literal["earliest", "latest"] = "latest"
    webhook_max_attempts: int = 6
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 5.0
    webhook_max_in_flight: int = 1000

    def service_name(self) -> str:
        return "ingest"

    def producer_transactional_id(self) -> str:
        """`MAILRAIL_TRANSACTIONAL_ID`, else one per host and HTTP port: the same for a
        replica's restarts (a pod keeps its name), never two live replicas at once."""
        if self.transactional_id:
            return self.transactional_id
        _, port = split_host_port(self.http_addr, 8080)
        return f"{TOPIC_PREFIX}ingest-{socket.gethostname()}-{port}"
