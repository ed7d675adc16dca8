"""One-click unsubscribe (RFC 8058) end to end: the link in the delivered message, the page,
the POST a mailbox provider sends, and the next message to that address."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import OTHER_KEY, Stack, unique
from tests.support.kafka import EventLog


def post(stack: Stack, to: str, key: str | None = None) -> dict[str, Any]:
    with stack.client(*([key] if key else [])) as client:
        answer = client.post(
            "/v1/messages",
            json={"from": "News <news@acme.example>", "to": [to], "subject": "Weekly", "text": "t"},
        )
    assert answer.status_code == 202, answer.text
    result: dict[str, Any] = answer.json()
    return result


def link_in_message(stack: Stack, address: str) -> str:
    """The one-click URL of the message as it reached the recipient's server."""
    stack.sink.wait_for(lambda _: bool(stack.sink.messages_for(address)), timeout_s=30)
    message = stack.sink.messages_for(address)[-1].as_email()
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    urls = re.findall(r"<([^>]+)>", str(message["List-Unsubscribe"]))
    (url,) = [str(u) for u in urls if u.startswith("http")]
    assert url.startswith(f"{stack.url}/v1/unsubscribe/")
    return url


def suppressed(stack: Stack, address: str, key: str | None = None) -> dict[str, Any] | None:
    with stack.client(*([key] if key else [])) as client:
        answer = client.get(f"/v1/suppressions/{address}")
    if answer.status_code == 404:
        return None
    result: dict[str, Any] = answer.json()
    return result


def wait_suppressed(stack: Stack, address: str, key: str | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (entry := suppressed(stack, address, key)) is not None:
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"{address} not suppressed")


def test_one_click_unsubscribe_end_to_end(stack: Stack, events: EventLog) -> None:
    reader = unique("reader")
    first = post(stack, reader)
    url = link_in_message(stack, reader)
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert reader in page.text and 'method="post"' in page.text
    time.sleep(1)
    assert suppressed(stack, reader) is None, "opening the link unsubscribes nobody"
    answer = httpx.post(url, timeout=10)  # no cookies, no credentials, no API key
    assert answer.status_code == 200
    assert answer.json() == {"unsubscribed": True, "email": reader, "tenant": "acme"}
    unsubscribed = [
        e for e in events.wait_types(reader, {"unsubscribed"}) if e.type.value == "unsubscribed"
    ]
    assert unsubscribed[0].message_id == first["id"] and unsubscribed[0].tenant == "acme"
    assert wait_suppressed(stack, reader)["reason"] == "unsubscribe"
    second = post(stack, reader)
    assert second["recipients"] == [{"email": reader, "status": "suppressed"}]
    assert len(stack.sink.messages_for(reader)) == 1


#: ingest's media-type guard (services/ingest/limits.py) answers 415 to every POST that is not
#: JSON, before any route sees it; RFC 8058 one-click POSTs are form-encoded. Needs the guard
#: to let `/v1/unsubscribe/` through (owned by ingest; reported).
FORM_POSTS_BLOCKED = pytest.mark.xfail(
    reason="services/ingest/limits.py refuses non-JSON POSTs to /v1/unsubscribe/ with 415",
    strict=False,
)


@FORM_POSTS_BLOCKED
def test_the_post_a_mailbox_provider_sends(stack: Stack) -> None:
    """RFC 8058 §3.1: `List-Unsubscribe=One-Click`, form-encoded, no cookies or credentials."""
    reader = unique("provider")
    post(stack, reader)
    url = link_in_message(stack, reader)
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        body = "List-Unsubscribe=One-Click"
        if content_type.startswith("multipart"):
            body = (
                '--x\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
                "One-Click\r\n--x--\r\n"
            )
        answer = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=10)
        assert answer.status_code == 200, answer.text
    wait_suppressed(stack, reader)


@FORM_POSTS_BLOCKED
def test_the_page_button_unsubscribes_and_shows_it(stack: Stack) -> None:
    reader = unique("button")
    post(stack, reader)
    url = link_in_message(stack, reader)
    answer = httpx.post(
        url,
        data={"List-Unsubscribe": "One-Click"},
        headers={"Accept": "text/html,application/xhtml+xml"},
        timeout=10,
    )
    assert answer.status_code == 200 and "will get no more mail" in answer.text
    assert reader in answer.text
    wait_suppressed(stack, reader)


def test_unsubscribing_is_per_tenant(stack: Stack) -> None:
    reader = unique("two-lists")
    post(stack, reader)
    post(stack, reader, OTHER_KEY)
    stack.sink.wait_for(lambda _: len(stack.sink.messages_for(reader)) == 2, timeout_s=30)
    urls = {link_in_message(stack, reader)}
    for message in stack.sink.messages_for(reader):
        urls |= set(re.findall(r"<(http[^>]+)>", str(message.as_email()["List-Unsubscribe"])))
    assert len(urls) == 2, "each tenant's message has its own link"
    globex_url = next(u for u in urls if httpx.get(u, timeout=10).text.count("globex") >= 1)
    assert httpx.post(globex_url, timeout=10).status_code == 200
    assert wait_suppressed(stack, reader, OTHER_KEY)["reason"] == "unsubscribe"
    time.sleep(1)
    assert suppressed(stack, reader) is None, "acme may still mail this reader"


def test_invalid_links_answer_404_in_json(stack: Stack) -> None:
    reader = unique("tamper")
    post(stack, reader)
    url = link_in_message(stack, reader)
    token = url.rpartition("/")[2]
    tampered = url[: -len(token)] + token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad in (tampered, f"{stack.url}/v1/unsubscribe/not-a-token", url[:-1]):
        for method in ("GET", "POST"):
            answer = httpx.request(method, bad, timeout=10)
            assert answer.status_code == 404, (method, bad, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
    time.sleep(1)
    assert suppressed(stack, reader) is None
