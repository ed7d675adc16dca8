"""Bad input over real HTTP gets the documented status and error shape."""

from __future__ import annotations

import base64

import httpx
import pytest

from tests.integration.conftest import MAX_MESSAGE_BYTES, Stack, unique

VALID = {"from": "a@acme.example", "subject": "s", "text": "t"}


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({**VALID, "to": ["not-an-address"]}, 400, "invalid_request", "to[0]"),
        ({**VALID, "to": [{"email": "x@"}]}, 400, "invalid_request", "to[0].email"),
        ({**VALID, "to": []}, 400, "invalid_request", "to"),
        (
            {"from": "a@acme.example", "to": ["x@example.com"], "text": "t"},
            400,
            "invalid_request",
            None,
        ),
        (
            {**VALID, "to": ["x@example.com"], "subject": "hi\r\nBcc: victim@example.com"},
            400,
            "invalid_request",
            "subject",
        ),
        (
            {**VALID, "to": ["x@example.com"], "headers": {"X-Tag": "a\nBcc: v@example.com"}},
            400,
            "invalid_request",
            "headers",
        ),
        (
            {**VALID, "to": ["x@example.com"], "headers": {"Bcc": "v@example.com"}},
            400,
            "invalid_request",
            "headers",
        ),
        ({**VALID, "to": ["x@example.com"], "pool": "nope"}, 400, "invalid_request", "pool"),
        ({**VALID, "to": ["x@example.com"], "unknown": 1}, 400, "invalid_request", "unknown"),
    ],
)
def test_invalid_body(
    stack: Stack, body: dict[str, object], status: int, code: str, field: str | None
) -> None:
    with stack.client() as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    assert error.get("field") == field


def test_malformed_json(stack: Stack) -> None:
    with stack.client() as client:
        answer = client.post(
            "/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic abc", "Bearer"])
def test_missing_or_wrong_api_key(stack: Stack, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    answer = httpx.post(
        f"{stack.url}/v1/messages", json={**VALID, "to": ["x@example.com"]}, headers=headers
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthorized"


def test_body_over_the_limit_is_413(stack: Stack) -> None:
    raw = b"Subject: big\r\n\r\n" + b"x" * (MAX_MESSAGE_BYTES + 1)
    body = {"from": "a@acme.example", "to": [unique()], "raw": base64.b64encode(raw).decode()}
    with stack.client() as client:
        answer = client.post("/v1/messages", json=body)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_large"
    with stack.client() as client:
        huge = client.post(
            "/v1/messages",
            content=b"x" * (MAX_MESSAGE_BYTES * 2),
            headers={"Content-Type": "application/json"},
        )
    assert huge.status_code == 413


def test_wrong_media_type_is_415(stack: Stack) -> None:
    with stack.client() as client:
        answer = client.post(
            "/v1/messages", content=b"to=x", headers={"Content-Type": "text/plain"}
        )
    assert answer.status_code == 415


def test_openapi_document_is_served(stack: Stack) -> None:
    document = httpx.get(f"{stack.url}/openapi.json").json()
    assert "/v1/messages" in document["paths"]
    assert "/v1/suppressions/{email}" in document["paths"]
