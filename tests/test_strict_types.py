"""Wrong JSON types are 400s naming the field, as OpenAI answers them: for every field of every request model.

The JSON types a field takes are read from its model's JSON schema (what /openapi.json publishes); a value
of any other type must be refused, never coerced (pydantic's lax mode turned ``"yes"`` into ``true``,
``"5"`` into ``5`` and ``1`` into ``"1"``). Fields are reached from a valid body of each route, nested ones
(``messages.0.content``, ``tools.0.function.name``, ``response_format.json_schema.strict``) included.
OpenAI coerces nowhere that we know of, so there is no list of exceptions; an integer where a number is
expected is no coercion (JSON has one number type).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from quart.typing import TestClientProtocol as Client

from tests.servers import demo_app
from trioserve.api.anthropic.protocol import MessagesRequest
from trioserve.api.protocol import ChatCompletionRequest, CompletionRequest
from trioserve.api.responses.protocol import ResponsesRequest
from trioserve.api.tokens import DetokenizeRequest, TokenizeChatRequest, TokenizePromptRequest
from trioserve.api.validation import parse
from trioserve.errors import InvalidRequest

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
TOOL_CHOICE = {"type": "function", "function": {"name": "f"}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": False}}
HISTORY = [
    {"role": "system", "content": "s", "name": "n"},
    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
    {"role": "tool", "content": "r", "tool_call_id": "c"},
]

# (route, model, valid bodies): each body reaches some nested fields; together they reach every field.
ROUTES: list[tuple[str, type[BaseModel], list[dict[str, Any]]]] = [
    (
        "/v1/chat/completions",
        ChatCompletionRequest,
        [
            {"messages": HISTORY, "stream_options": {"include_usage": True}, "response_format": SCHEMA_FORMAT},
            {"messages": USER, "tools": [TOOL | {"function": TOOL["function"] | {"strict": False}}]},
            {"messages": USER, "tools": [TOOL], "tool_choice": TOOL_CHOICE},
        ],
    ),
    (
        "/v1/completions",
        CompletionRequest,
        [
            {"prompt": "hi", "response_format": {"type": "json_object"}},
            {"prompt": "hi", "structured_outputs": {"regex": "a", "disable_fallback": True, "whitespace_pattern": " "}},
        ],
    ),
    (
        "/v1/messages",
        MessagesRequest,
        [
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "t", "signature": ""},
                            {"type": "text", "text": "a"},
                            {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t1", "content": "r", "is_error": False},
                            {"type": "text", "text": "go on"},
                        ],
                    },
                ],
                "system": [{"type": "text", "text": "s"}],
                "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
                "thinking": {"type": "disabled"},
                "metadata": {"user_id": "u"},
                "stop_sequences": ["zz"],
                "temperature": 0.5,
                "top_k": 5,
                "top_p": 0.9,
                "stream": False,
            }
        ],
    ),
    (
        "/v1/responses",
        ResponsesRequest,
        [
            {
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "a", "schema": {}, "strict": False}},
                "reasoning": {"effort": "low", "summary": "auto"},
            }
        ],
    ),
    ("/tokenize", TokenizePromptRequest, [{"prompt": "hi"}]),
    ("/tokenize", TokenizeChatRequest, [{"messages": HISTORY, "tools": [TOOL]}]),
    ("/detokenize", DetokenizeRequest, [{"tokens": [1]}]),
]

SAMPLES = {"null": None, "boolean": True, "integer": 3, "number": 2.5, "string": "1", "array": [], "object": {}}
JSON_TYPES = list(SAMPLES)


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def json_types(schema: dict[str, Any], root: dict[str, Any]) -> set[str]:
    """The JSON types a value matching ``schema`` may have (all of them for ``{}``)."""
    schema = _resolve(schema, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return set().union(*(json_types(s, root) for s in schema[key]))
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values is not None:
        names = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
        return {names[type(v)] for v in values}
    kind = schema.get("type")
    if kind is None:
        return set(JSON_TYPES)
    types = set(kind) if isinstance(kind, list) else {kind}
    return types | ({"integer"} if "number" in types else set())


def object_schema(schema: dict[str, Any], root: dict[str, Any], value: Any) -> dict[str, Any] | None:
    """The member of ``schema`` describing ``value`` where it is an object with declared properties."""
    schema = _resolve(schema, root)
    for member in schema.get("anyOf", schema.get("oneOf", [schema])):
        member = _resolve(member, root)
        if isinstance(value, dict) and "properties" in member:
            tag = member["properties"].get("type", {}).get("const")
            if tag is None or tag == value.get("type"):  # a union discriminated by "type": the member it names
                return member
        if isinstance(value, list) and "items" in member and value:
            return member
    return None


def fields(schema: dict[str, Any], root: dict[str, Any], body: Any, path: tuple[str | int, ...] = ()) -> Iterator[Any]:
    """(path, JSON types taken) for every declared field of every object in ``body``."""
    if isinstance(body, list):
        for index, value in enumerate(body):
            item = object_schema(schema["items"], root, value)
            if item is not None:
                yield from fields(item, root, value, (*path, index))
        return
    for name, field in schema["properties"].items():
        yield (*path, name), json_types(field, root)
        nested = object_schema(field, root, body.get(name))
        if nested is not None:
            yield from fields(nested, root, body[name], (*path, name))


def cases() -> list[tuple[str, type[BaseModel], dict[str, Any], tuple[str | int, ...], str]]:
    """(route, model, valid body, field path, a JSON type the field does not take)."""
    found = {}
    for route, model, bodies in ROUTES:
        root = model.model_json_schema()
        for body in bodies:
            for path, types in fields(root, root, body):
                for wrong in JSON_TYPES:
                    if wrong not in types:
                        found.setdefault((route, model, path, wrong), body)
    return [(route, model, body, path, wrong) for (route, model, path, wrong), body in found.items()]


CASES = cases()


def with_value(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    target: Any = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return changed


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path)


def test_the_cases_reach_every_field_of_every_request_model() -> None:
    reached = {(model, dotted(path)) for _, model, _, path, _ in CASES}
    for model, names in (
        (ChatCompletionRequest, {"stream", "messages.0.content", "messages.2.tool_calls", "tools.0.function.strict"}),
        (ChatCompletionRequest, {"tool_choice.function.name", "response_format.json_schema.strict", "seed"}),
        (CompletionRequest, {"prompt", "echo", "logit_bias", "response_format.type"}),
        (ResponsesRequest, {"stream", "input", "text.format.strict", "reasoning.effort", "metadata"}),
        (TokenizeChatRequest, {"messages.1.content.0.text", "tools.0.type"}),
        (CompletionRequest, {"structured_outputs.regex", "structured_outputs.choice", "structured_outputs.json"}),
        (MessagesRequest, {"max_tokens", "stream", "messages.1.content.2.input", "messages.2.content.0.is_error"}),
        (MessagesRequest, {"system.0.text", "tools.0.input_schema", "tool_choice.disable_parallel_tool_use"}),
    ):
        assert {(model, name) for name in names} <= reached
    assert len(CASES) > 300


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app = demo_app()
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def post(client: Client, route: str, body: Any) -> tuple[int, Any]:
    response = await client.post(route, data=json.dumps(body), headers={"Content-Type": "application/json"})
    return response.status_code, await response.get_json()


@pytest.mark.parametrize(("route", "model", "bodies"), ROUTES, ids=[f"{r}:{m.__name__}" for r, m, _ in ROUTES])
async def test_every_wrong_json_type_is_a_400_naming_the_field(
    client: Client, route: str, model: type[BaseModel], bodies: list[dict[str, Any]]
) -> None:
    for body in bodies:  # the valid bodies are served
        status, reply = await post(client, route, {"max_tokens": 1} | body if "completions" in route else body)
        assert status == 200, reply
    failures = []
    for case_route, case_model, body, path, wrong in CASES:
        if (case_route, case_model) != (route, model):
            continue
        status, reply = await post(client, route, with_value(body, path, SAMPLES[wrong]))
        error = reply.get("error", {}) if isinstance(reply, dict) else {}
        # Anthropic's errors have no param: its message starts with the field's path.
        named = error.get("param") or str(error.get("message", "")).split(":")[0]
        if status != 400 or named != dotted(path) or error.get("type") != "invalid_request_error":
            failures.append((dotted(path), wrong, status, error))
    assert not failures


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant"}]}, "messages.1.content"),
        ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "c"}]}, "messages.0.content"),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": USER, "user": 1}, "user"),
        ("/v1/chat/completions", {"messages": USER, "top_k": True}, "top_k"),  # an extension, strict too
        ("/v1/chat/completions", {"messages": USER, "n": 1.5}, "n"),
        ("/v1/completions", {"prompt": "x", "stream": "true"}, "stream"),
        ("/v1/completions", {"prompt": [1, "2"]}, "prompt.0"),  # no member of the union takes the list
        ("/v1/responses", {"input": "x", "stream": 1}, "stream"),
        ("/v1/responses", {"input": "x", "seed": "1"}, "seed"),  # an extension passed on to chat
        ("/tokenize", {"messages": [{"role": "system"}]}, "messages.0.content"),
    ],
)
async def test_the_reported_cases_are_400s(client: Client, route: str, body: dict[str, Any], param: str) -> None:
    status, reply = await post(client, route, body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error", reply


async def test_an_assistant_turn_with_tool_calls_may_omit_content(client: Client) -> None:
    status, reply = await post(client, "/v1/chat/completions", {"messages": HISTORY, "max_tokens": 1})
    assert status == 200, reply


VALUES = {
    "null": st.none(),
    "boolean": st.booleans(),
    "integer": st.integers(-(2**40), 2**40),
    "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    "string": st.text(max_size=8) | st.sampled_from(["true", "1", "2.5", "null", "[]"]),
    "array": st.lists(st.integers() | st.text(max_size=3), max_size=3),
    "object": st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
}


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_any_value_of_a_wrong_type_is_refused_naming_the_field(data: st.DataObject) -> None:
    """The property at the validation the routes run (`parse`), with arbitrary values of the wrong type."""
    _, model, body, path, wrong = data.draw(st.sampled_from(CASES))
    value = data.draw(VALUES[wrong])
    with pytest.raises(InvalidRequest) as caught:
        parse(model, with_value(body, path, value))
    assert caught.value.status == 400 and caught.value.param == dotted(path)
