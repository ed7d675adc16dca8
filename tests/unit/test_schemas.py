"""Every example payload in schemas/examples round-trips through its topic's model, or
through its HTTP body's model (`api.<Model>.json`)."""

import json

import pytest
from pydantic import BaseModel, ValidationError

from schemas.api import MessageRequest
from schemas.catalogue import EXAMPLES_DIR, TOPICS, TopicSpec, concrete_topics
from schemas.generate import API_MODELS, OUT_DIR, rendered

_EXAMPLES = [
    (spec, index, example)
    for spec in TOPICS
    if spec.value is not None
    for index, example in enumerate(
        json.loads((EXAMPLES_DIR / f"{spec.example_name}.json").read_text())
    )
]


@pytest.mark.parametrize(
    ("spec", "index", "example"), _EXAMPLES, ids=[f"{s.name}[{i}]" for s, i, _ in _EXAMPLES]
)
def test_example_round_trips(spec: TopicSpec, index: int, example: dict[str, object]) -> None:
    model: type[BaseModel] = spec.value  # type: ignore[assignment]
    parsed = model.model_validate(example)
    again = model.model_validate_json(parsed.model_dump_json(by_alias=True))
    assert again == parsed


def test_every_topic_with_a_model_has_examples() -> None:
    with_model = {spec.name for spec in TOPICS if spec.value is not None}
    assert with_model == {spec.name for spec, _, _ in _EXAMPLES}


def _api_examples_file(model: type[BaseModel]) -> str:
    """Named like the model's JSON Schema file, `schemas/jsonschema/api.<Model>.json`."""
    return f"api.{model.__name__}.json"


_API_EXAMPLES = [
    (model, index, example)
    for model in API_MODELS
    if (EXAMPLES_DIR / _api_examples_file(model)).exists()
    for index, example in enumerate(
        json.loads((EXAMPLES_DIR / _api_examples_file(model)).read_text())
    )
]


@pytest.mark.parametrize(
    ("model", "index", "example"),
    _API_EXAMPLES,
    ids=[f"api.{m.__name__}[{i}]" for m, i, _ in _API_EXAMPLES],
)
def test_api_example_round_trips(
    model: type[BaseModel], index: int, example: dict[str, object]
) -> None:
    parsed = model.model_validate(example)
    again = model.model_validate_json(parsed.model_dump_json(by_alias=True))
    assert again == parsed


def test_every_api_body_has_examples_and_no_example_is_stray() -> None:
    with_examples = {model for model, _, _ in _API_EXAMPLES}
    assert with_examples == set(API_MODELS)
    files = {path.name for path in EXAMPLES_DIR.glob("api.*.json")}
    assert files == {_api_examples_file(model) for model in API_MODELS}
    requests = [e for m, _, e in _API_EXAMPLES if m is MessageRequest]
    assert {"raw" in e for e in requests} == {True, False}, "both forms of POST /v1/messages"


def test_committed_json_schemas_are_current() -> None:
    committed = {path.name: path.read_text() for path in OUT_DIR.glob("*.json")}
    assert committed == rendered(), "run `make schemas`"


def test_outbound_topic_expands_per_pool() -> None:
    names = [name for name, _ in concrete_topics(["default", "marketing"])]
    assert "mail.outbound.default" in names and "mail.outbound.marketing" in names
    assert "mail.outbound.<pool>" not in names


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"from": "a@b.example", "to": ["bad@"], "subject": "s", "text": "t"}, "to"),
        ({"from": "a@b.example", "to": [], "subject": "s", "text": "t"}, "to"),
        ({"from": "a@b.example", "to": ["x@y.example"], "text": "t"}, None),
        (
            {
                "from": "a@b.example",
                "to": ["x@y.example"],
                "subject": "a\r\nBcc: x@evil",
                "text": "t",
            },
            "subject",
        ),
        (
            {
                "from": "a@b.example",
                "to": ["x@y.example"],
                "subject": "s",
                "text": "t",
                "headers": {"X-A": "1\nBcc: e@v"},
            },
            "headers",
        ),
        (
            {
                "from": "a@b.example",
                "to": ["x@y.example"],
                "subject": "s",
                "text": "t",
                "headers": {"Bcc": "e@v.example"},
            },
            "headers",
        ),
        ({"from": "a@b.example", "to": ["x@y.example"], "raw": "not base64!"}, "raw"),
    ],
)
def test_invalid_requests_name_the_field(body: dict[str, object], field: str | None) -> None:
    with pytest.raises(ValidationError) as info:
        MessageRequest.model_validate(body)
    if field is not None:
        assert info.value.errors()[0]["loc"][0] == field


def test_idn_and_smtputf8_addresses_are_accepted() -> None:
    request = MessageRequest.model_validate(
        {
            "from": "a@b.example",
            "to": ["用户@例子.广告", "Bob@BÜCHER.example"],
            "subject": "s",
            "text": "t",
        }
    )
    assert [r.email for r in request.recipients()] == ["用户@例子.广告", "Bob@bücher.example"]
