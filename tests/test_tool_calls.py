"""Forced tool calls (``tool_choice`` "required" or a named function) through the official `openai` SDK
against a real server: the call is sampled under a grammar, in the model's own call syntax (the demo model's
template teaches the Hermes ``<tool_call>`` one), so even the random demo model names a real tool with
arguments matching its schema."""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest

from tests.servers import Served, chat, with_sdk
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

TOKENIZER = ChatTokenizer(build_tokenizer())
ASK = [{"role": "user", "content": "What will the weather be?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "MYT"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert list(value) == ["city", "days"]
    assert isinstance(value["city"], str) and len(value["city"]) <= 12
    assert type(value["days"]) is int and 1 <= value["days"] <= 7


async def test_a_named_function_is_called_with_matching_arguments(served: Served) -> None:
    completion = await chat(served, messages=ASK, tools=[WEATHER, CLOCK], tool_choice=NAMED, n=3, seed=1)
    assert len(completion.choices) == 3
    ids = set()
    for choice in completion.choices:
        assert choice.finish_reason == "stop"  # OpenAI's finish reason for a named tool_choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        check_weather(call.function.arguments)
        ids.add(call.id)
    assert len(ids) == 3 and all(i.startswith("call_") for i in ids)
    # The model was shown the tool: the prompt holds its definition.
    shown = TOKENIZER.encode_chat(ASK, tools=[WEATHER])
    assert completion.usage.prompt_tokens == len(shown) > len(TOKENIZER.encode_chat(ASK))


async def test_required_calls_one_of_the_tools(served: Served) -> None:
    completion = await chat(
        served, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", n=6, seed=3, parallel_tool_calls=False
    )
    names = set()
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        names.add(call.function.name)
        if call.function.name == "get_weather":
            check_weather(call.function.arguments)
        else:
            assert json.loads(call.function.arguments)["zone"] in {"UTC", "MYT"}
    assert names <= {"get_weather", "get_time"}


async def test_a_streamed_call_arrives_as_name_then_argument_fragments(served: Served) -> None:
    chunks = await chat(served, messages=ASK, tools=[WEATHER], tool_choice=NAMED, seed=2, stream=True)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # nothing of the call leaks as text
    calls = [call for d in deltas for call in d.tool_calls or []]
    first, rest = calls[0], calls[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and first.function.arguments == ""
    assert len(rest) > 1 and all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    check_weather("".join(c.function.arguments for c in rest))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


async def test_a_call_cut_by_max_tokens_stays_text(served: Served) -> None:
    completion = await chat(served, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=20, seed=1)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is None
    assert choice.message.content.startswith('<tool_call>\n{"name":')


async def test_the_conversation_goes_on_after_a_call(served: Served) -> None:
    first = await chat(served, messages=ASK, tools=[WEATHER], tool_choice=NAMED, seed=5)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 31 C"},
    ]
    second = await chat(served, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5)
    assert second.choices[0].message.content is not None and second.choices[0].message.tool_calls is None
    # The earlier call reached the template with its arguments as a mapping (as templates expect), and with
    # "none" the tools themselves are not shown.
    rendered = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump() | {"function": {
            "name": call.function.name, "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "content": "sunny, 31 C", "tool_call_id": call.id},
    ]  # fmt: skip
    assert second.usage.prompt_tokens == len(TOKENIZER.encode_chat(rendered))


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    days: int = pydantic.Field(ge=1, le=7)


async def test_sdk_parse_with_a_pydantic_function_tool(served: Served) -> None:
    # The SDK's strict function tools: `parse` validates the call's arguments into the model.
    tool = openai.pydantic_function_tool(Forecast)
    choice = {"type": "function", "function": {"name": "Forecast"}}

    def parse(client: openai.OpenAI) -> Any:
        return client.chat.completions.parse(model="m", messages=ASK, tools=[tool], tool_choice=choice, seed=4)  # type: ignore[call-overload]

    completion = await with_sdk(served, parse)
    (call,) = completion.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Forecast)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "ignore_eos": True}, "ignore_eos"),
        ({"tools": [WEATHER], "ignore_eos": True}, "ignore_eos"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
                "tool_choice": "required",
            },
            "Invalid schema",
        ),
        ({"tools": [WEATHER], "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ],
)
async def test_bad_tool_requests_are_400(served: Served, body: dict[str, Any], fragment: str) -> None:
    extra = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "response_format")}
    kwargs = {k: v for k, v in body.items() if k in ("tools", "tool_choice", "response_format")}
    with pytest.raises(openai.BadRequestError) as caught:
        await chat(served, messages=ASK, extra_body=extra, **kwargs)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert fragment in error["message"]
    assert error["param"] is not None


async def test_a_bad_schema_is_blamed_on_its_own_tool(served: Served) -> None:
    broken = {"type": "function", "function": {"name": "broken", "parameters": {"$ref": "#/$defs/Missing"}}}
    for choice in ("auto", "required"):
        with pytest.raises(openai.BadRequestError) as caught:
            await chat(served, messages=ASK, tools=[WEATHER, broken], tool_choice=choice)
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == "tools[1].function.parameters"
        assert "Missing" in error["message"]
