"""A local view of the compacted `mail.suppression` topic, read from the beginning.

Every process that must not mail a suppressed address (ingest, router) keeps one. The view
is ready once it has read up to the end offsets it saw at start; it then follows new records.
Entries are kept as compact bytes (see `suppression_store.py`): at a million addresses the
view holds a tenth of what a dict of models would.
"""

import logging
import threading
from typing import Any

from pydantic import ValidationError

from schemas.catalogue import SUPPRESSION
from schemas.records import Suppression
from services.runtime.follow import Follower, by_key
from services.runtime.suppression_store import SuppressionStore

log = logging.getLogger(__name__)


class SuppressionView:
    def __init__(self, kafka_config: dict[str, Any], topic: str = SUPPRESSION) -> None:
        self._store = SuppressionStore()
        self._lock = threading.Lock()
        self._follower = Follower(kafka_config, topic, by_key(self._ingest))

    def start(self) -> None:
        self._follower.start()

    def stop(self) -> None:
        self._follower.stop()

    @property
    def ready(self) -> bool:
        return self._follower.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._follower.wait_ready(timeout_s)

    def __len__(self) -> int:
        return len(self._store)

    def is_suppressed(self, tenant: str, address: str) -> bool:
        with self._lock:
            return self._store.contains(tenant, address)

    def get(self, tenant: str, address: str) -> Suppression | None:
        with self._lock:
            return self._store.get(tenant, address)

    def apply(self, key: str, entry: Suppression | None) -> None:
        """Record an entry (or its removal) already acknowledged by Kafka."""
        with self._lock:
            self._store.apply(key, entry)

    def page(self, tenant: str, after: str | None, limit: int) -> list[Suppression]:
        """Entries of one tenant in address order, starting after the address `after`."""
        with self._lock:
            return self._store.page(tenant, after, limit)

    def _ingest(self, text_key: str, value: bytes | None) -> None:
        if value is None:
            self.apply(text_key, None)
            return
        try:
            entry = Suppression.model_validate_json(value)
        except ValidationError:
            log.warning("unreadable suppression record", extra={"key": text_key})
            return
        self.apply(text_key, entry)
