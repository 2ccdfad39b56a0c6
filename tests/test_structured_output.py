"""``response_format`` through the official `openai` SDK against a real server: JSON mode and JSON schemas
are enforced while sampling, so even a random-weight model's output parses and matches the schema."""

from __future__ import annotations

import json
from typing import Any, Literal

import openai
import pydantic
import pytest
import trio

from tests.servers import Served, chat, legacy, with_sdk
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

TOKENIZER = ChatTokenizer(build_tokenizer())
ASK = [{"role": "user", "content": "Answer in JSON."}]

# Every value is bounded (enums, ranges, maxLength), so a random model reaches the end well within the
# context: the output must then be complete, not cut by max_tokens.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "colour", "count", "ok"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def check_answer(value: Any) -> None:
    """What SCHEMA promises, checked independently of the grammar compiler."""
    assert isinstance(value, dict) and list(value) == ["name", "colour", "count", "ok"]
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert value["colour"] in {"red", "green", "blue"}
    assert type(value["count"]) is int and 0 <= value["count"] <= 99
    assert type(value["ok"]) is bool


async def test_json_object_mode_constrains_the_first_token(served: Served) -> None:
    # A bias of +100 on "}" makes the model emit it whenever it may: unconstrained, that is at once and
    # forever; in JSON mode the grammar forces "{" first, and "}" then closes an empty object.
    (brace,) = TOKENIZER.encode("}")
    bias = {str(brace): 100}
    free = await chat(served, messages=ASK, max_tokens=4, logit_bias=bias, extra_body={"ignore_eos": True})
    assert free.choices[0].message.content == "}}}}"
    constrained = await chat(
        served, messages=ASK, max_tokens=50, logit_bias=bias, response_format={"type": "json_object"}
    )
    assert json.loads(constrained.choices[0].message.content) == {}
    assert constrained.choices[0].finish_reason == "stop"


async def test_json_object_mode_output_parses(served: Served) -> None:
    completion = await chat(served, messages=ASK, n=6, seed=11, response_format={"type": "json_object"})
    parsed = 0
    for choice in completion.choices:
        content = choice.message.content
        if choice.finish_reason == "stop":  # unbounded JSON from a random model may still run to the context
            assert isinstance(json.loads(content), dict)
            parsed += 1
        else:
            assert content.lstrip().startswith("{")
    assert parsed >= 1


async def test_json_schema_output_matches_the_schema(served: Served) -> None:
    completion = await chat(served, messages=ASK, n=8, seed=5, temperature=1.0, response_format=JSON_SCHEMA_FORMAT)
    assert len(completion.choices) == 8
    outputs = set()
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        check_answer(json.loads(choice.message.content))
        outputs.add(choice.message.content)
    assert len(outputs) > 1  # each choice is sampled on its own, under its own matcher
    # Usage still counts every generated token, the EOS that the grammar ended with included.
    total = sum(len(TOKENIZER.encode(c.message.content)) + 1 for c in completion.choices)
    assert completion.usage.completion_tokens == total


async def test_json_schema_while_streaming_and_beside_free_requests(served: Served) -> None:
    async def free() -> None:
        completion = await chat(served, messages=ASK, max_tokens=30, extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 30

    result: list[str] = []

    async def constrained() -> None:
        chunks = await chat(served, messages=ASK, seed=3, stream=True, response_format=JSON_SCHEMA_FORMAT)
        result.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

    async with trio.open_nursery() as nursery:  # batched together with unconstrained sequences
        for _ in range(3):
            nursery.start_soon(free)
        nursery.start_soon(constrained)
    check_answer(json.loads(result[0]))


async def test_max_tokens_cuts_json_with_length(served: Served) -> None:
    completion = await chat(served, messages=ASK, max_tokens=3, seed=1, response_format=JSON_SCHEMA_FORMAT)
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content.startswith("{")


async def test_legacy_completions_take_response_format_too(served: Served) -> None:
    completion = await legacy(
        served, prompt="JSON:", max_tokens=500, n=3, seed=4, extra_body={"response_format": JSON_SCHEMA_FORMAT}
    )
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        check_answer(json.loads(choice.text))


class Answer(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    colour: Literal["red", "green", "blue"]
    count: int = pydantic.Field(ge=0, le=99)
    ok: bool


async def test_sdk_parse_helper_with_a_pydantic_model(served: Served) -> None:
    # `client.chat.completions.parse` sends the model's strict JSON schema and validates the reply with it.
    completion = await with_sdk(
        served, lambda client: client.chat.completions.parse(model="m", messages=ASK, seed=2, response_format=Answer)
    )
    answer = completion.choices[0].message.parsed
    assert isinstance(answer, Answer)
    check_answer(answer.model_dump())


@pytest.mark.parametrize(
    ("response_format", "extra", "param"),
    [
        ({"type": "json_schema"}, {}, "response_format"),
        ({"type": "yaml"}, {}, "response_format.type"),
        (
            {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
            {},
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "wat"}}},
            {},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/$defs/missing"}}},
            {},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_object"}, {"ignore_eos": True}, "ignore_eos"),
    ],
)
async def test_bad_response_formats_are_400_naming_the_field(
    served: Served, response_format: dict[str, Any], extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(served, messages=ASK, response_format=response_format, extra_body=extra)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "response_format" in error["message"] or "ignore_eos" in error["message"]
    # The server is unharmed: the next request is served.
    completion = await chat(served, messages=ASK, max_tokens=2, response_format={"type": "text"})
    assert completion.choices[0].message.content is not None
