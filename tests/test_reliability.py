"""Reliability: injected faults, fuzzed input, HTTP/2 resets, slow readers, and a short soak."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from bench.soak import rss_bytes, run_soak, settled
from tests.h2client import H2Client
from tests.kv import assert_kv_released
from tests.servers import FaultyRunner, demo_app, serve_on_loopback
from tests.strategies import json_values, schemas
from trioserve.server.app import TrioserveApp
from trioserve.types import StepOutput, StepPlan

CHAT = "/v1/chat/completions"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assert_openai_error(payload: Any) -> dict[str, Any]:
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = payload["error"]
    return error


@asynccontextmanager
async def clients(app: TrioserveApp) -> AsyncIterator[Client]:
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def test_failed_steps_fail_only_their_requests_and_release_them() -> None:
    app = demo_app(faulty=True)
    async with clients(app) as client:
        runner = app.engine.runner
        assert runner is not None
        generic = await client.post(CHAT, json={"messages": user("FAIL please"), "max_tokens": 5})
        assert generic.status_code == 500
        assert assert_openai_error(await generic.get_json())["type"] == "server_error"
        oom = await client.post(CHAT, json={"messages": user("FAIL-OOM please"), "max_tokens": 5})
        assert oom.status_code == 503
        assert assert_openai_error(await oom.get_json())["code"] == "out_of_memory"
        streamed = await client.post(CHAT, json={"messages": user("FAIL"), "max_tokens": 5, "stream": True})
        assert streamed.status_code == 200
        events = [e for e in (await streamed.get_data()).decode().split("\n\n") if e]
        assert_openai_error(json.loads(events[-1][6:]))
        assert_kv_released(app.engine)
        # The engine goes on serving.
        fine = await client.post(CHAT, json={"messages": user("fine"), "max_tokens": 5, "ignore_eos": True})
        assert fine.status_code == 200
        assert (await fine.get_json())["usage"]["completion_tokens"] == 5
        assert (await client.get("/health")).status_code == 200


class GatedFaultyRunner(FaultyRunner):
    """`FaultyRunner` whose failing step waits for `gate`: the test lines up bystanders meanwhile."""

    gate: threading.Event

    def _step(self, plan: StepPlan) -> StepOutput:
        if any("FAIL" in self.tokenizer.decode(self._prompt_of(plan, s)) for s in plan.seq_ids()):
            assert self.gate.wait(60), "the test never opened the gate"
        return super()._step(plan)


async def test_a_failed_step_spares_the_requests_it_does_not_carry() -> None:
    app = demo_app(faulty=True, max_concurrent=1)  # one at a time: the bystander waits while the step fails
    async with clients(app) as client:
        runner = app.engine.runner
        assert isinstance(runner, FaultyRunner)
        runner.__class__ = GatedFaultyRunner
        gate = runner.gate = threading.Event()  # type: ignore[attr-defined]
        answers: dict[str, Any] = {}

        async def post(name: str, text: str) -> None:
            body = {"messages": user(text), "max_tokens": 5, "ignore_eos": True}
            answers[name] = await client.post(CHAT, json=body)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, "doomed", "FAIL please")
                await until(lambda: app.engine.active == 1 and app.engine.waiting == 0)  # its step is running
                nursery.start_soon(post, "bystander", "fine")
                await until(lambda: app.engine.waiting == 1)
                gate.set()
        finally:
            gate.set()
        assert answers["doomed"].status_code == 500
        assert answers["bystander"].status_code == 200
        assert (await answers["bystander"].get_json())["usage"]["completion_tokens"] == 5
        assert_kv_released(app.engine)


async def test_a_runner_that_keeps_failing_turns_health_503() -> None:
    app = demo_app(faulty=True)
    async with clients(app) as client:
        for _ in range(3):
            await client.post(CHAT, json={"messages": user("FAIL"), "max_tokens": 2})
        health = await client.get("/health")
        assert health.status_code == 503
        assert (await health.get_json())["status"] == "failing"
        await client.post(CHAT, json={"messages": user("ok"), "max_tokens": 2})
        assert (await client.get("/health")).status_code == 200  # one good step and it is back


async def test_openapi_document_describes_the_api() -> None:
    async with clients(demo_app()) as client:
        doc = await (await client.get("/openapi.json")).get_json()
    assert doc["openapi"].startswith("3.")
    request_schema = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert "messages" in request_schema["required"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"} <= set(doc["paths"])
    assert "input" in doc["components"]["schemas"]["ResponsesRequest"]["properties"]


# -- fuzzing: bodies built from the schema's fields with values of any type ------------------------

FIELDS = [
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "truncate",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
]
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "developer", "x"]),
            "content": st.text(max_size=40) | json_values,
        }
    ),
    max_size=3,
)
response_formats = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": st.fixed_dictionaries(
                {"name": st.just("s"), "schema": schemas}, optional={"strict": st.booleans()}
            ),
        }
    ),
)
tool_bodies = st.fixed_dictionaries(
    {
        "messages": messages,
        "tools": st.lists(
            st.fixed_dictionaries(
                {
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": st.just("f"), "parameters": schemas}),
                }
            ),
            max_size=2,
        ),
        "tool_choice": st.sampled_from(["required", "auto", "none", {"type": "function", "function": {"name": "f"}}]),
    }
)
special = st.sampled_from(
    [
        {"n": 10**6},
        {"max_tokens": 10**9},
        {"logit_bias": {str(i): 1 for i in range(5000)}},
        {"stop": ["x"] * 1000},
        {"messages": user("y" * 5000)},
        {"temperature": float("inf")},
    ]
)
bodies = (
    st.fixed_dictionaries(
        {"messages": messages},
        optional={f: json_values for f in FIELDS if f != "messages"} | {"response_format": response_formats},
    )
    | tool_bodies
    | special
    | json_values
)
raw_bytes = st.sampled_from([b"\xff\xfe\xfd", b"[" * 100_000, b'{"messages": "\xc3"}', b"{" * 3 + b"}" * 3, b"null"])


def fuzz_app() -> TrioserveApp:
    return demo_app(request_timeout=3.0, max_body_bytes=256 * 1024)


async def check_no_server_error(client: Client, data: bytes, headers: dict[str, str] | None = None) -> None:
    with trio.fail_after(20):
        response = await client.post(CHAT, data=data, headers={"Content-Type": "application/json", **(headers or {})})
        body = await response.get_data()
    assert response.status_code < 500, body[:300]
    if response.status_code >= 400:
        assert_openai_error(json.loads(body))


@settings(max_examples=60, deadline=None)
@given(body=bodies, stream=st.booleans())
async def test_fuzzed_bodies_never_cause_5xx(body: Any, stream: bool) -> None:
    if isinstance(body, dict):
        # Valid limits are kept short (the point is the invalid ones): a request free to run to the context's
        # end may meet its deadline first on a busy machine, a 504 that is the server working as designed.
        for key in ("max_tokens", "max_completion_tokens"):
            if body.get(key) is None or (type(body[key]) is int and 4 < body[key] <= 10**6):
                body = body | {key: 4}
    if isinstance(body, dict) and isinstance(body.get("stream"), bool):
        body["stream"] = stream
    app = fuzz_app()
    async with clients(app) as client:
        await check_no_server_error(client, json.dumps(body, allow_nan=True).encode())
    assert app.engine.active == 0


@settings(max_examples=10, deadline=None)
@given(
    data=raw_bytes,
    content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1"]),
)
async def test_fuzzed_bytes_and_headers(data: bytes, content_type: str) -> None:
    async with clients(fuzz_app()) as client:
        await check_no_server_error(client, data, {"Content-Type": content_type, "X-Request-Timeout": "-1"})
        big = b'{"messages": [{"role": "user", "content": "' + b"z" * 300_000 + b'"}]}'
        response = await client.post(CHAT, data=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413


# -- HTTP/2: resets on one connection, and a slow reader --------------------------------------------


@pytest.mark.socket
async def test_h2_eight_streams_four_reset() -> None:
    app = demo_app(dtype="float64")  # float64: batched and solo greedy tokens are identical
    body = {"max_tokens": 30, "ignore_eos": True, "temperature": 0, "stream": True}
    # The reset streams ask for more than they could make before the reset is seen: a server that ignored
    # the resets would still be generating them long after the kept streams end.
    endless = body | {"max_tokens": 1500}
    async with serve_on_loopback(app) as served, trio.open_nursery() as nursery:
        client = await H2Client.connect(served.url, nursery)
        streams = [
            await client.post(
                CHAT, (endless if i % 2 else body) | {"messages": user(f"prompt {i}")}, {"x-request-id": f"r{i}"}
            )
            for i in range(8)
        ]
        for index, stream_id in enumerate(streams):
            if index % 2:
                await client.wait_for(stream_id, events=3)
                await client.reset(stream_id)
        finished = {i: await client.wait_for(s) for i, s in enumerate(streams) if i % 2 == 0}
        async with httpx.AsyncClient(timeout=60) as http:
            for index, state in finished.items():
                assert state.ended and state.events()[-1] == "data: [DONE]"
                chunks = [json.loads(e[6:]) for e in state.events()[:-1]]
                streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                solo = await http.post(
                    served.url + CHAT, json=body | {"stream": False, "messages": user(f"prompt {index}")}
                )
                assert streamed == solo.json()["choices"][0]["message"]["content"], index
        await settled(served.url)
        records = {r.request_id: r for r in app.engine.history}
        for index in range(1, 8, 2):
            # Left when reset ("closed"), long before its 1500 tokens: released, not run to the end.
            assert records[f"r{index}"].outcome == "closed", records[f"r{index}"]
            assert records[f"r{index}"].generated < 1500
        assert_kv_released(app.engine)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool], seconds: float = 60) -> None:
    """Polls ``condition`` on real time (real sockets), with a deadline generous for a busy machine."""
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)


@pytest.mark.socket
async def test_slow_reader_does_not_stall_others_and_releases_its_kv() -> None:
    app = demo_app(send_timeout=2.0)
    long = {"messages": user("slow"), "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with serve_on_loopback(app) as served, trio.open_nursery() as nursery:
        slow = await H2Client.connect(served.url, nursery, read=False)  # 1 KiB window, never acknowledged
        stalled = await slow.post(CHAT, long | {"x": 1})
        async with httpx.AsyncClient(timeout=60) as http:  # the bound is the fail_after
            with trio.fail_after(30):
                for _ in range(3):
                    quick = await http.post(served.url + CHAT, json={"messages": user("quick"), "max_tokens": 20})
                    assert quick.status_code == 200
            # The stalled request stopped at the backlog bound (holding a slot, not the device) and the send
            # timeout released it: its KV is gone though its client has read 1 KiB.
            with trio.fail_after(30):
                while app.engine.active:
                    await trio.sleep(0.05)
        assert app.engine.runner is not None and app.engine.runner.live_sequences() == 0
        (record,) = [r for r in app.engine.history if r.outcome == "closed"]
        assert record.generated < 400
        assert app.metrics.aborted.labels("stalled")._value.get() == 1
        assert len(slow.streams[stalled].data) <= 1024
        await until(lambda: slow.streams[stalled].reset)  # the server reset it (CANCEL): nobody read it
        await slow.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.socket
async def test_slow_reader_that_goes_away_is_let_go() -> None:
    app = demo_app()
    long = {"messages": user("slow"), "max_tokens": 100, "ignore_eos": True, "stream": True}
    async with serve_on_loopback(app) as served, trio.open_nursery() as nursery:
        slow = await H2Client.connect(served.url, nursery, read=False)
        gone = await slow.post(CHAT, long, {"x-request-id": "gone"})
        await until(lambda: any(r.request_id == "gone" for r in app.engine.history))
        assert app.generating, "the unread response is still being sent"
        await slow.reset(gone)  # it goes away: the response ends, nothing of it stays
        await until(lambda: not app.generating)
        assert_kv_released(app.engine)
        await slow.aclose()
        nursery.cancel_scope.cancel()


# -- soak -------------------------------------------------------------------------------------------


@pytest.mark.socket
@pytest.mark.slow
async def test_short_soak_loses_nothing() -> None:
    app = demo_app(max_concurrent=16, max_queue=512)
    async with serve_on_loopback(app) as served:
        await run_soak(served.url, 40, seed=1)  # warm-up
        before = rss_bytes()
        report = await run_soak(served.url, 300, concurrency=16, seed=7)
        health = await settled(served.url)
        growth_mb = (rss_bytes() - before) / 2**20
    assert report.ok, report.unexpected[:5]
    assert sum(report.outcomes.values()) == 300
    assert report.json_parsed > 0  # JSON-mode requests were in the mix, and those that finished parsed
    assert health["status"] == "ok"
    assert_kv_released(app.engine)
    assert growth_mb < 200, growth_mb
