"""Live views of `mail.control` and `mail.stats` (compacted): the latest record per key."""

import logging
import threading
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.catalogue import CONTROL, STATS
from schemas.records import ControlCommand, DestinationStats
from services.runtime.follow import Follower, by_key

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class CompactedView(Generic[M]):
    """Follows a compacted topic from its beginning; `items()` is a snapshot of it."""

    def __init__(self, kafka_config: dict[str, Any], topic: str, model: type[M]) -> None:
        self._model = model
        self._items: dict[str, M] = {}
        self._lock = threading.Lock()
        self._reader = Follower(kafka_config, topic, by_key(self._on_record))
        self._started = False

    def _on_record(self, key: str, value: bytes | None) -> None:
        if value is None:
            with self._lock:
                self._items.pop(key, None)
            return
        try:
            item = self._model.model_validate_json(value)
        except ValidationError:
            log.warning("unreadable record", extra={"key": key})
            return
        with self._lock:
            self._items[key] = item

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._reader.start()

    def stop(self) -> None:
        if self._started:
            self._reader.stop()

    @property
    def ready(self) -> bool:
        return self._reader.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self._reader.wait_ready(timeout_s)

    def items(self) -> dict[str, M]:
        with self._lock:
            return dict(self._items)


def controls_view(kafka_config: dict[str, Any]) -> CompactedView[ControlCommand]:
    return CompactedView(kafka_config, CONTROL, ControlCommand)


def stats_view(kafka_config: dict[str, Any]) -> CompactedView[DestinationStats]:
    return CompactedView(kafka_config, STATS, DestinationStats)


def read_once(view: CompactedView[M], timeout_s: float) -> dict[str, M]:
    """Read the topic to its end once (for the command line), then stop."""
    view.start()
    try:
        if not view.wait_ready(timeout_s):
            raise TimeoutError("the topic could not be read: is Kafka up?")
        return view.items()
    finally:
        view.stop()
