"""The HTTP API (contract in design.md): messages, suppressions, health, OpenAPI."""

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Request, Response
from fastapi.openapi.utils import get_openapi

from schemas.api import ErrorResponse, MessageAccepted, MessageRequest, MessageStatus
from services.ingest.accept import InvalidField, UnknownPool
from services.ingest.admin import admin_router
from services.ingest.auth import ApiKeys, tenant_of
from services.ingest.body import parse_body
from services.ingest.errors import (
    ERROR_RESPONSES,
    ApiError,
    install_error_handlers,
    unavailable,
)
from services.ingest.limits import BodySizeLimit, request_limit
from services.ingest.observe import Observe
from services.ingest.publish import KeyConflict, KeyInProgress, Publisher, Unavailable
from services.ingest.ratelimit import RateLimiter
from services.ingest.status import StatusView
from services.ingest.suppressions import suppression_routes
from services.ingest.unsubscribe import unsubscribe_router
from services.runtime.health import Health
from services.runtime.http import health_routes

log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_POST_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {
        "model": ErrorResponse,
        "description": "Idempotency-Key reused with another body, or its first request is"
        " still in progress (then with Retry-After)",
    }
}
_GET_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {
        "model": ErrorResponse,
        "description": "no such message; also another tenant's (its existence is not confirmed)",
    }
}


@dataclass
class IngestDeps:
    keys: ApiKeys
    publisher: Publisher
    limiter: RateLimiter
    status: StatusView
    health: Health
    max_message_bytes: int
    retry_after_s: int


def message_size(request: MessageRequest) -> int:
    """Bytes of content the message carries (attachments counted decoded)."""
    if request.raw is not None:
        return len(request.raw) * 3 // 4
    size = len((request.text or "").encode()) + len((request.html or "").encode())
    return size + sum(len(a.content) * 3 // 4 for a in request.attachments)


def create_app(deps: IngestDeps) -> FastAPI:
    app = FastAPI(
        title="Mailrail",
        version="1",
        description="Bulk-email delivery pipeline: hand it mail, read back what happened.",
        responses=ERROR_RESPONSES,
    )
    install_error_handlers(app)
    app.add_middleware(Observe)
    for route in health_routes(deps.health):
        app.router.routes.append(route)

    @app.post(
        "/v1/messages",
        status_code=202,
        response_model=MessageAccepted,
        responses=_POST_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/MessageRequest"}}
                },
            }
        },
    )
    async def post_message(
        request: Request,
        authorization: Annotated[str | None, Header()] = None,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
    ) -> Response:
        """Accept one message for up to 1,000 recipients; 202 only once Kafka holds it.

        With `Idempotency-Key`, a repeat of the same body within 24 h answers the first
        answer again (header `Idempotent-Replayed: true`) and publishes nothing.
        """
        tenant = tenant_of(deps.keys, authorization)
        body = parse_body(MessageRequest, await request.body())
        if (size := message_size(body)) > deps.max_message_bytes:
            raise ApiError(
                413, "too_large", f"message of {size} bytes over {deps.max_message_bytes}"
            )
        wait_s = deps.limiter.take(tenant, len(body.to))
        if wait_s > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"tenant {tenant} is over its ingest rate",
                headers={"Retry-After": RateLimiter.retry_after(wait_s)},
            )
        try:
            published = await deps.publisher.publish(body, tenant, idempotency_key)
        except UnknownPool as exc:
            raise ApiError(400, "invalid_request", str(exc), "pool") from None
        except InvalidField as exc:
            raise ApiError(400, "invalid_request", str(exc), exc.field) from None
        except KeyConflict:
            raise ApiError(
                409,
                "idempotency_conflict",
                "this Idempotency-Key was used with a different body",
                "Idempotency-Key",
            ) from None
        except KeyInProgress as exc:
            raise ApiError(
                409,
                "idempotency_in_progress",
                str(exc),
                "Idempotency-Key",
                headers={"Retry-After": RateLimiter.retry_after(exc.retry_after_s)},
            ) from None
        except Unavailable as exc:
            log.warning("kafka write failed", extra={"error": str(exc)})
            raise unavailable(deps.retry_after_s) from None
        headers = {"Idempotent-Replayed": "true"} if published.replayed else None
        # Serialised once here: FastAPI would validate the answer again (1,000 recipients).
        return Response(
            published.answer.model_dump_json(), 202, headers, media_type="application/json"
        )

    @app.get(
        "/v1/messages/{message_id}",
        response_model=MessageStatus,
        response_model_exclude_none=True,
        responses=_GET_ERRORS,
    )
    async def get_message(
        message_id: Annotated[str, Path()],
        authorization: Annotated[str | None, Header()] = None,
    ) -> MessageStatus:
        """Each recipient's current state and its timeline of events."""
        tenant = tenant_of(deps.keys, authorization)
        if not _MESSAGE_ID.match(message_id):
            raise ApiError(404, "not_found", "no such message")
        if not deps.status.ready:
            raise ApiError(
                503,
                "loading",
                "the status view is still loading, try again",
                headers={"Retry-After": str(deps.retry_after_s)},
            )
        found = deps.status.get(message_id)
        # Another tenant's message answers like a missing one: a 403 would confirm the id.
        if found is None or found[0] != tenant:
            raise ApiError(404, "not_found", f"no message {message_id}")
        return found[1]

    suppressions = suppression_routes(
        deps.keys,
        deps.publisher.suppressions,
        deps.publisher.producer,
        deps.publisher.timeout_s,
        deps.retry_after_s,
    )
    for route in suppressions:
        app.router.routes.append(route)
    app.include_router(unsubscribe_router(deps.publisher))
    app.include_router(admin_router(deps.publisher))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request body read by hand, minus the 422 never sent."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    request_schema = MessageRequest.model_json_schema(
        by_alias=True, ref_template="#/components/schemas/{model}"
    )
    schemas.update(request_schema.pop("$defs", {}))
    schemas["MessageRequest"] = request_schema
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    app.openapi_schema = document
    return document


def with_limits(app: FastAPI, max_message_bytes: int) -> BodySizeLimit:
    """The app behind the body-size guard: base64 of the largest message, plus JSON room."""
    return BodySizeLimit(app, request_limit(max_message_bytes))
