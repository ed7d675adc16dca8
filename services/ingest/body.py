"""Request bodies parsed straight from bytes, with errors that name the field at fault.

The body is validated by pydantic's JSON parser in one pass (no intermediate dicts). When
the bytes are not JSON, the error says whether the cause is invalid UTF-8 (including a lone
surrogate escape such as `"\\ud800"`, which no UTF-8 text can carry) and in which field.
"""

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from services.ingest.errors import ApiError, field_name

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            raise _not_json(body) from None
        raise validation_error(errors) from None


def validation_error(errors: Any) -> ApiError:
    """The deepest error of a validation failure (of a union's alternatives, the one meant)."""
    first = max(errors, key=lambda e: len(e.get("loc", ())), default=None)
    if first is None:
        return ApiError(400, "invalid_request", "invalid request")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return ApiError(400, "invalid_request", message, field_name(("body", *first.get("loc", ()))))


def _not_json(body: bytes) -> ApiError:
    where: str | None = None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = body.decode("utf-8", "surrogateescape")
        where = f"byte {exc.start}"
    try:
        document = json.loads(text)
    except ValueError:
        if where is not None:
            return ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (at {where})")
        return ApiError(400, "invalid_json", "request body is not valid JSON")
    path = _first_surrogate(document, ())
    if path is None:
        return ApiError(400, "invalid_json", "request body is not valid JSON")
    field = field_name(("body", *path))
    return ApiError(400, "invalid_utf8", f"{field or 'body'} is not valid UTF-8", field)


def _first_surrogate(value: object, path: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """Where the first string holding a surrogate (bad UTF-8 or a lone escape) is."""
    if isinstance(value, str):
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if any("\ud800" <= c <= "\udfff" for c in key):
                return (*path, key)
            found = _first_surrogate(item, (*path, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_surrogate(item, (*path, index))
            if found is not None:
                return found
    return None
