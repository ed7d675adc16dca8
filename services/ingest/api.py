"""The HTTP API (contract in design.md): messages, suppressions, health, OpenAPI."""

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, Header, Path, Query, Response
from pydantic import ValidationError

from schemas.addresses import normalise_address
from schemas.api import (
    ErrorResponse,
    MessageAccepted,
    MessageRequest,
    SuppressionEntry,
    SuppressionPage,
    SuppressionRequest,
)
from schemas.records import Suppression, SuppressionReason, suppression_key
from schemas.rules import Rules
from services.ingest.accept import UnknownPool, accept, answer
from services.ingest.auth import ApiKeys
from services.ingest.errors import ApiError, install_error_handlers
from services.ingest.limits import BodySizeLimit, request_limit
from services.runtime.codec import accepted_output, suppression_output, suppression_removal
from services.runtime.health import Health
from services.runtime.http import health_routes
from services.runtime.loop import Output
from services.runtime.producer import AsyncProducer, DeliveryFailed
from services.runtime.suppression import SuppressionView

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request",
        401: "missing or unknown API key",
        403: "not allowed for this tenant",
        413: "request too large",
        429: "rate-limited (see Retry-After)",
        503: "Kafka unavailable (see Retry-After)",
    }.items()
}


@dataclass
class IngestDeps:
    rules: Rules
    keys: ApiKeys
    producer: AsyncProducer
    suppressions: SuppressionView
    health: Health
    max_message_bytes: int
    produce_timeout_s: float
    retry_after_s: int


def create_app(deps: IngestDeps) -> FastAPI:
    app = FastAPI(
        title="Mailrail",
        version="1",
        description="Bulk-email delivery pipeline: hand it mail, read back what happened.",
        responses=_ERRORS,
    )
    install_error_handlers(app)
    for route in health_routes(deps.health):
        app.router.routes.append(route)

    def tenant_of(authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing Authorization: Bearer <api key>")
        tenant = deps.keys.tenant_for(token.strip())
        if tenant is None:
            raise ApiError(401, "unauthorized", "unknown API key")
        return tenant

    async def write(outputs: list[Output]) -> None:
        """Wait for Kafka's acknowledgement of every output, or answer 503."""
        try:
            await asyncio.wait_for(
                deps.producer.send_all([(o.topic, o.value, o.key, o.headers) for o in outputs]),
                deps.produce_timeout_s,
            )
        except (TimeoutError, DeliveryFailed) as exc:
            log.warning("kafka write failed", extra={"error": str(exc)})
            raise ApiError(
                503,
                "kafka_unavailable",
                "the message could not be stored; nothing was accepted, try again",
                headers={"Retry-After": str(deps.retry_after_s)},
            ) from None

    @app.post("/v1/messages", status_code=202, response_model=MessageAccepted)
    async def post_message(
        body: MessageRequest,
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> MessageAccepted:
        tenant = tenant_of(authorization)
        raw = body.raw_bytes()
        size = len(raw) if raw is not None else len((body.text or "") + (body.html or ""))
        if size > deps.max_message_bytes:
            raise ApiError(413, "too_large", f"message larger than {deps.max_message_bytes} bytes")
        try:
            accepted = accept(
                body, tenant, deps.rules, deps.suppressions.is_suppressed, idempotency_key
            )
        except UnknownPool as exc:
            raise ApiError(400, "invalid_request", str(exc), "pool") from None
        await write([accepted_output(accepted)])
        return answer(accepted)

    @app.get("/v1/suppressions/{email}", response_model=SuppressionEntry)
    async def get_suppression(
        email: Annotated[str, Path()], authorization: Annotated[str | None, Header()] = None
    ) -> SuppressionEntry:
        tenant = tenant_of(authorization)
        address = _address(email)
        entry = deps.suppressions.get(tenant, address)
        if entry is None:
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        return _entry(entry)

    @app.put("/v1/suppressions/{email}", response_model=SuppressionEntry)
    async def put_suppression(
        email: Annotated[str, Path()],
        body: SuppressionRequest | None = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> SuppressionEntry:
        tenant = tenant_of(authorization)
        entry = Suppression(
            tenant=tenant,
            address=_address(email),
            reason=SuppressionReason.MANUAL,
            detail=(body or SuppressionRequest()).reason,
        )
        output = suppression_output(entry)
        await write([output])
        deps.suppressions.apply(suppression_key(tenant, entry.address), entry)
        return _entry(entry)

    @app.delete("/v1/suppressions/{email}", status_code=204)
    async def delete_suppression(
        email: Annotated[str, Path()], authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        tenant = tenant_of(authorization)
        address = _address(email)
        if deps.suppressions.get(tenant, address) is None:
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        await write([suppression_removal(tenant, address)])
        deps.suppressions.apply(suppression_key(tenant, address), None)
        return Response(status_code=204)

    @app.get("/v1/suppressions", response_model=SuppressionPage)
    async def list_suppressions(
        cursor: Annotated[str | None, Query(max_length=300)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        authorization: Annotated[str | None, Header()] = None,
    ) -> SuppressionPage:
        tenant = tenant_of(authorization)
        entries = deps.suppressions.page(tenant, cursor, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        return SuppressionPage(
            items=[_entry(e) for e in entries],
            next_cursor=entries[-1].address if more and entries else None,
        )

    return app


def _address(email: str) -> str:
    try:
        return normalise_address(email)
    except (ValueError, ValidationError) as exc:
        raise ApiError(400, "invalid_request", str(exc), "email") from None


def _entry(entry: Suppression) -> SuppressionEntry:
    return SuppressionEntry(
        email=entry.address,
        tenant=entry.tenant,
        reason=entry.reason.value
        if entry.detail is None
        else f"{entry.reason.value}: {entry.detail}",
        created_at=entry.created_at,
    )


def with_limits(app: FastAPI, max_message_bytes: int) -> BodySizeLimit:
    """The app behind the body-size guard: base64 of the largest message, plus JSON room."""
    return BodySizeLimit(app, request_limit(max_message_bytes))
