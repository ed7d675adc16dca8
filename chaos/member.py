"""Run a service with chaos hooks it does not have itself: `python -m chaos.member services.sender`.

- `CHAOS_GROUP_INSTANCE_ID`: static group membership (librdkafka `group.instance.id`), so a
  restarted process takes its partitions back at once instead of after the dead member's
  30 s session timeout. Scenario 4 restarts senders hundreds of times; without it each
  restart would wait 30 to 60 s for the group to notice the death.
- `CHAOS_FAIL_ON_SUBJECT` with `CHAOS_FAIL_MARKER` (a file path): the first record whose
  subject contains the text raises an unexpected exception in the handler (the sender's
  delivery, the router's routing) — once: the marker file remembers it (scenario 5).

Everything else is the service's own entry, run as `__main__`.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from schemas.records import AcceptedMessage, DeliveryBatch
from services.runtime.settings import ServiceSettings


class InjectedFault(RuntimeError):
    """The unexpected exception scenario 5 injects."""


def _static_membership(instance_id: str) -> None:
    original = ServiceSettings.consumer_config

    def consumer_config(self: ServiceSettings, group_id: str) -> dict[str, Any]:
        return original(self, group_id) | {"group.instance.id": f"{instance_id}-{group_id}"}

    ServiceSettings.consumer_config = consumer_config  # type: ignore[method-assign]


def _fail_once(subject: str, marker: Path) -> None:
    def trip(what: str) -> None:
        if marker.exists():
            return
        marker.write_text(what)
        sys.stderr.write(f"CHAOS-CRASH point=handler record={what}\n")
        sys.stderr.flush()
        raise InjectedFault(f"chaos: injected failure on {what!r}")

    from services.router import route as routing
    from services.sender import deliver

    deliver_batch = deliver.Deliverer.deliver

    async def deliver_or_fail(self: deliver.Deliverer, batch: DeliveryBatch) -> Any:
        if batch.content.subject == subject:
            trip(batch.content.subject or "")
        return await deliver_batch(self, batch)

    deliver.Deliverer.deliver = deliver_or_fail  # type: ignore[method-assign]
    route_message = routing.route

    def route_or_fail(message: AcceptedMessage, *args: Any, **kwargs: Any) -> Any:
        if message.content.subject == subject:
            trip(message.content.subject or "")
        return route_message(message, *args, **kwargs)

    routing.route = route_or_fail


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m chaos.member services.<name>")
    module = sys.argv[1]
    if instance_id := os.environ.get("CHAOS_GROUP_INSTANCE_ID"):
        _static_membership(instance_id)
    if subject := os.environ.get("CHAOS_FAIL_ON_SUBJECT"):
        _fail_once(subject, Path(os.environ["CHAOS_FAIL_MARKER"]))
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
