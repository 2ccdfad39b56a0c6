"""Load generator: streaming chat requests at a fixed concurrency, timing every token as it arrives."""

from __future__ import annotations

import json
import statistics
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio


@dataclass
class RequestTiming:
    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    completion_tokens: int = 0

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
    ttft: list[float]
    itl: list[float]

    def summary(self) -> dict[str, float]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "output_tokens_per_s": self.output_tokens / self.wall_seconds,
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


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestTiming:
    timing = RequestTiming(sent=time.perf_counter())
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async with aclosing(response.aiter_lines()) as lines:
            async for line in lines:
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    timing.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        timing.token_times.append(time.perf_counter())
    if not timing.completion_tokens:
        timing.completion_tokens = len(timing.token_times)
    return timing


async def run_level(base_url: str, concurrency: int, requests: int, body: dict[str, Any]) -> LevelResult:
    """Keeps ``concurrency`` streams in flight until ``requests`` have completed."""
    url = base_url + "/v1/chat/completions"
    timings: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        remaining = iter(range(requests))

        async def worker() -> None:
            for _ in remaining:
                timings.append(await one_request(client, url, body))

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
        ttft=[t.ttft for t in timings if t.token_times],
        itl=[gap for t in timings for gap in t.inter_token()],
    )
