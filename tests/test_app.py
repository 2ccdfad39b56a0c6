"""The HTTP surface in-process (Quart-Trio's test client) on the real tiny model: shapes and errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from tests.servers import demo_app
from trioserve.api.serving import MAX_REPORTED_UNKNOWN

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app = demo_app(max_body_bytes=64 * 1024)
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def post(client: Client, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> tuple[int, Any]:
    response = await client.post(
        path,
        data=body if isinstance(body, (bytes, str)) else json.dumps(body),
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
        **kw,
    )
    return response.status_code, await response.get_json()


def assert_openai_error(payload: Any, *, param: str | None = None) -> None:
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["message"]
    if param is not None:
        assert payload["error"]["param"] == param


async def test_health_and_models(client: Client) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert (await health.get_json())["status"] == "ok"
    for path in ("/v1/models", "/models"):
        models = await (await client.get(path)).get_json()
        assert models["object"] == "list"
        assert [m["id"] for m in models["data"]] == ["trioserve-tiny-random"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
async def test_non_streaming_shape(client: Client, path: str) -> None:
    status, body = await post(client, {"model": "anything", "messages": MESSAGES, "max_tokens": 4}, path)
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "trioserve-tiny-random"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == 21
    assert 1 <= usage["completion_tokens"] <= 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streaming_sse_framing(client: Client) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = (await response.get_data()).decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


async def test_stop_string_is_honoured_and_never_shown(client: Client) -> None:
    status, first = await post(client, {"messages": MESSAGES, "max_tokens": 30, "temperature": 0, "ignore_eos": True})
    text = first["choices"][0]["message"]["content"]
    stop = text[5:7]
    assert status == 200 and len(stop) == 2
    status, second = await post(
        client, {"messages": MESSAGES, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    )
    assert second["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert second["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": MESSAGES, "max_tokens": -1}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": "ten"}, "max_tokens"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"messages": MESSAGES, "max_tokens": 5000}, "messages"),
        ({"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "response_format"),
        ({"messages": MESSAGES, "tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"messages": MESSAGES, "response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    ],
)
async def test_bad_input_is_a_400_openai_error(client: Client, body: Any, param: str) -> None:
    status, payload = await post(client, body)
    assert status == 400
    assert_openai_error(payload, param=param)


async def test_context_length_error_uses_openai_wording(client: Client) -> None:
    status, payload = await post(client, {"messages": MESSAGES, "max_tokens": 5000})
    assert status == 400
    assert payload["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in payload["error"]["message"]


@pytest.mark.parametrize("raw", [b"{bad json", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b""])
async def test_malformed_bodies(client: Client, raw: bytes) -> None:
    status, payload = await post(client, raw)
    assert status == 400
    assert_openai_error(payload)


async def test_wrong_content_type_too_large_unknown_route(client: Client) -> None:
    response = await client.post("/v1/chat/completions", data="messages=x", headers={"Content-Type": "text/plain"})
    assert response.status_code == 400
    assert_openai_error(await response.get_json())
    status, payload = await post(client, {"messages": [{"role": "user", "content": "x" * 70000}]})
    assert status == 413
    assert_openai_error(payload)
    missing = await client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert_openai_error(await missing.get_json())
    wrong_method = await client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert_openai_error(await wrong_method.get_json())


async def test_request_id_is_echoed(client: Client) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, headers={"X-Request-Id": "abc-123"}
    )
    assert response.headers["X-Request-Id"] == "abc-123"
    assert (await response.get_json())["id"] == "abc-123"


async def test_unknown_fields_are_accepted_and_logged_once(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(3):
        status, _ = await post(client, {"messages": MESSAGES, "max_tokens": 1, "frobnicate": True, "tools_x": []})
        assert status == 200
    logged = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert logged == ["ignoring request fields this server does not know: frobnicate, tools_x"]


async def test_unknown_field_names_are_remembered_up_to_a_bound(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    # Field names are the client's to choose: the names already logged (kept to log each once) must not
    # grow without end. Past the bound, new names are still accepted, just no longer logged or kept.
    for batch in range(3):
        names = {f"field_{batch}_{i}": 1 for i in range(MAX_REPORTED_UNKNOWN // 2)}
        status, _ = await post(client, {"messages": MESSAGES, "max_tokens": 1, **names})
        assert status == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "trioserve.api.serving"]
    logged = [name for m in messages if "does not know" in m for name in m.split(": ", 1)[1].split(", ")]
    assert len(logged) == len(set(logged)) == MAX_REPORTED_UNKNOWN
    assert sum("further ones are not logged" in m for m in messages) == 1
