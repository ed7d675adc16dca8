from services.runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    group_id: str = "mailrail-router"
    #: `host:port` of the resolver for MX-matched provider groups; default: the system's.
    dns: str | None = None
    #: Retried batches held back until due, per retry tier; past this the tier's partitions pause.
    retry_max_in_flight: int = 2000

    def service_name(self) -> str:
        return "router"
