"""Operations: admission (429), deadlines, drain, API keys, CORS, metrics."""

from __future__ import annotations

import functools
import gc
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve
from quart.typing import TestClientProtocol as Client

from tests.fakes import DECODE_SECONDS, PREFILL_SECONDS, FakeRunner
from tests.h2client import H2Client
from tests.servers import demo_app, server_process
from trioserve.api.chat import ChatService
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.engine.engine import Engine
from trioserve.errors import DeadlineExceeded
from trioserve.server.app import TrioserveApp
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, SamplingParams

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


@asynccontextmanager
async def open_client(app: TrioserveApp) -> AsyncIterator[Client]:
    async with app.test_app() as test_app:
        yield test_app.test_client()


@pytest.fixture
def full_app() -> TrioserveApp:
    """One slot, no queue."""
    return demo_app(max_concurrent=1, max_queue=0)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_queue_full_is_429_before_any_response(full_app: TrioserveApp, stream: bool) -> None:
    async with open_client(full_app) as client:
        engine = full_app.engine
        occupant = engine.submit(GenerationRequest("occupant", (5, 6, 7), SamplingParams(max_tokens=10_000)))
        response = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, "stream": stream})
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert response.headers["Content-Type"] == "application/json"
        error = (await response.get_json())["error"]
        assert error["type"] == "rate_limit_error"
        occupant.close()  # the slot is free again: the next request is served
        ok = await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, "stream": stream})
        assert ok.status_code == 200


async def test_deadline_cancels_with_exact_virtual_time(
    autojump_clock: trio.testing.MockClock, chat_tokenizer: ChatTokenizer
) -> None:
    runner = FakeRunner(tokenizer=chat_tokenizer, vocab_size=200)
    engine = Engine(lambda: runner, max_concurrent=2, max_queue=2, batch_size=2, offload=runner.offload)
    service = ChatService(engine)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        body = ChatCompletionRequest.model_validate({"messages": MESSAGES, "max_tokens": 1000})
        start = trio.current_time()
        prepared = await service.prepare(body, time_limit=0.0375)
        stream = engine.submit(prepared.generation)
        with pytest.raises(DeadlineExceeded):
            await service.complete(prepared, [stream])
        # The deadline fell inside the decode step [35, 40) ms: the wait ends at 37.5 ms exactly, then the
        # stream's exit waits out that step (its KV cannot go mid-step) and the KV is gone at 40 ms.
        assert trio.current_time() - start == pytest.approx(PREFILL_SECONDS + 6 * DECODE_SECONDS, abs=1e-9)
        gc.collect()
        assert runner.live_sequences() == 0
        record = engine.history[-1]
        assert record.outcome == "closed"
        assert record.left - start == pytest.approx(0.0375, abs=1e-9)
        assert record.release_seconds == pytest.approx(0.0025, abs=1e-9)
        assert prepared.timing.aborted == "deadline"
        nursery.cancel_scope.cancel()


async def test_deadline_over_http_is_504_without_retry_and_sse_error() -> None:
    app = demo_app(slow=True, request_timeout=0.2)
    async with open_client(app) as client:
        body = {"messages": MESSAGES, "max_tokens": 500, "ignore_eos": True}
        response = await client.post(CHAT, json=body)
        assert response.status_code == 504
        assert response.headers["x-should-retry"] == "false"
        assert (await response.get_json())["error"]["code"] == "request_timeout"
        shorter = await client.post(CHAT, json=body | {"stream": True}, headers={"X-Request-Timeout": "0.1"})
        assert shorter.status_code == 200
        events = [e for e in (await shorter.get_data()).decode().split("\n\n") if e]
        assert json.loads(events[-1][6:])["error"]["code"] == "request_timeout"
        assert app.engine.active == 0
        assert app.engine.runner is not None and app.engine.runner.live_sequences() == 0
        bad = await client.post(CHAT, json=body, headers={"X-Request-Timeout": "soon"})
        assert bad.status_code == 400


async def test_api_keys() -> None:
    app = demo_app(api_key=["k1", "k2"])
    async with open_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}):
            response = await client.get("/v1/models", headers=headers)
            assert response.status_code == 401
            error = (await response.get_json())["error"]
            assert error["code"] == "invalid_api_key"
        assert (await client.get("/metrics")).status_code == 401
        for key in ("k1", "k2"):
            assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        response = await client.post(
            CHAT, json={"messages": MESSAGES, "max_tokens": 2}, headers={"Authorization": "Bearer k2"}
        )
        assert response.status_code == 200
    public = demo_app(api_key=["k1"], metrics_public=True)
    async with open_client(public) as client:
        assert (await client.get("/metrics")).status_code == 200


async def test_cors_off_by_default_and_allowed_origins() -> None:
    async with open_client(demo_app()) as client:
        response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert "Access-Control-Allow-Origin" not in response.headers
    async with open_client(demo_app(cors_origin=["https://app.example"])) as client:
        ok = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert ok.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        preflight = await client.options(
            CHAT, headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 204
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_change_as_requests_run_and_abort() -> None:
    app = demo_app(slow=True, request_timeout=30)
    async with open_client(app) as client:
        before = (await (await client.get("/metrics")).get_data()).decode()
        for name in ("trioserve_requests_running", "trioserve_requests_waiting", "trioserve_kv_tokens"):
            assert metric(before, name) == 0
        assert metric(before, 'trioserve_aborted_requests_total{reason="deadline"}') == 0
        await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True})
        # 500 tokens at 30 ms a step or more take 15 s: the deadline always hits, after a first token even on a
        # busy machine (2 s leaves room for many slow steps).
        deadline = {"X-Request-Timeout": "2"}
        await client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 500, "ignore_eos": True}, headers=deadline)
        after = (await (await client.get("/metrics")).get_data()).decode()
    assert metric(after, "trioserve_completion_tokens_total") >= 3
    assert metric(after, "trioserve_prompt_tokens_total") == 2 * 21
    assert metric(after, 'trioserve_requests_total{status="200"}') == 1
    assert metric(after, 'trioserve_requests_total{status="504"}') == 1
    assert metric(after, 'trioserve_aborted_requests_total{reason="deadline"}') == 1
    assert metric(after, "trioserve_time_to_first_token_seconds_count") == 2
    assert metric(after, "trioserve_inter_token_latency_seconds_count") >= 2
    assert metric(after, "trioserve_cancel_to_release_seconds_count") == 1
    assert metric(after, "trioserve_queue_time_seconds_count") == 2
    assert metric(after, "trioserve_kv_tokens") == 0


@pytest.mark.socket
async def test_drain_finishes_in_flight_refuses_new_and_returns() -> None:
    app = demo_app(slow=True)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    # The drain cuts what still runs 1 s before the graceful timeout; the streams here need 40 steps of at
    # least 30 ms (1.2 s), seconds on a busy machine: the timeout is far enough that only a hang reaches it.
    config.graceful_timeout = 30
    stop = trio.Event()
    long = {"messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "stream": True}
    with trio.fail_after(90):
        await _drain_scenario(app, config, stop, long)
    # serve() returned on its own, without an error: nothing was left running.
    assert app.engine.active == 0


async def _drain_scenario(app: TrioserveApp, config: Config, stop: trio.Event, long: dict[str, object]) -> None:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=stop.wait))
        url = binds[0]
        h2 = await H2Client.connect(url, nursery)
        h2_in_flight = await h2.post(CHAT, long)
        await h2.wait_for(h2_in_flight, events=2)
        async with (
            httpx.AsyncClient(timeout=60) as client,
            client.stream("POST", url + CHAT, json=long) as response,
            aclosing(response.aiter_lines()) as lines,
        ):
            seen = []
            async for line in lines:
                seen.append(line)
                if len(seen) == 3:
                    app.start_draining()
                    stop.set()
                    with pytest.raises(httpx.ConnectError):
                        await client.get(url + "/health")  # the listener is closed: a new connection fails
                    # A new stream on an open HTTP/2 connection is refused (reset, or GOAWAY and
                    # close), and the server survives it (see hypercorn_fixes.patch_hypercorn_h2).
                    refused = await h2.post(CHAT, {"messages": MESSAGES, "max_tokens": 2})
                    state = await h2.wait_for(refused)
                    assert state.reset or h2.closed
                    assert state.status is None
        # The HTTP/1.1 stream in flight when the drain began ran to its end.
        assert [line for line in seen if line][-1] == "data: [DONE]"
        await h2.aclose()


@pytest.mark.socket
@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    # Every forward step sleeps 0.25 s (tests.slow_cli), so both streams are still generating when SIGTERM
    # comes right after their first tokens, however fast the machine: the short one has 11 steps to go, at
    # least 2.75 s; the long one 1199, at least 300 s, far past the graceful timeout (30 s). The drain's
    # contract (README, Operations) then decides each ending: the short one ends within the timeout with
    # [DONE] (29 s for 12 steps; a busy machine took about 0.5 s a step); the long one is cut 1 s
    # before the timeout with the service_unavailable event; then the process exits 0.
    with server_process(tmp_path, "tests.slow_cli", STEP_SECONDS="0.25", GRACEFUL_TIMEOUT="30") as server:
        url = server.url
        short = {
            "messages": MESSAGES,
            "max_tokens": 12,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        long = short | {"max_tokens": 1200}
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", url + CHAT, json=long) as long_response,
            client.stream("POST", url + CHAT, json=short) as short_response,
        ):
            long_lines, short_lines = long_response.iter_lines(), short_response.iter_lines()
            first = next(long_lines), next(short_lines)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            short_rest = [line for line in short_lines if line]
            long_rest = [line for line in long_lines if line]
        assert all(line.startswith("data: {") for line in first)
        assert "draining: 2 request(s) in flight" in server.output()
        assert short_rest[-1] == "data: [DONE]"
        assert json.loads(short_rest[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 12  # whole
        error = json.loads(long_rest[-1].removeprefix("data: "))["error"]
        assert error["type"] == "service_unavailable"
        assert all("error" not in json.loads(line.removeprefix("data: ")) for line in long_rest[:-1])  # tokens
        assert time.monotonic() - signalled > 28  # cut at timeout - 1 s, not before (only a lower bound holds)
        assert server.process.wait(timeout=60) == 0
        assert "shut down cleanly" in server.output()


async def test_requests_reaching_a_draining_app_get_503() -> None:
    app = demo_app()
    async with open_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        app.start_draining()
        health = await client.get("/health")
        assert health.status_code == 503
        assert (await health.get_json())["status"] == "draining"
        for path in (CHAT, "/v1/completions"):
            body = {"messages": MESSAGES, "prompt": "x", "max_tokens": 2}
            response = await client.post(path, json=body)
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.get_json())["error"]["type"] == "service_unavailable"
