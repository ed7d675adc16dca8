from services.runtime.settings import ServiceSettings


class BounceSettings(ServiceSettings):
    group_id: str = "mailrail-bounce"
    bounce_smtp_addr: str = "127.0.0.1:2525"

    def service_name(self) -> str:
        return "bounce"
