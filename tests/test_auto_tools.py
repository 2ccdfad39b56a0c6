"""Tools in ``tool_choice`` "auto", calls with ``response_format``, nested schemas and the reasoning split,
through the official `openai` SDK against a real Hypercorn.

The model is random, so its choice between text and a call is driven with ``logit_bias`` on the trigger
token (`tests.toolmodel`: the demo model's tokenizer plus Qwen's ``<tool_call>``/``<think>`` tokens); what
comes after the trigger is the grammar's doing, and every call must parse and validate.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.servers import Served, chat, serve_on_loopback, with_sdk
from tests.toolmodel import token, tool_app

pytestmark = pytest.mark.socket

ASK = [{"role": "user", "content": "What will the weather be?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
CLOCK_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "MYT"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": CLOCK_PARAMETERS}}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": CLOCK_PARAMETERS}


def call_bias() -> dict[str, int]:
    return {str(token("<tool_call>")): 100}


@pytest.fixture
async def tools_served() -> AsyncIterator[Served]:
    async with serve_on_loopback(tool_app()) as served:
        yield served


@pytest.fixture
async def thinking_served() -> AsyncIterator[Served]:
    async with serve_on_loopback(tool_app(thinking=True)) as served:
        yield served


def check_call(name: str, arguments: str, schemas: dict[str, Any] = SCHEMAS) -> None:
    jsonschema.validate(json.loads(arguments), schemas[name])


def streamed_calls(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], list[str]]:
    """Content, calls by index (id, name, arguments joined) and finish reasons of a streamed choice 0."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.function.arguments == ""
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return content, calls, finishes


async def test_auto_answers_in_text_unless_the_model_calls(tools_served: Served) -> None:
    text = await chat(tools_served, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=8, seed=1)
    assert text.choices[0].message.tool_calls is None and text.choices[0].message.content
    # The tools were shown: the prompt is longer than without them.
    bare = await chat(tools_served, messages=ASK, max_tokens=1)
    assert text.usage.prompt_tokens > bare.usage.prompt_tokens + 50
    called = await chat(
        tools_served, messages=ASK, tools=[WEATHER, CLOCK], logit_bias=call_bias(), parallel_tool_calls=False, seed=1
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_")
    check_call(call.function.name, call.function.arguments)


async def test_auto_calls_stream_name_first_then_arguments(tools_served: Served) -> None:
    chunks = await chat(
        tools_served,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        logit_bias=call_bias(),
        parallel_tool_calls=False,
        seed=2,
        stream=True,
    )
    content, calls, finishes = streamed_calls(chunks)
    assert content == "" and finishes == ["tool_calls"]
    assert list(calls) == [0]
    check_call(calls[0]["name"], calls[0]["arguments"])
    fragments = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or [] if d.id is None]
    assert len(fragments) > 1  # arguments arrive as they are generated, not at the end


@pytest.mark.parametrize("stream", [False, True])
async def test_parallel_calls_in_one_turn(tools_served: Served, stream: bool) -> None:
    # The biases make every choice open a call and, after each call, open another rather than end: several
    # calls until max_tokens cuts the last one. Complete calls are still calls; the one cut short is text
    # (not streamed), or left open with finish_reason "length" (streamed).
    bias = call_bias() | {"0": -100, "2": -100}  # the end-of-turn tokens, <|endoftext|> and <|im_end|>
    kwargs = {"messages": ASK, "tools": [CLOCK], "logit_bias": bias, "max_tokens": 130}
    if not stream:
        completion = await chat(tools_served, seed=4, **kwargs)
        counts = []
        for choice in completion.choices:
            calls = choice.message.tool_calls or []
            for call in calls:
                check_call(call.function.name, call.function.arguments)
            assert len({call.id for call in calls}) == len(calls)
            assert choice.finish_reason == "length"
            assert not choice.message.content or choice.message.content.startswith("<tool_call>")
            counts.append(len(calls))
        assert max(counts) >= 2
        return
    chunks = await chat(tools_served, seed=4, stream=True, **kwargs)
    per_choice: dict[int, list[Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            per_choice.setdefault(choice.index, []).append(type(chunk)(**chunk.model_dump() | {"choices": [choice]}))
    most = 0
    for choice_chunks in per_choice.values():
        _, calls, finishes = streamed_calls(choice_chunks)
        assert finishes == ["length"]
        *earlier, last = calls.values()
        for call in earlier:
            check_call(call["name"], call["arguments"])
        try:  # the last call may or may not have been cut short
            check_call(last["name"], last["arguments"])
            earlier.append(last)
        except json.JSONDecodeError:
            pass
        most = max(most, len(earlier))
    assert most >= 2


async def test_tools_with_a_response_format(tools_served: Served) -> None:
    answer = {
        "type": "object",
        "properties": {"summary": {"type": "string", "maxLength": 10}},
        "required": ["summary"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer, "strict": True}}
    for choice in ("required", "auto"):
        call = await chat(
            tools_served, messages=ASK, tools=[WEATHER], tool_choice=choice, response_format=fmt,
            logit_bias=call_bias(), parallel_tool_calls=False, seed=3,
        )  # fmt: skip
        (made,) = call.choices[0].message.tool_calls
        check_call(made.function.name, made.function.arguments)
    # Without the bias, in auto mode the answer must be the format's JSON (a bias against the call token
    # makes the text answer certain).
    text = await chat(
        tools_served, messages=ASK, tools=[WEATHER], response_format=fmt, seed=3,
        logit_bias={str(token("<tool_call>")): -100},
    )  # fmt: skip
    assert text.choices[0].message.tool_calls is None
    jsonschema.validate(json.loads(text.choices[0].message.content), answer)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    country: str = pydantic.Field(max_length=2)


class Trip(pydantic.BaseModel):
    origin: City
    stops: list[City] = pydantic.Field(max_length=2)


async def test_pydantic_function_tool_with_nested_models(tools_served: Served) -> None:
    tool = openai.pydantic_function_tool(Trip)
    assert "$defs" in json.dumps(tool)  # nested models are references, as pydantic writes them

    def parse(client: openai.OpenAI) -> Any:
        return client.chat.completions.parse(  # type: ignore[call-overload]
            model="m", messages=ASK, tools=[tool], logit_bias=call_bias(), parallel_tool_calls=False, seed=5
        )

    completion = await with_sdk(tools_served, parse)
    (call,) = completion.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Trip)


async def test_reasoning_is_split_from_the_answer(thinking_served: Served) -> None:
    # The template opens the thinking block; a bias on "</think>" closes it early in some choices. The same
    # seeded request on a server with --reasoning-parser none gives the raw output to compare with.
    kwargs = {"messages": ASK, "max_tokens": 16, "n": 4, "seed": 7, "logit_bias": {str(token("</think>")): 8}}
    completion = await chat(thinking_served, **kwargs)
    async with serve_on_loopback(tool_app(thinking=True, reasoning_parser="none")) as raw_served:
        raw = await chat(raw_served, **kwargs)
    both = 0
    for choice, unsplit in zip(completion.choices, raw.choices, strict=True):
        text = unsplit.message.content
        message = choice.message
        reasoning = message.model_extra.get("reasoning_content")
        assert not unsplit.message.model_extra.get("reasoning_content")
        if "</think>" in text:
            thought, answer = text.split("</think>", 1)
            assert (reasoning or "") == thought and message.content == answer.lstrip()
            both += bool(thought and answer.strip())
        else:
            assert reasoning == text and message.content == ""
    assert both >= 1
    chunks = await chat(thinking_served, stream=True, **kwargs)
    streamed: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            parts = streamed.setdefault(choice.index, ["", ""])
            parts[0] += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            parts[1] += choice.delta.content or ""
    for choice in completion.choices:  # same seed, same tokens: the same split, streamed
        assert streamed[choice.index] == [
            choice.message.model_extra.get("reasoning_content") or "",
            choice.message.content,
        ]


async def test_thinking_off_and_a_format_after_thinking(thinking_served: Served) -> None:
    off = await chat(
        thinking_served,
        messages=ASK,
        max_tokens=6,
        # min_tokens: a sampled EOS as the first token (about 1 run in 250) would leave no content to check.
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "min_tokens": 2},
    )
    assert off.choices[0].message.model_extra.get("reasoning_content") is None
    assert off.choices[0].message.content
    # A JSON format applies after the thinking: the answer parses, whatever was thought first.
    answer = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}}
    bias = {str(token("</think>")): 8}
    json_after = await chat(
        thinking_served, messages=ASK, max_tokens=40, response_format=fmt, logit_bias=bias, seed=2, n=2
    )
    finished = 0
    for choice in json_after.choices:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), answer)
            assert "</think>" not in (choice.message.model_extra.get("reasoning_content") or "")
            finished += 1
    assert finished >= 1


@pytest.mark.parametrize("stream", [False, True])
async def test_mistral_v11_calls_name_before_arguments(stream: bool) -> None:
    # Mistral's format from its v11 tokenizers, `[TOOL_CALLS]name[ARGS]{...}`: the name is outside the JSON.
    async with serve_on_loopback(tool_app(tool_call_parser="mistral_v11")) as served:
        bias = {str(token("[TOOL_CALLS]")): 100}
        kwargs = {"messages": ASK, "tools": [WEATHER, CLOCK], "logit_bias": bias, "parallel_tool_calls": False}
        if stream:
            content, calls, finishes = streamed_calls(await chat(served, seed=5, stream=True, **kwargs))
            assert content == "" and finishes == ["tool_calls"]
            ((call_id, name, arguments),) = [tuple(call.values()) for call in calls.values()]
        else:
            choice = (await chat(served, seed=5, **kwargs)).choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (call,) = choice.message.tool_calls
            call_id, name, arguments = call.id, call.function.name, call.function.arguments
        check_call(name, arguments)
        assert len(call_id) == 9 and call_id.isalnum()  # Mistral's templates take nothing else
