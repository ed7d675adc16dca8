"""ASGI guards in front of the API: body size (413) and media type (415), before parsing."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.ingest.errors import error_response

JSON_OVERHEAD_BYTES = 64 * 1024


def request_limit(max_message_bytes: int) -> int:
    """The largest request or record: a maximal message in base64, plus room for the JSON."""
    return max_message_bytes * 4 // 3 + JSON_OVERHEAD_BYTES


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if scope["method"] in ("POST", "PUT", "PATCH"):
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if not media_type:
                # A body without a media type is read as JSON, as most clients mean it.
                scope = dict(scope)
                scope["headers"] = [
                    *scope.get("headers", []),
                    (b"content-type", b"application/json"),
                ]
            elif media_type != b"application/json":
                response = error_response(415, "unsupported_media_type", "send application/json")
                await response(scope, receive, send)
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self._max_bytes:
                raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "too_large", f"request body is larger than {self._max_bytes} bytes"
        )
        await response(scope, receive, send)
