"""Every error ingest answers has one shape: `{"error": {"code", "message", "field"}}`."""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import ErrorDetail, ErrorResponse

_RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
#: The documented error answers of every route (OpenAPI).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    | ({"headers": _RETRY_AFTER} if status in (429, 503) else {})
    for status, description in {
        400: "invalid request (`error.field` names the field)",
        401: "missing or unknown API key",
        404: "not found",
        405: "method not allowed",
        413: "request too large",
        415: "not application/json",
        429: "rate-limited (see Retry-After)",
        503: "Kafka unavailable (see Retry-After)",
    }.items()
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(code=code, message=message, field=field)
        self.headers = headers


def unavailable(retry_after_s: int, what: str = "the message could not be stored") -> ApiError:
    """503: Kafka did not acknowledge in time."""
    return ApiError(
        503,
        "kafka_unavailable",
        f"{what}; nothing was accepted, try again",
        headers={"Retry-After": str(retry_after_s)},
    )


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(exclude_none=True), status, headers=headers)


def field_name(loc: tuple[int | str, ...]) -> str | None:
    """`("body", "to", 0, "email")` → `to[0].email`; the body itself → None."""
    parts = [p for p in loc if p not in ("body",)]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("str", "Recipient", "function-after[normalise_address(), str]"):
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            ErrorResponse(error=exc.detail).model_dump(exclude_none=True),
            exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Of a union's alternatives, the deepest error is the one the caller meant.
        first = max(
            errors,
            key=lambda e: len(e.get("loc", ())),
            default={"loc": (), "msg": "invalid request", "type": ""},
        )
        if first.get("type") == "json_invalid":
            return error_response(400, "invalid_json", "request body is not valid JSON")
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return error_response(
            400, "invalid_request", message, field_name(tuple(first.get("loc", ())))
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
