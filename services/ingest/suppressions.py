"""`/v1/suppressions`: read and edit a tenant's own suppression list (keys are per tenant)."""

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from pydantic import ValidationError
from starlette.routing import BaseRoute

from schemas.addresses import normalise_address
from schemas.api import SuppressionEntry, SuppressionPage, SuppressionRequest
from schemas.records import Suppression, SuppressionReason, suppression_key
from services.ingest.auth import ApiKeys, tenant_of
from services.ingest.errors import ERROR_RESPONSES, ApiError, unavailable
from services.runtime.codec import suppression_output, suppression_removal
from services.runtime.loop import Output
from services.runtime.producer import DeliveryFailed, RecordProducer
from services.runtime.suppression import SuppressionView

log = logging.getLogger(__name__)


def suppression_routes(
    keys: ApiKeys,
    view: SuppressionView,
    producer: RecordProducer,
    timeout_s: float,
    retry_after_s: int,
) -> list[BaseRoute]:
    router = APIRouter(responses=ERROR_RESPONSES)

    async def write(output: Output) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await producer.send(output.topic, output.value, output.key)
        except (TimeoutError, DeliveryFailed) as exc:
            log.warning("kafka write failed", extra={"error": str(exc)})
            raise unavailable(retry_after_s, "the change could not be stored") from None

    @router.get("/v1/suppressions/{email}", response_model=SuppressionEntry)
    async def get_suppression(
        email: Annotated[str, Path()], authorization: Annotated[str | None, Header()] = None
    ) -> SuppressionEntry:
        tenant = tenant_of(keys, authorization)
        address = _address(email)
        entry = view.get(tenant, address)
        if entry is None:
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        return _entry(entry)

    @router.put("/v1/suppressions/{email}", response_model=SuppressionEntry)
    async def put_suppression(
        email: Annotated[str, Path()],
        body: SuppressionRequest | None = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> SuppressionEntry:
        tenant = tenant_of(keys, authorization)
        entry = Suppression(
            tenant=tenant,
            address=_address(email),
            reason=SuppressionReason.MANUAL,
            detail=(body or SuppressionRequest()).reason,
        )
        await write(suppression_output(entry))
        view.apply(suppression_key(tenant, entry.address), entry)
        return _entry(entry)

    @router.delete("/v1/suppressions/{email}", status_code=204)
    async def delete_suppression(
        email: Annotated[str, Path()], authorization: Annotated[str | None, Header()] = None
    ) -> Response:
        tenant = tenant_of(keys, authorization)
        address = _address(email)
        if view.get(tenant, address) is None:
            raise ApiError(404, "not_found", f"{address} is not suppressed")
        await write(suppression_removal(tenant, address))
        view.apply(suppression_key(tenant, address), None)
        return Response(status_code=204)

    @router.get("/v1/suppressions", response_model=SuppressionPage)
    async def list_suppressions(
        cursor: Annotated[str | None, Query(max_length=300)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        authorization: Annotated[str | None, Header()] = None,
    ) -> SuppressionPage:
        tenant = tenant_of(keys, authorization)
        entries = view.page(tenant, cursor, limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        return SuppressionPage(
            items=[_entry(e) for e in entries],
            next_cursor=entries[-1].address if more and entries else None,
        )

    return list(router.routes)


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
