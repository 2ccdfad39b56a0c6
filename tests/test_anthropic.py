"""``POST /v1/messages`` (Anthropic's Messages API) through the real `anthropic` SDK against a real Hypercorn.

The SDK parses every message and event into its own models, so a missing or mistyped field fails here, not
in a client (Claude Code and other agent tools). The servers require an API key, which the SDK sends as
``x-api-key``. The models have random weights: the tests check shapes, counts, the chat template's rendering
of the conversation (through ``input_tokens`` and ``count_tokens``), and what grammars guarantee.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import Served
from tests.test_tool_properties import TOOLSETS
from tests.threaded import served_in_thread
from tests.toolmodel import token, tool_app
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

KEY = "sk-local-test"
USER = [{"role": "user", "content": "Hello there"}]
SPACES = {str(ChatTokenizer(build_tokenizer()).encode(s)[0]): -100 for s in (" ", "\n", "\r", "\t")}
WEATHER = {
    "name": "get_weather",
    "description": "The forecast for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"enum": ["Ipoh", "Kuala Lumpur"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
    },
}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_in_thread(lambda: tool_app(api_key=[KEY])) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(api_key=KEY, base_url=served.url, max_retries=0) as client:
        yield client


def count(client: anthropic.Anthropic, **kwargs: Any) -> int:
    return client.messages.count_tokens(model="m", **kwargs).input_tokens


def test_a_plain_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="m", max_tokens=6, messages=USER, extra_body={"ignore_eos": True})
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["text"] and message.content[0].text
    assert message.usage.output_tokens == 6
    # Anthropic's input_tokens leave out what was read from the prefix cache; together they are the prompt.
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == count(client, messages=USER)


def test_a_streamed_message_has_the_event_sequence(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="m", max_tokens=5, messages=USER, extra_body={"ignore_eos": True}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]  # the SDK drops pings
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == count(client, messages=USER)


def test_the_system_prompt_and_tools_reach_the_template(client: anthropic.Anthropic) -> None:
    plain = count(client, messages=USER)
    with_system = count(client, messages=USER, system="You are terse.")
    as_blocks = count(client, messages=USER, system=[{"type": "text", "text": "You are terse."}])
    assert with_system == as_blocks > plain
    assert count(client, messages=USER, tools=[WEATHER]) > plain
    message = client.messages.create(model="m", max_tokens=1, system="You are terse.", messages=USER)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == with_system


def test_a_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model="m",
        max_tokens=200,
        messages=[{"role": "user", "content": "Weather in Ipoh?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"logit_bias": SPACES},
    )
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert first.stop_reason == "end_turn"  # a named tool: the call is the whole answer (chat's "stop")
    jsonschema.validate(call.input, WEATHER["input_schema"])
    history = [
        {"role": "user", "content": "Weather in Ipoh?"},
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 31 C"}]},
    ]
    second = client.messages.create(model="m", max_tokens=3, messages=history, tools=[WEATHER])
    prompt = second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0)
    assert prompt == count(client, messages=history, tools=[WEATHER])
    assert (second.usage.cache_read_input_tokens or 0) > 0  # the first turn's prefix came from the cache
    longer = [*history[:2], {"role": "user", "content": [history[2]["content"][0] | {"content": "sunny, 31 C, dry"}]}]
    assert count(client, messages=longer, tools=[WEATHER]) > prompt  # the result is rendered


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    greedy = {"extra_body": {"ignore_eos": True, "temperature": 0.0}}  # this SDK no longer takes temperature
    text = client.messages.create(model="m", max_tokens=12, messages=USER, **greedy).content[0].text
    stop = text[3:5]
    assert text.index(stop) == 3
    for stream in (False, True):
        if stream:
            with client.messages.stream(
                model="m", max_tokens=12, messages=USER, stop_sequences=[stop, "\x00never"], **greedy
            ) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(
                model="m", max_tokens=12, messages=USER, stop_sequences=[stop, "\x00never"], **greedy
            )
        assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
        assert message.content[0].text == text[:3]


def test_every_tool_use_input_validates() -> None:
    """Property: for any tool set, every ``tool_use`` block in ``auto``, ``any`` and named runs names one of
    the tools and its ``input`` matches that tool's schema, streamed and not."""
    with (
        served_in_thread(lambda: tool_app(api_key=[KEY])) as served,
        anthropic.Anthropic(api_key=KEY, base_url=served.url, max_retries=0) as client,
    ):

        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            toolset=TOOLSETS,
            mode=st.sampled_from(["auto", "any", "tool"]),
            stream=st.booleans(),
            seed=st.integers(0, 1000),
        )
        def check(
            toolset: list[tuple[str, tuple[dict[str, Any], dict[str, Any]]]], mode: str, stream: bool, seed: int
        ) -> None:
            # Each tool: the schema sent (objects may be left open) and the same schema with every object that
            # lists properties closed, which is what the server enforces and the call must validate against.
            tools = [{"name": name, "input_schema": sent} for name, (sent, _) in toolset]
            choice: dict[str, Any] = {"type": mode, "disable_parallel_tool_use": True}
            if mode == "tool":
                choice["name"] = toolset[0][0]
            request: dict[str, Any] = {
                "model": "m",
                "max_tokens": 400,
                "messages": [{"role": "user", "content": "go"}],
                "tools": tools,
                "tool_choice": choice,
                "extra_body": {"seed": seed, "logit_bias": {str(token("<tool_call>")): 100}},
            }
            if stream:
                with client.messages.stream(**request) as events:
                    message = events.get_final_message()
            else:
                message = client.messages.create(**request)
            calls = [block for block in message.content if block.type == "tool_use"]
            assert len(calls) == 1
            assert message.stop_reason == ("end_turn" if mode == "tool" else "tool_use")
            schemas = {name: closed for name, (_, closed) in toolset}
            if mode == "tool":
                assert calls[0].name == toolset[0][0]
            jsonschema.validate(calls[0].input, schemas[calls[0].name])

        check()


def test_thinking_blocks_with_a_thinking_template() -> None:
    with (
        served_in_thread(lambda: tool_app(thinking=True, api_key=[KEY])) as served,
        anthropic.Anthropic(api_key=KEY, base_url=served.url, max_retries=0) as client,
    ):
        request: dict[str, Any] = {
            "model": "m",
            "max_tokens": 40,
            "messages": USER,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "extra_body": {"seed": 3, "logit_bias": {str(token("</think>")): 6}},
        }
        message = client.messages.create(**request)
        kinds = [block.type for block in message.content]
        assert kinds[0] == "thinking" and message.content[0].thinking
        with client.messages.stream(**request) as stream:
            events = list(stream)
            streamed = stream.get_final_message()
        deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
        assert deltas[0] == "thinking_delta" and "signature_delta" in deltas
        assert streamed.content[0].type == "thinking" and streamed.content[0].thinking == message.content[0].thinking
        # Disabled: the template renders the block closed and empty; the output is all answer.
        disabled = client.messages.create(**request | {"thinking": {"type": "disabled"}})
        assert all(block.type == "text" for block in disabled.content)
        # Earlier thinking in the history is accepted.
        history = [*USER, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]}]
        client.messages.create(**request | {"messages": [*history, {"role": "user", "content": "more"}]})


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"messages": USER}, 400, "invalid_request_error"),  # no max_tokens
        ({"max_tokens": "5", "messages": USER}, 400, "invalid_request_error"),
        ({"max_tokens": 5, "messages": USER, "stream": "yes"}, 400, "invalid_request_error"),
        ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "invalid_request_error"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
        ),
        (
            {"max_tokens": 5, "messages": USER, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "x"}},
            400,
            "invalid_request_error",
        ),
        ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, 400, "invalid_request_error"),
        ({"max_tokens": 10**6, "messages": USER}, 400, "invalid_request_error"),
    ],
)
def test_bad_requests_are_anthropic_errors(
    served: Served, client: anthropic.Anthropic, body: dict[str, Any], status: int, kind: str
) -> None:
    reply = httpx.post(served.url + "/v1/messages", json={"model": "m", **body}, headers={"x-api-key": KEY}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == kind and error["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as caught:  # the SDK's own parsing of the error
        client.post("/v1/messages", cast_to=object, body={"model": "m", **body})
    assert caught.value.status_code == status and caught.value.body == error


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"tools": [{"name": "f", "input_schema": {"type": "wat"}}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools.0.name"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**6}, "messages"),  # context_length_exceeded
    ],
)
def test_errors_name_the_field_as_this_api_names_it(served: Served, body: dict[str, Any], named: str) -> None:
    request = {"model": "m", "max_tokens": 5, "messages": USER} | body
    reply = httpx.post(served.url + "/v1/messages", json=request, headers={"x-api-key": KEY}, timeout=60)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert named in message and "function." not in message and "max_completion_tokens" not in message, message


def test_unknown_paths_under_messages_are_anthropic_errors(served: Served) -> None:
    reply = httpx.post(served.url + "/v1/messages/batches", json={}, headers={"x-api-key": KEY}, timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"


def test_auth_with_x_api_key_or_bearer(served: Served) -> None:
    with (
        anthropic.Anthropic(api_key="wrong", base_url=served.url, max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        wrong.messages.create(model="m", max_tokens=1, messages=USER)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    body = {"model": "m", "max_tokens": 1, "messages": USER}
    headers = {"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01", "anthropic-beta": "x"}
    assert httpx.post(served.url + "/v1/messages", json=body, headers=headers, timeout=60).status_code == 200
    missing = httpx.post(served.url + "/v1/messages", json=body, timeout=60)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    # The OpenAI routes keep OpenAI's error shape.
    openai_shape = httpx.post(served.url + "/v1/chat/completions", json={"messages": USER}, timeout=60).json()
    assert set(openai_shape["error"]) == {"message", "type", "param", "code"}


def test_the_raw_stream_pings_after_message_start(served: Served) -> None:
    body = {"model": "m", "max_tokens": 2, "messages": USER, "stream": True}
    with httpx.stream("POST", served.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as reply:
        names = [line.removeprefix("event: ") for line in reply.iter_lines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"] and names[-1] == "message_stop"


def test_a_deadline_ends_the_stream_with_an_error_event(served: Served) -> None:
    body = {
        "model": "m",
        "max_tokens": 1500,
        "messages": USER,
        "stream": True,
        "ignore_eos": True,
        "request_timeout": 0.05,
    }
    with httpx.stream("POST", served.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    last = json.loads(lines[-1].removeprefix("data: "))
    assert (
        last["type"] == "error"
        and last["error"]["type"] == "api_error"
        and "deadline" in last["error"]["message"].lower()
    )
    reply = httpx.post(
        served.url + "/v1/messages", json=body | {"stream": False}, headers={"x-api-key": KEY}, timeout=60
    )
    assert reply.status_code == 504 and reply.json()["type"] == "error"
