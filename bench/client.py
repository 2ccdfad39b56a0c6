"""Load generator: streaming chat requests at a fixed concurrency, timing every event as it arrives.

The client speaks HTTP/1.1 over plain trio sockets (keep-alive, chunked transfer decoding, SSE split on
blank lines) rather than through httpx: at thousands of events per second a general-purpose client costs
more per event than the server under test, and the benchmark must measure the server. Each worker keeps
one connection and sends its requests on it one after another.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio


@dataclass
class RequestTiming:
    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each event carrying content
    completion_tokens: int = 0
    events: int = 0  # every SSE data event, [DONE] excluded
    prompt_tokens: int = 0  # from the usage chunk, when the server sends one
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens (0 where a server does not say)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    def inter_token(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_seconds: float
    output_tokens: int
    events: int
    ttft: list[float]
    itl: list[float]

    def summary(self) -> dict[str, float]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "wall_seconds": self.wall_seconds,
            "output_tokens_per_s": self.output_tokens / self.wall_seconds,
            "events_per_s": self.events / self.wall_seconds,
            "tokens_per_event": self.output_tokens / max(1, self.events),
            "ttft_p50_ms": 1000 * percentile(self.ttft, 50),
            "ttft_p99_ms": 1000 * percentile(self.ttft, 99),
            "itl_p50_ms": 1000 * percentile(self.itl, 50),
            "itl_p99_ms": 1000 * percentile(self.itl, 99),
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q) - 1))]


class HTTPError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a chunked SSE response."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self._stream = stream
        self._host = host
        self._buffer = bytearray()

    @classmethod
    async def open(cls, base_url: str) -> Connection:
        parts = urlsplit(base_url)
        assert parts.hostname is not None and parts.port is not None
        return cls(await trio.open_tcp_stream(parts.hostname, parts.port), f"{parts.hostname}:{parts.port}")

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def _fill(self) -> None:
        data = await self._stream.receive_some(65536)
        if not data:
            raise HTTPError("connection closed by the server")
        self._buffer += data

    async def post_stream(self, path: str, body: dict[str, Any], timing: RequestTiming) -> None:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        await self._stream.send_all(head + payload)
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        headers = bytes(self._buffer[:end]).decode("latin-1").lower()
        del self._buffer[: end + 4]
        status = int(headers.split(" ", 2)[1])
        if "transfer-encoding: chunked" not in headers:
            raise HTTPError(f"status {status}, not a chunked stream: {headers!r}")
        sse = bytearray()
        while True:
            while (line_end := self._buffer.find(b"\r\n")) < 0:
                await self._fill()
            size = int(self._buffer[:line_end].split(b";")[0], 16)
            while len(self._buffer) < line_end + 2 + size + 2:
                await self._fill()
            start = line_end + 2
            sse += self._buffer[start : start + size]
            del self._buffer[: start + size + 2]
            if size == 0:
                break
            now = time.perf_counter()
            while (event_end := sse.find(b"\n\n")) >= 0:
                event = bytes(sse[:event_end])
                del sse[: event_end + 2]
                if status != 200:
                    raise HTTPError(f"status {status}: {event!r}")
                _account(event, now, timing)
        if status != 200:
            raise HTTPError(f"status {status}: {bytes(sse)!r}")


def _account(event: bytes, now: float, timing: RequestTiming) -> None:
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return
    timing.events += 1
    chunk = json.loads(event[6:])
    if "error" in chunk:
        raise HTTPError(f"error event: {chunk['error']}")
    if usage := chunk.get("usage"):
        timing.completion_tokens = usage["completion_tokens"]
        timing.prompt_tokens = usage.get("prompt_tokens") or 0
        timing.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    for choice in chunk.get("choices", ()):
        if choice.get("delta", {}).get("content") or choice.get("text"):
            timing.token_times.append(now)
            break


async def run_level(base_url: str, concurrency: int, requests: int, body: dict[str, Any]) -> LevelResult:
    """Keeps ``concurrency`` streams in flight (one connection each) until ``requests`` have completed."""
    timings: list[RequestTiming] = []
    remaining = iter(range(requests))

    async def worker() -> None:
        connection = await Connection.open(base_url)
        try:
            for _ in remaining:
                timing = RequestTiming(sent=time.perf_counter())
                await connection.post_stream("/v1/chat/completions", body, timing)
                if not timing.completion_tokens:
                    timing.completion_tokens = len(timing.token_times)
                timings.append(timing)
        finally:
            await connection.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    wall = time.perf_counter() - start
    return LevelResult(
        concurrency=concurrency,
        requests=requests,
        wall_seconds=wall,
        output_tokens=sum(t.completion_tokens for t in timings),
        events=sum(t.events for t in timings),
        ttft=[t.ttft for t in timings if t.token_times],
        itl=[gap for t in timings for gap in t.inter_token()],
    )
