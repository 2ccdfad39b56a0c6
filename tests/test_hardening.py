"""HTTP hardening over real sockets: connections that always end, an HTTP/2 stack no client can crash, and a
drain that finishes when the work does (issue 11).

Each test drives a real Hypercorn configured by `trioserve.cli.hypercorn_config` (with
`trioserve.server.hypercorn_fixes` installed), through raw sockets, the `h2` state machine, httpx or the openai SDK.
The canary tests run Hypercorn *without* the fixes and assert that the bug they work around is still there:
when one fails, upstream has fixed that bug and the workaround (and its canary) can go.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import h11
import httpx
import openai
import pytest
import trio
from hypercorn.trio import serve

from bench.soak import rss_bytes
from tests.servers import demo_app, tls_files
from trioserve.cli import hypercorn_config
from trioserve.config import Settings
from trioserve.server import hypercorn_fixes
from trioserve.server.app import TrioserveApp

pytestmark = pytest.mark.socket

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@asynccontextmanager
async def running(
    app: TrioserveApp, *, tls: tuple[str, str] | None = None, stop: trio.Event | None = None
) -> AsyncIterator[str]:
    """The app behind Hypercorn configured as the CLI configures it (port 0); yields the base URL."""
    settings = app.settings.model_copy(update={"port": 0, "certfile": tls and tls[0], "keyfile": tls and tls[1]})
    config = hypercorn_config(settings, app.send_limits)
    async with trio.open_nursery() as nursery:
        trigger = stop.wait if stop is not None else trio.sleep_forever
        binds = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=trigger))
        yield binds[0]
        nursery.cancel_scope.cancel()


class RawH2:
    """A bare HTTP/2 client on the `h2` state machine: it sends exactly what a test says and records events."""

    def __init__(self, stream: trio.abc.Stream, authority: str, scheme: str) -> None:
        self.stream = stream
        self.authority = authority
        self.scheme = scheme
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.events: list[h2.events.Event] = []
        self.eof = False
        self.ignored: set[int] = set()  # streams whose data is never taken (their window is never reopened)

    @classmethod
    async def open(cls, url: str, context: ssl.SSLContext | None = None) -> RawH2:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        if context is not None:
            context.set_alpn_protocols(["h2"])
            stream = trio.SSLStream(stream, context, server_hostname=parts.hostname)
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "h2"
        client = cls(stream, parts.netloc, parts.scheme)
        client.conn.initiate_connection()
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        await client.flush()
        return client

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def headers(self, method: str, path: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
        return [(":method", method), (":scheme", self.scheme), (":authority", self.authority), (":path", path), *extra]

    async def post(self, path: str, body: bytes, *, end: bool = True, length: int | None = None) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        size = str(len(body) if length is None else length)
        headers = self.headers("POST", path, ("content-type", "application/json"), ("content-length", size))
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=end)
        await self.flush()
        return stream_id

    async def pump(self) -> None:
        """Reads once, records the events, acknowledges data."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            return
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.DataReceived) and event.stream_id in self.ignored:
                self.conn.increment_flow_control_window(event.flow_controlled_length)  # the connection's only
            elif isinstance(event, h2.events.DataReceived) and event.stream_id in self.conn.streams:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.eof = True

    async def until(self, done: Callable[[], bool], seconds: float = 30) -> None:  # a bound for hangs, not speed
        with trio.fail_after(seconds):
            while not done() and not self.eof:
                await self.pump()

    def status(self, stream_id: int) -> int | None:
        for event in self.events:
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                return int(dict(event.headers)[":status"])
        return None

    def reset(self, stream_id: int) -> h2.errors.ErrorCodes | int | None:
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                return event.error_code
        return None

    def ended(self, stream_id: int) -> bool:
        return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in self.events)

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def body(self, stream_id: int) -> bytes:
        return b"".join(
            e.data for e in self.events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id
        )


async def http1_request(stream: trio.SocketStream, request: bytes) -> tuple[bytes, bytes]:
    """Sends one request on a raw socket and reads one Content-Length response: (head, body)."""
    await stream.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        assert chunk
        body += chunk
    return head, body


async def closed_by_server(stream: trio.SocketStream, seconds: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within ``seconds``; data is discarded."""
    with trio.move_on_after(seconds):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


# -- HTTP/1.1: every connection ends ---------------------------------------------------------------------


async def test_idle_connections_are_closed_after_the_keep_alive_timeout() -> None:
    # Each connection is used as soon as it opens: the keep-alive timer also runs before a first request, and
    # opening all 200 before using any took longer than the timeout on a busy machine.
    async with running(demo_app(keep_alive_timeout=1.0)) as url:
        host, port = urlsplit(url).hostname, urlsplit(url).port
        assert host is not None and port is not None
        sockets = []
        for _ in range(200):
            sockets.append(stream := await trio.open_tcp_stream(host, port))
            head, _ = await http1_request(stream, GET_HEALTH)
            assert head.startswith(b"HTTP/1.1 200")
        h2c = await RawH2.open(url)
        served = await h2c.post("/v1/models", b"")
        await h2c.until(lambda: h2c.ended(served))
        started = trio.current_time()
        closed = [False] * len(sockets)

        async def watch(index: int) -> None:
            closed[index] = await closed_by_server(sockets[index], 4)

        async with trio.open_nursery() as nursery:
            for index in range(len(sockets)):
                nursery.start_soon(watch, index)
            await _until_eof(h2c, 4)
        assert all(closed), f"{closed.count(False)} of 200 idle HTTP/1.1 connections still open"
        assert h2c.eof, "an idle h2c connection still open"
        assert trio.current_time() - started < 4
        for stream in sockets:
            await stream.aclose()
        await h2c.aclose()


async def _until_eof(client: RawH2, seconds: float) -> None:
    with trio.move_on_after(seconds):
        while not client.eof:
            await client.pump()


async def test_canary_hypercorn_never_rearms_the_keep_alive_timer() -> None:
    """Upstream bug (see RecyclingH11Protocol): without the fix an HTTP/1.1 connection that served a request
    stays open past the keep-alive timeout."""
    with hypercorn_fixes.uninstalled():
        async with running(demo_app(keep_alive_timeout=0.5)) as url:
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            await http1_request(stream, GET_HEALTH)
            still_open = not await closed_by_server(stream, 2)
            await stream.aclose()
            assert still_open, "Hypercorn fixed it: delete RecyclingH11Protocol's shield"


def sdk_client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0, timeout=5)


async def test_the_sdk_call_after_a_401_404_or_413_on_the_same_client_succeeds_at_once() -> None:
    app = demo_app(api_key=["good"], max_body_bytes=256 * 1024)
    big = [{"role": "user", "content": "x" * (200 * 1024)}]  # several segments: answered before it is read

    def scenario(url: str) -> list[float]:
        took = []
        with sdk_client(url, "wrong") as client:
            good = client.with_options(api_key="good")  # the same connection pool
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model="m", messages=big, max_tokens=1)  # type: ignore[arg-type]
            started = time.monotonic()
            assert good.models.list().data
            took.append(time.monotonic() - started)
            with pytest.raises(openai.NotFoundError):
                good.embeddings.create(model="m", input=["x" * (200 * 1024)])
            started = time.monotonic()
            assert good.chat.completions.create(model="m", messages=SHORT["messages"], max_tokens=1).choices  # type: ignore[arg-type]
            took.append(time.monotonic() - started)
            with pytest.raises(openai.APIStatusError) as too_large:
                good.chat.completions.create(model="m", messages=big * 2, max_tokens=1)  # type: ignore[arg-type]
            assert too_large.value.status_code == 413
            started = time.monotonic()
            assert good.models.list().data
            took.append(time.monotonic() - started)
        return took

    async with running(app) as url:
        took = await trio.to_thread.run_sync(scenario, url)
    assert max(took) < 1.0, took


async def test_a_64_mib_upload_gets_its_413_at_once_without_being_read_http1() -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"x" * (1 << 20)
        for _ in range(64):
            sent += len(chunk)
            yield chunk

    async with running(demo_app()) as url, httpx.AsyncClient(timeout=10) as client:
        started = trio.current_time()
        headers = {"Content-Type": "application/json", "Content-Length": str(64 << 20)}
        response = await client.post(url + CHAT, content=body(), headers=headers)
        took = trio.current_time() - started
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.headers["connection"] == "close"
        assert took < 1.0
        assert sent < 32 << 20, f"the client uploaded {sent >> 20} MiB"
        again = await client.post(url + CHAT, json=SHORT)  # a fresh connection serves
        assert again.status_code == 200


@pytest.mark.parametrize("transport", ["h2c", "tls"])
async def test_a_64_mib_upload_gets_its_413_at_once_and_is_released_http2(tmp_path: Path, transport: str) -> None:
    tls, context = tls_files(tmp_path) if transport == "tls" else (None, None)
    async with running(demo_app(), tls=tls) as url:
        client = await RawH2.open(url, context)
        started = trio.current_time()
        upload = await client.post(CHAT, b"{", end=False, length=64 << 20)
        await client.until(lambda: client.reset(upload) is not None, seconds=3)
        assert trio.current_time() - started < 1.0
        assert client.status(upload) == 413
        assert client.ended(upload)  # the whole answer, then the reset
        assert client.reset(upload) == h2.errors.ErrorCodes.NO_ERROR
        # The connection goes on: its window was not eaten by the abandoned upload.
        after = await client.post(CHAT, json.dumps(SHORT).encode())
        await client.until(lambda: client.ended(after))
        assert client.status(after) == 200
        await client.aclose()


async def test_ambiguous_length_and_body_timeout_close_the_connection() -> None:
    app = demo_app()
    app.config["BODY_TIMEOUT"] = 0.5
    async with running(app) as url:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        # Content-Length and Transfer-Encoding together (RFC 9112 §6.3): answered, then closed.
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        payload = json.dumps(SHORT).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
        head, _ = await http1_request(
            stream,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s" % (len(chunked), chunked),
        )
        assert b"connection: close" in head.lower()
        assert await closed_by_server(stream, 2)
        await stream.aclose()
        # A body that never comes: Quart's 408, then the connection closes.
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        head, _ = await http1_request(
            stream, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        assert head.startswith(b"HTTP/1.1 408")
        assert b"connection: close" in head.lower()
        assert await closed_by_server(stream, 2)
        await stream.aclose()


# -- HTTP/2: no client can crash the server ------------------------------------------------------------


@pytest.mark.slow
async def test_a_rapid_reset_flood_leaves_the_server_up_and_serving() -> None:
    flood_seconds = 5.0
    async with running(demo_app()) as url:
        before = rss_bytes()
        opened = calmed = 0
        slowest_probe = 0.0
        payload = json.dumps(SHORT).encode()

        async def flood() -> None:
            nonlocal opened, calmed
            deadline = trio.current_time() + flood_seconds
            while trio.current_time() < deadline:
                client = await RawH2.open(url)
                try:
                    while not client.eof and trio.current_time() < deadline:
                        for _ in range(50):  # HEADERS + DATA + RST_STREAM, fifty streams a write
                            stream_id = client.conn.get_next_available_stream_id()
                            client.conn.send_headers(stream_id, client.headers("POST", CHAT))
                            client.conn.send_data(stream_id, payload, end_stream=True)
                            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                            opened += 1
                        await client.flush()
                        with trio.move_on_after(0):
                            await client.pump()
                except (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
                    pass
                goaway = client.goaway()
                if goaway is None:
                    with trio.move_on_after(1):
                        await _until_eof(client, 1)
                    goaway = client.goaway()
                if goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM:
                    calmed += 1
                await client.stream.aclose()

        async def probe() -> None:
            nonlocal slowest_probe
            async with httpx.AsyncClient(timeout=5) as http:
                for _ in range(int(flood_seconds / 0.5)):
                    started = trio.current_time()
                    with trio.fail_after(1):
                        assert (await http.get(url + "/v1/models", headers={"Connection": "close"})).status_code == 200
                    slowest_probe = max(slowest_probe, trio.current_time() - started)
                    await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(probe)
        growth = (rss_bytes() - before) / 2**20
    assert opened > 1000
    assert calmed >= 1  # abusive connections were ended with GOAWAY(ENHANCE_YOUR_CALM)
    assert growth < 50, f"RSS grew {growth:.0f} MB"


async def test_streams_over_the_limit_are_refused_one_by_one() -> None:
    async with running(demo_app(max_concurrent_streams=4, max_concurrent=2)) as url:
        client = await RawH2.open(url)
        await client.until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events))
        long = {**SHORT, "max_tokens": 40, "ignore_eos": True}
        # Ignore the advertised limit, as a careless client would: open six streams at once.
        client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
        client.conn.remote_settings.acknowledge()
        ids = [await client.post(CHAT, json.dumps(long).encode()) for _ in range(6)]
        await client.until(lambda: all(client.ended(i) or client.reset(i) is not None for i in ids), seconds=20)
        refused = [i for i in ids if client.reset(i) == h2.errors.ErrorCodes.REFUSED_STREAM]
        assert len(refused) == 2
        assert all(client.status(i) == 200 for i in ids if i not in refused)
        assert client.goaway() is None and not client.eof
        await client.aclose()


async def test_canary_hypercorn_ends_the_connection_for_one_stream_too_many() -> None:
    """pgjones/hypercorn#335: without RefusingH2Connection one extra stream ends the whole connection."""
    with hypercorn_fixes.uninstalled():
        async with running(demo_app(max_concurrent_streams=1)) as url:
            client = await RawH2.open(url)
            await client.until(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events))
            client.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 100
            client.conn.remote_settings.acknowledge()
            long = json.dumps({**SHORT, "max_tokens": 40, "ignore_eos": True}).encode()
            first = await client.post(CHAT, long)
            await client.post(CHAT, long)
            await _until_eof(client, 3)
            goaway = client.goaway()
            assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR, (
                "Hypercorn fixed #335: delete RefusingH2Connection"
            )
            assert not client.ended(first)
            await client.aclose()


# -- Drain ---------------------------------------------------------------------------------------------------


async def test_drain_refuses_new_streams_and_ends_running_ones_with_an_error_event_before_the_deadline() -> None:
    app = demo_app(slow=True, graceful_timeout=2.0)
    stop = trio.Event()
    long = json.dumps({**SHORT, "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode()
    with trio.fail_after(15):
        async with running(app, stop=stop) as url:
            client = await RawH2.open(url)
            in_flight = await client.post(CHAT, long)
            await client.until(lambda: b"data: " in client.body(in_flight))
            app.start_draining()
            stop.set()
            started = trio.current_time()
            await trio.sleep(0.1)
            refused = await client.post(CHAT, json.dumps(SHORT).encode())
            await client.until(lambda: client.reset(refused) is not None)
            assert client.reset(refused) == h2.errors.ErrorCodes.REFUSED_STREAM  # a client may retry it
            # The running stream ends before Hypercorn's deadline cuts it, with the SSE error event...
            await client.until(lambda: client.ended(in_flight), seconds=4)
            took = trio.current_time() - started
            events = [line for line in client.body(in_flight).decode().split("\n") if line.startswith("data: ")]
            assert json.loads(events[-1][6:])["error"]["type"] == "service_unavailable"
            assert 1.0 < took < 2.0, took
            # ...then the idle connection gets GOAWAY(NO_ERROR) and is closed.
            await _until_eof(client, 1)
            goaway = client.goaway()
            assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
            assert client.eof
            await client.aclose()


@pytest.mark.parametrize(
    ("path", "body", "last"),
    [
        ("/v1/responses", {"input": "hi", "max_output_tokens": 1000}, "response.failed"),
        ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, "error"),
    ],
)
async def test_drain_ends_responses_and_messages_streams_with_their_error_event_before_the_deadline(
    path: str, body: dict[str, object], last: str
) -> None:
    # Every generation route counts its requests among those the drain deadline closes, not only chat's.
    app = demo_app(slow=True, graceful_timeout=2.0)
    stop = trio.Event()
    with trio.fail_after(15):
        async with running(app, stop=stop) as url:
            client = await RawH2.open(url)
            in_flight = await client.post(path, json.dumps(body | {"ignore_eos": True, "stream": True}).encode())
            await client.until(lambda: b"data: " in client.body(in_flight))
            app.start_draining()
            stop.set()
            await client.until(lambda: client.ended(in_flight), seconds=4)
            lines = client.body(in_flight).decode().split("\n")
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert events[-1]["type"] == last, events[-1]
            (error,) = [event for event in events if event["type"] == "error"]
            assert "cancelled by the server" in json.dumps(error), error
            await client.aclose()


def start_server(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    log = tmp_path / "log"
    environ = os.environ | {"PYTHONUNBUFFERED": "1", "HOTLOAD": "true", "PORT": "0", **env}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "trioserve"], stdout=out, stderr=subprocess.STDOUT, env=environ
        )
    deadline = time.monotonic() + 120  # importing torch and loading the model on a busy machine: generous
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Running on http" in text:  # http:// or https://
            return process, text.split("Running on ", 1)[1].split()[0], log
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise AssertionError(log.read_text())


@pytest.mark.slow
def test_sigterm_with_only_idle_connections_closes_them_and_exits_at_once(tmp_path: Path) -> None:
    # "At once" against a graceful timeout of 120 s: bounds of 10 s (closing) and 60 s (exiting, most of it
    # the interpreter's teardown, which took over 10 s on a busy 2-core machine) tell the two apart.
    process, url, log = start_server(tmp_path, GRACEFUL_TIMEOUT="120")
    try:

        async def scenario() -> float:
            parts = urlsplit(url)
            assert parts.hostname is not None and parts.port is not None
            idle = [await trio.open_tcp_stream(parts.hostname, parts.port) for _ in range(5)]
            for stream in idle:
                await http1_request(stream, GET_HEALTH)
            h2c = await RawH2.open(url)
            models = await h2c.post("/v1/models", b"")
            await h2c.until(lambda: h2c.ended(models))
            started = trio.current_time()
            process.send_signal(signal.SIGTERM)
            for stream in idle:
                assert await closed_by_server(stream, 10.0)
            await _until_eof(h2c, 10.0)
            assert h2c.eof
            for stream in idle:
                await stream.aclose()
            await h2c.aclose()
            return trio.current_time() - started

        closed_after = trio.run(scenario)
        started = time.monotonic()
        assert process.wait(timeout=60) == 0
        exited_after = closed_after + time.monotonic() - started
        assert closed_after < 10.0
        assert exited_after < 60.0, f"exit took {exited_after:.1f}s of the 120s graceful timeout"
        assert "shut down cleanly" in log.read_text()
    finally:
        process.kill()
        process.wait()  # reaped here: a failure must not leave a ResourceWarning to fail a later test


@pytest.mark.slow
def test_sigterm_with_twenty_short_streams_exits_soon_after_the_last_ends(tmp_path: Path) -> None:
    # "Soon after the last stream" against a graceful timeout of 120 s: within 60 s tells the two apart on
    # a busy machine too (the interpreter's teardown alone took over 10 s there).
    process, url, log = start_server(tmp_path, GRACEFUL_TIMEOUT="120")
    try:
        ends: list[float] = []
        finishes: list[str | None] = []
        admitted: list[int] = []
        all_admitted = trio.Event()  # SIGTERM goes once every stream has its 200: the drain must let them finish

        async def stream_one(client: httpx.AsyncClient) -> None:
            body = {**SHORT, "max_tokens": 20, "ignore_eos": True, "stream": True}
            lines = []
            async with client.stream("POST", url + CHAT, json=body) as response:
                assert response.status_code == 200
                admitted.append(1)
                if len(admitted) == 20:
                    all_admitted.set()
                lines = [line async for line in response.aiter_lines() if line]
            assert lines[-1] == "data: [DONE]", lines[-1]
            finishes.append(json.loads(lines[-2][6:])["choices"][0]["finish_reason"])
            ends.append(time.monotonic())

        async def scenario() -> int:
            async with httpx.AsyncClient(timeout=30) as client:
                await client.get(url + "/health")
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(stream_one, client)
                    await all_admitted.wait()
                    process.send_signal(signal.SIGTERM)
                    return 20 - len(ends)

        unfinished_at_signal = trio.run(scenario)
        assert unfinished_at_signal >= 1  # at least the last admitted one was running: not the idle case
        assert process.wait(timeout=90) == 0
        assert finishes == ["length"] * 20  # every stream ran to its max_tokens, none was cut by the drain
        after_last = time.monotonic() - max(ends)
        # Far from the 120 s graceful timeout; loose, as a busy 2-core machine's teardown alone took over 10 s.
        assert after_last < 60.0, f"exited {after_last:.1f}s after the last stream ended (graceful timeout 120s)"
        assert "shut down cleanly" in log.read_text()
    finally:
        process.kill()
        process.wait()  # reaped here: a failure must not leave a ResourceWarning to fail a later test


# -- /health -------------------------------------------------------------------------------------------------


async def test_health_without_the_key_reveals_only_the_status() -> None:
    def failing_load() -> Any:
        raise OSError("secret path /models/private-llama is missing")

    from trioserve.cli import build_app

    app = build_app(Settings(api_key=["k"]), load=failing_load)
    async with running(app) as url, httpx.AsyncClient() as client:
        # HOTLOAD=false: "ok" before the first request, which loads the model (README, Operations).
        assert (await client.get(url + "/health")).json() == {"status": "ok"}
        failed = await client.post(url + CHAT, json=SHORT, headers={"Authorization": "Bearer k"})
        assert failed.status_code == 503
        anonymous = await client.get(url + "/health")
        assert anonymous.status_code == 503
        assert anonymous.json() == {"status": "failed"}
        keyed = await client.get(url + "/health", headers={"Authorization": "Bearer k"})
        assert keyed.json()["status"] == "failed"
        assert "private-llama" in keyed.json()["error"]


# -- the direct send: writes that do not fit go on through Hypercorn's path ----------------------------------


async def test_a_slow_readers_stream_arrives_whole_when_writes_stop_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    # `ContainedTCPServer` writes to the socket directly while the kernel takes everything; a client with a
    # tiny receive buffer that reads nothing for a while makes writes fail or land in part, and the rest must
    # then go through Hypercorn's own send, in order, with nothing lost or doubled.
    fell_back = trio.Event()
    original = hypercorn_fixes.TCPServer.protocol_send

    async def counted(self: Any, event: Any) -> None:
        if isinstance(event, hypercorn_fixes.RawData):
            fell_back.set()
        await original(self, event)

    monkeypatch.setattr(hypercorn_fixes.TCPServer, "protocol_send", counted)
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 60,
        "n": 4,
        "logprobs": True,
        "top_logprobs": 20,  # ~2 KB per event
        "ignore_eos": True,
        "stream": True,
    }
    text = b""
    async with running(demo_app()) as url:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect((parts.hostname, parts.port))
        # Closed on the way out, also when the test fails: a shielded send to a client that never reads
        # would never end, and neither would the server's shutdown.
        async with trio.SocketStream(sock) as stream:
            data = json.dumps(body).encode()
            client = h11.Connection(h11.CLIENT)
            headers = [("Host", "x"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
            request = client.send(h11.Request(method="POST", target=CHAT, headers=headers))
            await stream.send_all((request or b"") + (client.send(h11.Data(data=data)) or b""))
            client.send(h11.EndOfMessage())
            # The client reads nothing until a write has not fitted (however slowly this machine generates).
            with trio.fail_after(60):
                await fell_back.wait()
            with trio.fail_after(30):
                while not isinstance(event := client.next_event(), h11.EndOfMessage):
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Data):
                        text += event.data
    events = [e.removeprefix(b"data: ") for e in text.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    tokens = [0] * 4
    for chunk in map(json.loads, events[:-1]):
        for choice in chunk["choices"]:
            tokens[choice["index"]] += len((choice.get("logprobs") or {}).get("content") or [])
    assert tokens == [60] * 4
