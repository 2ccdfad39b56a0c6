"""Real sockets: Hypercorn on loopback, the official openai SDK, httpx over HTTP/1.1, h2c and TLS+ALPN h2."""

from __future__ import annotations

import json
from contextlib import aclosing
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.h2client import H2Client
from tests.kv import assert_kv_released
from tests.servers import demo_app, serve_on_loopback, tls_files
from trioserve.engine.engine import Engine
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

MESSAGES = [{"role": "user", "content": "hello, what is good about malaysia"}]
LONG = {"model": "model", "messages": MESSAGES, "max_tokens": 1500, "ignore_eos": True, "stream": True}


async def read_events(response: httpx.Response, limit: int | None = None) -> list[str]:
    """The SSE ``data:`` lines of a response, stopping after ``limit`` of them."""
    events: list[str] = []
    async with aclosing(response.aiter_lines()) as lines:
        async for line in lines:
            if line.startswith("data: "):
                events.append(line)
                if len(events) == limit:
                    break
    return events


def prompt_tokens() -> int:
    return len(ChatTokenizer(build_tokenizer()).encode_chat(MESSAGES))


async def test_openai_sdk_non_streaming_and_streaming() -> None:
    async with serve_on_loopback(demo_app()) as served:
        client = openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0)

        def non_streaming() -> object:
            return client.chat.completions.create(
                model="model",
                messages=MESSAGES,
                max_tokens=12,
                temperature=0.1,
                top_p=0.95,
                extra_body={"ignore_eos": True},
            )

        completion = await trio.to_thread.run_sync(non_streaming)
        assert completion.id.startswith("chatcmpl-")  # type: ignore[attr-defined]
        assert completion.object == "chat.completion"  # type: ignore[attr-defined]
        assert completion.model == "trioserve-tiny-random"  # type: ignore[attr-defined]
        choice = completion.choices[0]  # type: ignore[attr-defined]
        assert choice.finish_reason == "length"
        assert choice.message.role == "assistant"
        usage = completion.usage  # type: ignore[attr-defined]
        assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens(), 12)
        assert usage.total_tokens == prompt_tokens() + 12

        def streaming() -> list[object]:
            stream = client.chat.completions.create(
                model="model",
                messages=MESSAGES,
                max_tokens=9,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            return list(stream)

        chunks = await trio.to_thread.run_sync(streaming)
        assert chunks[0].choices[0].delta.role == "assistant"  # type: ignore[attr-defined]
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]  # type: ignore[attr-defined]
        assert [c.choices[0].finish_reason for c in finals] == ["length"]  # type: ignore[attr-defined]
        assert chunks[-1].choices == []  # type: ignore[attr-defined]
        assert chunks[-1].usage.completion_tokens == 9  # type: ignore[attr-defined]
        assert chunks[-1].usage.prompt_tokens == prompt_tokens()  # type: ignore[attr-defined]
        assert len({c.id for c in chunks}) == 1  # type: ignore[attr-defined]

        def bad() -> None:
            client.chat.completions.create(model="model", messages=[], max_tokens=5)

        with pytest.raises(openai.BadRequestError) as info:
            await trio.to_thread.run_sync(bad)
        assert info.value.status_code == 400
        assert info.value.body["param"] == "messages"  # type: ignore[index]


async def test_h2c_stream_with_prior_knowledge() -> None:
    async with (
        serve_on_loopback(demo_app()) as served,
        httpx.AsyncClient(http1=False, http2=True, timeout=60) as client,
    ):
        body = {"messages": MESSAGES, "max_tokens": 6, "stream": True, "ignore_eos": True}
        async with client.stream("POST", served.url + "/v1/chat/completions", json=body) as response:
            assert response.http_version == "HTTP/2"
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = await read_events(response)
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


async def test_tls_negotiates_h2_through_alpn(tmp_path: Path) -> None:
    (certfile, keyfile), context = tls_files(tmp_path)
    async with serve_on_loopback(demo_app(), certfile=certfile, keyfile=keyfile) as served:
        assert served.url.startswith("https://")
        async with httpx.AsyncClient(http2=True, verify=context, timeout=60) as client:
            response = await client.post(
                served.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3}
            )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 3


async def assert_stops_within_one_step(engine: Engine, at_close: int | None) -> None:
    with trio.fail_after(30):  # the record appears once its KV is released (a bound for hangs, not speed)
        while not any(r.request_id == "watched" for r in engine.history):
            await trio.sleep(0.005)
    final = engine.forward_passes("watched")
    assert at_close is not None and final is not None
    assert final - at_close <= 1, (at_close, final)
    await trio.sleep(0.2)  # several more steps' worth: the count must stay put
    assert engine.forward_passes("watched") == final
    assert engine.history[-1].outcome == "closed"
    assert_kv_released(engine)


async def test_http1_close_stops_forward_passes_within_one_step() -> None:
    async with serve_on_loopback(demo_app(slow=True)) as served, httpx.AsyncClient(timeout=60) as client:
        engine = served.engine
        headers = {"X-Request-Id": "watched"}
        async with client.stream("POST", served.url + "/chat/completions", json=LONG, headers=headers) as response:
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            assert len(await read_events(response, 5)) == 5
            at_close = engine.forward_passes("watched")
        # Leaving the block closed the connection: an unfinished HTTP/1.1 response cannot be reused.
        await assert_stops_within_one_step(engine, at_close)


async def test_http2_stream_reset_stops_forward_passes_within_one_step() -> None:
    async with serve_on_loopback(demo_app(slow=True)) as served, trio.open_nursery() as nursery:
        engine = served.engine
        client = await H2Client.connect(served.url, nursery)
        stream_id = await client.post("/v1/chat/completions", LONG, {"x-request-id": "watched"})
        state = await client.wait_for(stream_id, events=5)
        assert state.status == 200
        at_close = engine.forward_passes("watched")
        await client.reset(stream_id)  # RST_STREAM(CANCEL); the connection stays open
        await assert_stops_within_one_step(engine, at_close)
        # The same connection still serves a new stream.
        again = await client.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3})
        finished = await client.wait_for(again)
        assert finished.status == 200 and json.loads(finished.data)["usage"]["completion_tokens"] <= 3
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_many_aborted_streams_leave_nothing_behind() -> None:
    async with serve_on_loopback(demo_app()) as served:
        engine = served.engine

        async def abort_one(client: httpx.AsyncClient, index: int) -> None:
            async with client.stream("POST", served.url + "/v1/chat/completions", json=LONG) as response:
                assert response.status_code == 200
                await read_events(response, 2 + index % 7)

        limiter = trio.CapacityLimiter(16)

        async def worker(index: int) -> None:
            async with limiter, httpx.AsyncClient(http2=index % 2 == 0, http1=index % 2 == 1, timeout=60) as client:
                await abort_one(client, index)

        async with trio.open_nursery() as nursery:
            for index in range(200):
                nursery.start_soon(worker, index)
        with trio.fail_after(30):  # a bound for hangs, not speed
            while engine.active:
                await trio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            health = (await client.get(served.url + "/health")).json()
        assert health["status"] == "ok"
        assert health["running"] == health["waiting"] == health["live_sequences"] == 0
        assert len([r for r in engine.history if r.outcome == "closed"]) == 200
        assert_kv_released(engine)
