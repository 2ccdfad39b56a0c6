"""Property: for any tool set (schemas with ``$defs`` references included), every call the server returns
in ``tool_choice`` auto, required or named mode parses and validates against its tool's schema, streamed
and not.

Hypothesis runs in a worker thread with the official (blocking) SDK, against one real server for the
whole property: the streamed path needs a real socket (the in-process test client buffers SSE bodies).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import serve_on_loopback
from tests.toolmodel import token, tool_app

pytestmark = pytest.mark.socket

# Leaf schemas that a random model completes quickly: bounded strings, ranges, enums, short arrays.
LEAVES = st.sampled_from(
    [
        {"type": "integer", "minimum": -5, "maximum": 99},
        {"type": "boolean"},
        {"type": "string", "maxLength": 4},
        {"enum": ["a", "b", 3]},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        {"type": "number", "minimum": 0, "maximum": 1},
    ]
)
NAMES = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=5)


@st.composite
def parameters(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """An object schema; some properties are ``$ref``s into ``$defs`` (as pydantic writes nested models).

    Returns the schema sent, and the same schema with every object closed (``"additionalProperties":
    false``) to validate against: the sent one leaves some objects open, as JSON Schema does by default,
    and the server closes them (README) so a call never carries arguments its function does not take.
    """
    keys = draw(st.lists(NAMES, min_size=0, max_size=3, unique=True))

    def object_schema(properties: dict[str, Any], required: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        schema = {"type": "object", "properties": properties, "required": required}
        closed = schema | {"additionalProperties": False}
        return (closed if draw(st.booleans()) else schema), closed

    sent_defs, closed_defs = {}, {}
    properties = {}
    for key in keys:
        leaf = draw(LEAVES)
        if draw(st.booleans()):
            sent_defs[f"D{key}"], closed_defs[f"D{key}"] = object_schema({"v": leaf}, ["v"])
            properties[key] = {"$ref": f"#/$defs/D{key}"}
        else:
            properties[key] = leaf
    sent, closed = object_schema(properties, keys)
    if sent_defs:
        sent, closed = sent | {"$defs": sent_defs}, closed | {"$defs": closed_defs}
    return sent, closed


TOOLSETS = st.lists(st.tuples(NAMES, parameters()), min_size=1, max_size=3, unique_by=lambda t: t[0])


async def test_every_returned_call_validates() -> None:
    async with serve_on_loopback(tool_app()) as served:
        client = openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0)
        bias = {str(token("<tool_call>")): 100}

        @settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            toolset=TOOLSETS,
            mode=st.sampled_from(["auto", "required", "named"]),
            stream=st.booleans(),
            seed=st.integers(0, 1000),
        )
        def check(
            toolset: list[tuple[str, tuple[dict[str, Any], dict[str, Any]]]], mode: str, stream: bool, seed: int
        ) -> None:
            tools = [{"type": "function", "function": {"name": n, "parameters": p}} for n, (p, _) in toolset]
            schemas = {name: closed for name, (_, closed) in toolset}
            choice: Any = {"type": "function", "function": {"name": toolset[0][0]}} if mode == "named" else mode
            request = {
                "model": "m",
                "messages": [{"role": "user", "content": "go"}],
                "tools": tools,
                "tool_choice": choice,
                "logit_bias": bias,
                "parallel_tool_calls": False,
                "max_tokens": 400,
                "seed": seed,
            }
            calls: list[tuple[str, str]] = []
            if stream:
                pending: dict[int, list[str]] = {}
                finish = None
                for chunk in client.chat.completions.create(stream=True, **request):
                    for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                        if delta.id is not None:
                            pending[delta.index] = [delta.function.name, ""]
                        else:
                            pending[delta.index][1] += delta.function.arguments
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                calls = [(name, arguments) for name, arguments in pending.values()]
            else:
                completion = client.chat.completions.create(**request)
                finish = completion.choices[0].finish_reason
                calls = [
                    (c.function.name, c.function.arguments) for c in completion.choices[0].message.tool_calls or []
                ]
            assert finish == ("stop" if mode == "named" else "tool_calls")
            assert len(calls) == 1
            for name, arguments in calls:
                if mode == "named":
                    assert name == toolset[0][0]
                jsonschema.validate(json.loads(arguments), schemas[name])

        try:
            await trio.to_thread.run_sync(check)
        finally:
            client.close()
