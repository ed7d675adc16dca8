"""The admin API (`/admin/v1/...`) and the status page (`/ui`), on ingest's HTTP port.

Both need one of the keys in `MAILRAIL_ADMIN_KEYS` (comma-separated; unset = both off, 403):
`Authorization: Bearer <key>`, or HTTP Basic with the key as the password (so a browser
can open `/ui`). Writes go to `mail.control` exactly as the `mailrail` command line writes
them (`services/ops/commands.py`); reads come from views of `mail.control`, `mail.stats` and
the last hour of `mail.events`, started on the first request that needs them, so a replica
nobody asks pays nothing.

    GET    /admin/v1/controls              the controls in force, by key
    POST   /admin/v1/controls              {"action", "destination", "pool", "tenant", "rate",
                                            "to_pool", "for", "reason"} → 201 {"key", "command"}
    DELETE /admin/v1/controls/{key}        tombstone (resume, clear a quota, cancel a move)
    GET    /admin/v1/queues?pool=&all=     the destination table
    GET    /admin/v1/throughput            per-minute outcomes and bounces by category, last hour
    GET    /ui                             all of it as one HTML page
"""

import asyncio
import base64
import binascii
import hmac
import logging
import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from schemas.catalogue import CONTROL, EVENTS
from schemas.records import ControlAction, ControlCommand, utc_now
from services.ingest.errors import ApiError, unavailable
from services.ingest.publish import Publisher
from services.ops import page, table
from services.ops.commands import CommandError, Target, build, check_pools, parse_duration
from services.ops.commands import parse_rate as parse_rate_text
from services.ops.digest import EventDigest
from services.ops.views import controls_view, stats_view
from services.runtime.follow import Follower
from services.runtime.producer import DeliveryFailed
from services.runtime.settings import ServiceSettings

log = logging.getLogger(__name__)

VIEW_WAIT_S = 10.0
SETTLE_POLL_S = 0.05
WINDOW_S = 3600.0


class AdminSettings(ServiceSettings):
    #: Keys that open the admin API and /ui (comma-separated); unset: both are off.
    admin_keys: SecretStr | None = None

    def keys(self) -> list[bytes]:
        raw = self.admin_keys.get_secret_value() if self.admin_keys else ""
        return [k.strip().encode() for k in raw.split(",") if k.strip()]


class ControlRequest(BaseModel):
    """One operator command; the same fields as `mailrail pause|quota|move|purge`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    action: ControlAction
    destination: str | None = None
    pool: str | None = None
    tenant: str | None = None
    #: QUOTA: messages per second, or text such as `300/m`.
    rate: float | str | None = None
    #: MOVE: the pool to move to.
    to_pool: str | None = None
    #: How long the command lasts (`30m`, `2h`); default: until removed (purge: 7 days).
    lasting: str | None = Field(default=None, alias="for")
    reason: str | None = Field(default=None, max_length=300)


def check_key(keys: list[bytes], authorization: str | None) -> None:
    if not keys:
        raise ApiError(403, "admin_disabled", "the admin API is off: set MAILRAIL_ADMIN_KEYS")
    token = _token(authorization or "")
    if token is None or not any(hmac.compare_digest(token, key) for key in keys):
        raise ApiError(
            401,
            "unauthorized",
            "an admin key is needed (Bearer, or Basic with the key as password)",
            headers={"WWW-Authenticate": 'Basic realm="mailrail admin"'},
        )


def _token(authorization: str) -> bytes | None:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password or None
    return None


def command_of(request: ControlRequest, pools: list[str]) -> ControlCommand:
    target = Target(request.destination, request.pool, request.tenant)
    check_pools(target, request.to_pool, pools)
    rate = request.rate
    per_s = parse_rate_text(rate) if isinstance(rate, str) else rate
    if per_s is not None and per_s <= 0:
        raise CommandError("the rate must be above 0")
    return build(
        request.action,
        target,
        lasting=parse_duration(request.lasting) if request.lasting else None,
        rate_per_s=per_s,
        to_pool=request.to_pool,
        reason=request.reason,
    )


class OpsViews:
    """`mail.control`, `mail.stats` and the last hour of `mail.events`, started on first use."""

    def __init__(self, kafka_config: dict[str, Any]) -> None:
        self._config = kafka_config
        self.controls = controls_view(kafka_config)
        self.stats = stats_view(kafka_config)
        self.digest = EventDigest()
        self._events: Follower | None = None

    def start(self) -> None:
        if self._events is not None:
            return
        since_ms = int((time.time() - WINDOW_S) * 1000)
        self._events = Follower(
            self._config,
            EVENTS,
            lambda _p, _o, _k, value, ts_ms: self.digest.add(value, ts_ms) if value else None,
            since_ms=since_ms,
        )
        self._events.start()
        self.controls.start()
        self.stats.start()

    async def loaded(self) -> None:
        """Start the views and wait (briefly) until the compacted ones are read."""
        self.start()
        await asyncio.to_thread(self.controls.wait_ready, VIEW_WAIT_S)
        await asyncio.to_thread(self.stats.wait_ready, VIEW_WAIT_S)

    @property
    def events_ready(self) -> bool:
        return self._events is not None and self._events.ready

    async def settled(self, key: str, command: ControlCommand | None) -> None:
        """Wait (up to `VIEW_WAIT_S`) until the view shows a write: read your own writes."""
        for _ in range(int(VIEW_WAIT_S / SETTLE_POLL_S)):
            if self.controls.items().get(key) == command:
                return
            await asyncio.sleep(SETTLE_POLL_S)

    def in_force(self) -> dict[str, ControlCommand]:
        now = utc_now()
        return {
            k: c
            for k, c in self.controls.items().items()
            if c.expires_at is None or c.expires_at > now
        }


def admin_router(publisher: Publisher) -> APIRouter:
    """The admin API and /ui; mounted by `create_app`."""
    settings = AdminSettings()
    keys = settings.keys()
    views = OpsViews(settings.kafka_common())
    pools = publisher.rules.pool_names()
    router = APIRouter(include_in_schema=False)

    async def write(key: str, command: ControlCommand | None) -> None:
        value = None if command is None else command.model_dump_json(exclude_none=True).encode()
        try:
            async with asyncio.timeout(publisher.timeout_s):
                await publisher.producer.send(CONTROL, value, key)
        except (TimeoutError, DeliveryFailed) as exc:
            log.warning("control write failed", extra={"error": str(exc)})
            raise unavailable(5, "the control could not be stored") from None

    @router.get("/admin/v1/controls")
    async def list_controls(authorization: Annotated[str | None, Header()] = None) -> Any:
        check_key(keys, authorization)
        await views.loaded()
        return {
            k: c.model_dump(mode="json", exclude_none=True) for k, c in views.in_force().items()
        }

    @router.post("/admin/v1/controls", status_code=201)
    async def add_control(
        request: ControlRequest, authorization: Annotated[str | None, Header()] = None
    ) -> Any:
        check_key(keys, authorization)
        try:
            command = command_of(request, pools)
        except (CommandError, ValueError) as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
        await views.loaded()
        await write(command.scope, command)
        await views.settled(command.scope, command)
        log.info("control written", extra={"key": command.scope, "action": command.action.value})
        return {"key": command.scope, "command": command.model_dump(mode="json", exclude_none=True)}

    @router.delete("/admin/v1/controls/{key:path}")
    async def remove_control(
        key: Annotated[str, Path(min_length=1, max_length=300)],
        authorization: Annotated[str | None, Header()] = None,
    ) -> Any:
        check_key(keys, authorization)
        await views.loaded()
        present = key in views.in_force()
        await write(key, None)
        await views.settled(key, None)
        log.info("control removed", extra={"key": key})
        return {"key": key, "was_in_force": present}

    @router.get("/admin/v1/queues")
    async def queues(
        authorization: Annotated[str | None, Header()] = None,
        pool: Annotated[str | None, Query()] = None,
        show_all: Annotated[bool, Query(alias="all")] = False,
    ) -> Any:
        check_key(keys, authorization)
        await views.loaded()
        found = table.rows(views.stats.items().values(), pool=pool, show_all=show_all)
        return [row.as_dict() for row in found]

    @router.get("/admin/v1/throughput")
    async def throughput(authorization: Annotated[str | None, Header()] = None) -> Any:
        check_key(keys, authorization)
        views.start()
        if not views.events_ready:
            return JSONResponse({"loading": True}, 503, headers={"Retry-After": "2"})
        digest = views.digest.digest(time.time())
        return {
            "minutes": [{"start": start, **counts} for start, counts in digest.minutes],
            "totals": digest.totals,
            "bounces_by_category": digest.bounces_by_category,
            "recent_bounces": [asdict(b) for b in digest.recent_bounces],
        }

    @router.get("/ui", response_class=HTMLResponse)
    async def status_page(authorization: Annotated[str | None, Header()] = None) -> HTMLResponse:
        check_key(keys, authorization)
        await views.loaded()
        rows = table.rows(views.stats.items().values())
        digest = views.digest.digest(time.time()) if views.events_ready else None
        return HTMLResponse(page.render(rows, digest, views.in_force(), utc_now()))

    return router
