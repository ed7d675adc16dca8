from pathlib import Path

from pydantic import SecretStr

from services.runtime.settings import ServiceSettings


class IngestSettings(ServiceSettings):
    http_addr: str = "127.0.0.1:8080"
    #: `tenant:key,tenant:key` for local runs; production uses `api_keys_file` (hashed keys).
    api_keys: SecretStr | None = None
    api_keys_file: Path | None = None
    max_message_bytes: int = 10 * 1024 * 1024
    #: How long a request waits for Kafka's acknowledgement before answering 503.
    produce_timeout_s: float = 5.0
    retry_after_s: int = 5
    group_id: str = "mailrail-ingest"

    def service_name(self) -> str:
        return "ingest"
