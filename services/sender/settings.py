from pydantic import Field, SecretStr

from services.runtime.settings import ServiceSettings


class SenderSettings(ServiceSettings):
    pool: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    smart_host: str | None = None
    dns: str | None = None
    #: The port MX hosts are reached on (25; tests point it at a loopback server).
    smtp_port: int = 25
    smtp_timeout_s: float = 300.0
    #: Delays after the 1st, 2nd, … deferral; the last repeats until `max_age_s`.
    retry_schedule_s: list[float] = [60, 300, 900, 1800, 3600, 7200, 14400]
    max_age_s: float = 3 * 24 * 3600
    verp_key: SecretStr = SecretStr("mailrail-local-verp-key")
    #: Records (batches) being delivered at once; past this the partitions pause.
    max_in_flight: int = 200

    def service_name(self) -> str:
        return f"sender-{self.pool}"
