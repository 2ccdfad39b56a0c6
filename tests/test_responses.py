"""``POST /v1/responses`` through the official `openai` SDK against a real server on loopback.

Every object and event is also parsed strictly with the SDK's own models (`Response.model_validate`,
the `ResponseStreamEvent` union), so a missing or mistyped field fails here, not in a client. The demo
model has random weights: what it says is noise, so the tests check shapes, counts, the chat template's
rendering of the conversation (through ``usage.input_tokens``), and what grammars guarantee.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from tests.servers import Served
from tests.threaded import served_in_thread
from tests.toolmodel import tool_app
from trioserve.api.responses.protocol import Response as OurResponse
from trioserve.api.responses.protocol import dump_event
from trioserve.api.responses.store import ResponseStore
from trioserve.api.responses.stream import EventWriter
from trioserve.api.toolcalls import FunctionCallDelta, ToolCallDelta
from trioserve.config import load_settings
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

TOKENIZER = ChatTokenizer(build_tokenizer())
EOS = TOKENIZER.hf.convert_tokens_to_ids("<|im_end|>")
# Grammars allow any whitespace between JSON tokens and a random model writes a lot: bias it away.
COMPACT = {"logit_bias": {str(TOKENIZER.encode(space)[0]): -100 for space in (" ", "\n", "\r", "\t")}}
STREAM_EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The forecast for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"enum": ["Ipoh", "Kuala Lumpur"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_in_thread(max_concurrent=8) as served:
        yield served


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
        yield client


def post(served: Served, body: dict[str, Any], path: str = "/v1/responses") -> httpx.Response:
    return httpx.post(served.url + path, json={"model": "m", **body}, timeout=120)


def raw_events(served: Served, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSE events as sent, each checked against the SDK's event union and its ``event:`` line."""
    events = []
    body = {"model": "m", "stream": True, **body}
    with httpx.stream("POST", served.url + "/v1/responses", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in reply.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                assert data["type"] == name
                STREAM_EVENTS.validate_python(data)
                events.append(data)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    return len(TOKENIZER.encode_chat(messages, tools=tools))


def test_a_text_input_with_instructions(served: Served, client: openai.OpenAI) -> None:
    response = client.responses.create(model="m", input="Hello there", instructions="Be brief.", max_output_tokens=6)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.output_text == message.content[0].text
    assert response.instructions == "Be brief." and response.max_output_tokens == 6
    usage = response.usage
    assert usage is not None and usage.output_tokens == 6
    expected = prompt_tokens([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert usage.input_tokens == expected and usage.total_tokens == expected + 6
    # The wire JSON parses strictly with the SDK's model, and GET returns the same object.
    raw = post(served, {"input": "Hi", "max_output_tokens": 3}).json()
    Response.model_validate(raw)
    again = httpx.get(f"{served.url}/v1/responses/{raw['id']}").json()
    assert again == raw


def test_an_answer_ended_by_the_model_is_completed(client: openai.OpenAI) -> None:
    # EOS made certain: the answer is empty and complete, and still a message item.
    response = client.responses.create(model="m", input="Hi", extra_body={"logit_bias": {str(EOS): 100}})
    assert response.status == "completed" and response.incomplete_details is None
    assert [item.type for item in response.output] == ["message"] and response.output_text == ""
    assert response.usage is not None and response.usage.output_tokens == 1


def test_message_items_with_content_parts(client: openai.OpenAI) -> None:
    conversation = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Bon"}, {"type": "input_text", "text": "jour"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Salut"}]},
        {"role": "user", "content": "Encore"},
    ]
    response = client.responses.create(model="m", input=conversation, max_output_tokens=2)  # type: ignore[arg-type]
    expected = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Encore"},
    ]
    assert response.usage is not None and response.usage.input_tokens == prompt_tokens(expected)


def test_streamed_events_in_order(served: Served, client: openai.OpenAI) -> None:
    events = raw_events(served, {"input": "Hello", "max_output_tokens": 5})
    kinds = [e["type"] for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    final = events[-1]["response"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert final["output"][0]["content"][0]["text"] == deltas == events[-4]["text"]
    assert final["usage"]["output_tokens"] == 5
    assert httpx.get(f"{served.url}/v1/responses/{final['id']}").json() == final
    # The SDK's own stream helper assembles the same thing (for a completed response: 3 tokens, then EOS).
    ended = {"min_tokens": 3, "logit_bias": {str(EOS): 100}}
    with client.responses.stream(model="m", input="Hello", max_output_tokens=9, extra_body=ended) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final_response = stream.get_final_response()
    assert final_response.output_text == text and final_response.status == "completed"
    assert final_response.usage is not None and final_response.usage.output_tokens == 4


def test_previous_response_id_continues_the_conversation(served: Served, client: openai.OpenAI) -> None:
    first = client.responses.create(model="m", input="One", instructions="Only for the first turn", max_output_tokens=3)
    second = client.responses.create(model="m", input="Two", previous_response_id=first.id, max_output_tokens=3)
    # The history (input and output of the first turn) is replayed; the first turn's instructions are not.
    history = [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Two"},
    ]
    assert second.previous_response_id == first.id
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(history)
    third = client.responses.create(model="m", input="Three", previous_response_id=second.id, max_output_tokens=1)
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Three"}]
    assert third.usage is not None and third.usage.input_tokens == prompt_tokens(history)

    unstored = client.responses.create(model="m", input="x", store=False, max_output_tokens=1)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="m", input="y", previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found" and caught.value.param == "previous_response_id"
    assert httpx.get(f"{served.url}/v1/responses/{unstored.id}").status_code == 404
    assert httpx.delete(f"{served.url}/v1/responses/{first.id}").json()["deleted"] is True
    assert httpx.get(f"{served.url}/responses/{first.id}").status_code == 404


def test_the_store_is_bounded_and_least_recently_used_goes_first() -> None:
    store = ResponseStore(2)

    def response(name: str) -> OurResponse:
        return OurResponse.model_validate(
            {
                "id": name,
                "created_at": 0,
                "status": "completed",
                "model": "m",
                "parallel_tool_calls": True,
                "store": True,
                "temperature": 1,
                "text": {},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1,
            }
        )

    store.put(response("a"), [])
    store.put(response("b"), [])
    assert store.get("a") is not None  # a is now the most recently used
    store.put(response("c"), [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    empty = ResponseStore(0)
    empty.put(response("a"), [])
    assert empty.get("a") is None


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=10**6)  # bounded: a random model's digits never run on


def test_text_format_json_schema_through_the_sdks_parse(client: openai.OpenAI) -> None:
    # No max_output_tokens: a value cut short would not parse (the grammar ends it, with EOS, once complete).
    parsed = client.responses.parse(model="m", input="A city?", text_format=City, extra_body=COMPACT)
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, City)
    streamed = raw_json_object(client)
    assert isinstance(streamed, dict)


def raw_json_object(client: openai.OpenAI) -> Any:
    # Any JSON object is allowed, and a random model would add keys until the context is full: "}" is
    # biased so the object closes as soon as the grammar allows it.
    close = {"logit_bias": {**COMPACT["logit_bias"], str(TOKENIZER.encode("}")[0]): 100}}
    response = client.responses.create(
        model="m", input="JSON?", text={"format": {"type": "json_object"}}, stream=True, extra_body=close
    )
    final = [e for e in response if e.type in ("response.completed", "response.incomplete")][-1].response
    assert final.text is not None and final.text.format is not None and final.text.format.type == "json_object"
    return json.loads(final.output_text)


def check_weather(arguments: str) -> None:
    value = json.loads(arguments)
    assert list(value) == ["city", "days"] and value["city"] in ("Ipoh", "Kuala Lumpur") and 1 <= value["days"] <= 7


def test_a_required_function_call_and_its_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="m", input="Weather in Ipoh?", tools=[WEATHER], tool_choice="required", extra_body=COMPACT
    )  # type: ignore[list-item]
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    check_weather(call.arguments)
    chat_tool = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    assert first.usage is not None
    assert first.usage.input_tokens == prompt_tokens([{"role": "user", "content": "Weather in Ipoh?"}], [chat_tool])

    # Round trip, stateless: the client sends the call back with its output.
    items = [
        {"role": "user", "content": "Weather in Ipoh?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 31 C"},
    ]
    second = client.responses.create(model="m", input=items, tools=[WEATHER], tool_choice="none", max_output_tokens=3)  # type: ignore[arg-type,list-item]
    assert [item.type for item in second.output] == ["message"]
    rendered = [
        {"role": "user", "content": "Weather in Ipoh?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.call_id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.loads(call.arguments)},
                }
            ],
        },
        {"role": "tool", "content": "sunny, 31 C", "tool_call_id": call.call_id},
    ]
    assert second.usage is not None and second.usage.input_tokens == prompt_tokens(rendered)
    # Stateful: the same through previous_response_id.
    third = client.responses.create(
        model="m",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 31 C"}],
        max_output_tokens=3,
    )
    assert third.usage is not None and third.usage.input_tokens == second.usage.input_tokens


def test_a_named_function_call_streamed(served: Served) -> None:
    choice = {"type": "function", "name": "get_weather"}
    events = raw_events(served, {"input": "Weather?", "tools": [WEATHER], "tool_choice": choice, **COMPACT})
    kinds = [e["type"] for e in events]
    assert "response.output_text.delta" not in kinds  # nothing of the call leaks as text
    added = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert added["type"] == "function_call" and added["name"] == "get_weather" and added["status"] == "in_progress"
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == arguments and done["item_id"] == added["id"]
    check_weather(arguments)
    final = events[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["output"][0]["call_id"] == added["call_id"]
    assert final["response"]["tool_choice"] == choice


def test_a_deadline_fails_the_stream_and_is_a_504_otherwise(served: Served) -> None:
    body = {"input": "Go on", "max_output_tokens": 1500, "ignore_eos": True, "request_timeout": 0.05}
    events = raw_events(served, body)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["code"] == "request_timeout"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert httpx.get(f"{served.url}/v1/responses/{failed['id']}").status_code == 404  # not stored
    reply = post(served, body)
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        (  # the demo model is a text-only one
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": "u"}],
                    }
                ]
            },
            "input[0].content[1]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].file_id",
        ),
        (
            {"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0]",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": [{"type": "function_call", "call_id": 1, "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": []}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "max_output_tokens": 10**6}, "input"),  # context_length_exceeded, as chat's "messages"
        ({"input": "x" * 5000}, "input"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "nope"}}}},
            "text.format.schema",
        ),
        ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
        ({"input": "x", "temperature": 3}, "temperature"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_param(served: Served, body: dict[str, Any], param: str) -> None:
    reply = post(served, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def settle(served: Served) -> None:
    """Waits (real time: the server runs in its own thread) until nothing runs and no KV is held."""
    runner = served.engine.runner
    assert runner is not None
    deadline = time.monotonic() + 10
    while served.engine.active or runner.live_sequences():
        assert time.monotonic() < deadline, "the request was not released"
        time.sleep(0.01)


def test_a_disconnect_mid_stream_releases_the_request(served: Served) -> None:
    body = {"model": "m", "input": "Go on", "stream": True, "max_output_tokens": 1500, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/responses", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        while "response.output_text.delta" not in next(lines):
            pass
        assert served.engine.active == 1
    settle(served)


def test_admission_is_shared_with_chat_429_before_any_byte() -> None:
    with served_in_thread(max_concurrent=1, max_queue=0) as served:
        body = {"model": "m", "input": "Go on", "stream": True, "max_output_tokens": 1500, "ignore_eos": True}
        with httpx.stream("POST", served.url + "/v1/responses", json=body, timeout=60) as busy:
            assert busy.status_code == 200
            refused = post(served, {"input": "Me too", "stream": True})
            assert refused.status_code == 429 and refused.headers["retry-after"]
            assert refused.json()["error"]["type"] == "rate_limit_error"
        settle(served)


def test_the_event_writer_orders_reasoning_text_and_calls() -> None:
    # Pure: the chat deltas a reasoning model's streamed call would give (reasoning, text, two calls whose
    # arguments arrive in fragments), each event checked with the SDK's union.
    writer = EventWriter()
    events = [
        *writer.reasoning("Let me "),
        *writer.reasoning("think."),
        *writer.text("Checking."),
        *writer.call(ToolCallDelta(index=0, id="call_a", type="function", function=FunctionCallDelta(name="f"))),
        *writer.call(ToolCallDelta(index=0, function=FunctionCallDelta(arguments='{"x": '))),
        *writer.call(ToolCallDelta(index=1, id="call_b", type="function", function=FunctionCallDelta(name="g"))),
        *writer.call(ToolCallDelta(index=0, function=FunctionCallDelta(arguments="1}"))),
        *writer.finish("completed"),
    ]
    data = [dump_event(event) for event in events]
    for item in data:
        STREAM_EVENTS.validate_python(item)
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert [(d["type"], d.get("output_index")) for d in data if "output_item" in d["type"]] == [
        ("response.output_item.added", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.output_item.added", 3),
        ("response.output_item.done", 2),
        ("response.output_item.done", 3),
    ]
    output = writer.output()
    assert [item.type for item in output] == ["reasoning", "message", "function_call", "function_call"]
    reasoning, message, first, second = output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Let me think."
    assert message.type == "message" and message.content[0].text == "Checking."
    assert first.type == "function_call" and (first.call_id, first.name, first.arguments) == ("call_a", "f", '{"x": 1}')
    assert second.type == "function_call" and (second.call_id, second.arguments) == ("call_b", "")
    assert "logprobs" not in next(d for d in data if d["type"] == "response.reasoning_text.delta")


def test_thinking_becomes_a_reasoning_item() -> None:
    with served_in_thread(functools.partial(tool_app, thinking=True)) as served:
        # The template opens the thinking block: six tokens stay inside it (a random model rarely closes it).
        with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
            response = client.responses.create(model="m", input="Hi", max_output_tokens=6)
        reasoning = response.output[0]
        assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
        assert response.usage is not None and 1 <= response.usage.output_tokens_details.reasoning_tokens <= 6
        events = raw_events(served, {"input": "Hi", "max_output_tokens": 6})
        kinds = [e["type"] for e in events]
        assert kinds[2] == "response.output_item.added" and events[2]["item"]["type"] == "reasoning"
        assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds


def test_the_store_size_is_a_flag_and_bounds_previous_response_id() -> None:
    assert load_settings(["--responses-store-size", "3"], {}).responses_store_size == 3
    assert load_settings([], {"RESPONSES_STORE_SIZE": "0"}).responses_store_size == 0
    with served_in_thread(responses_store_size=1) as served:
        first = post(served, {"input": "a", "max_output_tokens": 1}).json()
        second = post(served, {"input": "b", "max_output_tokens": 1}).json()
        assert (
            post(served, {"input": "c", "previous_response_id": second["id"], "max_output_tokens": 1}).status_code
            == 200
        )
        evicted = post(served, {"input": "c", "previous_response_id": first["id"]})
        assert evicted.status_code == 400 and evicted.json()["error"]["code"] == "previous_response_not_found"
