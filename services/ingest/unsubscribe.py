"""`/v1/unsubscribe/{token}`: the one-click unsubscribe of RFC 8058, no API key needed.

The token in every message's List-Unsubscribe URL (see `services/bounce/oneclick.py`) says
which address got which message of which tenant; only the platform can make one.

- `POST` (what mailbox providers send, body `List-Unsubscribe=One-Click`; the body is not
  required) writes an `unsubscribed` event to `mail.events` and answers 200 once Kafka has
  it; the bounce service then writes the address to `mail.suppression` for that tenant.
- `GET` only shows a small page with a button that POSTs: link scanners that open every URL
  of a message unsubscribe nobody.
- A token that is malformed or not signed with our key: 404 (JSON error).
"""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from schemas.api import ErrorResponse
from schemas.records import DeliveryEvent, EventType
from services.bounce.oneclick import MAX_TOKEN_CHARS, Unsubscribe, UnsubscribeSettings, decode_token
from services.ingest.errors import ApiError, unavailable
from services.ingest.publish import Publisher
from services.runtime.codec import event_output
from services.runtime.producer import DeliveryFailed

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
_Token = Annotated[str, Path(min_length=1, max_length=MAX_TOKEN_CHARS)]
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
</head><body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<h1>{title}</h1>
{body}
</body></html>
"""


class Unsubscribed(BaseModel):
    unsubscribed: bool = True
    email: str
    tenant: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "not a valid unsubscribe link"},
    503: {"model": ErrorResponse, "description": "Kafka unavailable (see Retry-After)"},
}
_POST_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Unsubscribed,
        "description": "unsubscribed (an HTML page when the client accepts text/html)",
        "content": {"text/html": {"schema": {"type": "string"}}},
    },
    **_ERRORS,
}


def unsubscribe_router(
    publisher: Publisher, settings: UnsubscribeSettings | None = None
) -> APIRouter:
    """The endpoint, writing through the publisher's producer within its timeout."""
    key = (settings or UnsubscribeSettings()).key()
    router = APIRouter(tags=["unsubscribe"])

    def verified(token: str) -> Unsubscribe:
        said = decode_token(token, key)
        if said is None:
            raise ApiError(404, "not_found", "this unsubscribe link is not valid")
        return said

    @router.get(
        "/v1/unsubscribe/{token}",
        response_class=HTMLResponse,
        responses={200: {"description": "a page with a button that unsubscribes"}, **_ERRORS},
    )
    async def unsubscribe_page(token: _Token) -> HTMLResponse:
        """A confirmation page; unsubscribing takes its button (a POST), never a GET."""
        said = verified(token)
        body = (
            f"<p>Stop all mail from <b>{html.escape(said.tenant)}</b> to "
            f"<b>{html.escape(said.address)}</b>?</p>\n"
            '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'
        )
        return HTMLResponse(_PAGE.format(title="Unsubscribe", body=body))

    @router.post("/v1/unsubscribe/{token}", responses=_POST_RESPONSES)
    async def unsubscribe(
        token: _Token, accept: Annotated[str | None, Header()] = None
    ) -> Response:
        """RFC 8058 one-click: record the unsubscribe; 200 once Kafka holds it."""
        said = verified(token)
        event = DeliveryEvent(
            type=EventType.UNSUBSCRIBED,
            message_id=said.message_id,
            tenant=said.tenant,
            recipient=said.address,
            detail="one-click unsubscribe (List-Unsubscribe-Post)",
        )
        output = event_output(event)
        try:
            async with asyncio.timeout(publisher.timeout_s):
                await publisher.producer.send(output.topic, output.value, output.key)
        except (TimeoutError, DeliveryFailed) as exc:
            log.warning("unsubscribe not stored", extra={"error": str(exc) or "timed out"})
            raise unavailable(RETRY_AFTER_S, "the unsubscribe could not be stored") from None
        log.info("unsubscribed", extra={"tenant": said.tenant, "message_id": said.message_id})
        if "text/html" in (accept or ""):
            body = (
                f"<p><b>{html.escape(said.address)}</b> will get no more mail from "
                f"<b>{html.escape(said.tenant)}</b>.</p>"
            )
            return HTMLResponse(_PAGE.format(title="Unsubscribed", body=body))
        answer = Unsubscribed(email=said.address, tenant=said.tenant)
        return JSONResponse(answer.model_dump())

    return router
