"""`just soak`: thousands of mixed requests at concurrency 16, then checks that nothing leaked.

The mix: completions streamed and not, streams aborted at random points, requests whose deadline passes
mid-generation, and bad inputs; a third of the good ones ask for JSON (``response_format``, with schemas
that vary, so the server's cache of grammars turns over), and a JSON answer that finished must parse.
Every outcome is checked against what that kind must get; afterwards the server must report no running or
waiting requests, no live sequences, no KV tokens, and its resident memory must not have grown past a
bound.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

CHAT = "/v1/chat/completions"
KINDS = ("complete", "stream", "abort", "deadline", "bad")
BAD_BODIES: list[Any] = [
    {"messages": []},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
    {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9},
    [1, 2, 3],
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
    {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}},
    },
]


def _response_format(rng: random.Random) -> dict[str, Any]:
    if rng.random() < 0.5:
        return {"type": "json_object"}
    key = f"k{rng.randrange(100)}"  # 100 different schemas: more than the server keeps compiled
    schema = {"type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}
    return {"type": "json_schema", "json_schema": {"name": "soak", "schema": schema}}


@dataclass
class SoakReport:
    outcomes: Counter[str] = field(default_factory=Counter)  # one per request
    unexpected: list[str] = field(default_factory=list)
    json_parsed: int = 0  # JSON-mode answers that finished by themselves and parsed

    @property
    def ok(self) -> bool:
        return not self.unexpected


async def _one(
    client: httpx.AsyncClient, url: str, kind: str, rng: random.Random, report: SoakReport, json_share: float
) -> None:
    messages = [{"role": "user", "content": f"soak {rng.random()}"}]
    body: Any = {"messages": messages, "max_tokens": rng.randint(1, 40), "ignore_eos": rng.random() < 0.5}
    headers: dict[str, str] = {}
    if kind == "bad":
        body = rng.choice(BAD_BODIES)
    if kind == "deadline":
        body |= {"max_tokens": 1500, "ignore_eos": True}
        headers["X-Request-Timeout"] = str(rng.choice([0.01, 0.05, 0.1]))
    as_json = kind != "bad" and rng.random() < json_share
    if as_json:
        body |= {"response_format": _response_format(rng), "ignore_eos": False}
    stream = kind in ("stream", "abort") or (kind == "deadline" and rng.random() < 0.5)
    if isinstance(body, dict):
        body["stream"] = stream
    async with client.stream("POST", url + CHAT, json=body, headers=headers) as response:
        status = response.status_code
        if kind == "bad":
            payload = json.loads(await response.aread())
            good = status == 400 and set(payload.get("error", {})) == {"message", "type", "param", "code"}
            report.outcomes["bad-400" if good else f"bad-{status}"] += 1
            if not good:
                report.unexpected.append(f"bad input got {status}")
            return
        if not stream:
            payload = json.loads(await response.aread())
            expected = 504 if kind == "deadline" else 200
            if status != expected and not (kind == "deadline" and status == 200):
                report.unexpected.append(f"{kind} got {status}: {payload}")
            report.outcomes[f"{kind}-{status}"] += 1
            if as_json and status == 200:
                _check_json(payload, report)
            return
        if status != 200:
            report.unexpected.append(f"{kind} stream got {status}")
            return
        stop_after = rng.randint(1, 6) if kind == "abort" else None
        events = 0
        last = ""
        async with aclosing(response.aiter_lines()) as lines:
            async for line in lines:
                if not line.startswith("data: "):
                    continue
                events += 1
                last = line
                if stop_after is not None and events >= stop_after:
                    report.outcomes["aborted"] += 1
                    return
        if kind == "deadline" and '"request_timeout"' in last:
            report.outcomes["deadline-sse-error"] += 1
        elif last == "data: [DONE]":
            report.outcomes[f"{kind}-done"] += 1
        else:
            report.unexpected.append(f"{kind} stream ended with {last[:120]!r}")


def _check_json(payload: dict[str, Any], report: SoakReport) -> None:
    """A JSON-mode answer that ended by itself (not cut by max_tokens) must parse."""
    choice = payload["choices"][0]
    if choice["finish_reason"] != "stop":
        return
    try:
        json.loads(choice["message"]["content"])
    except ValueError:
        report.unexpected.append(f"JSON-mode answer does not parse: {choice['message']['content'][:120]!r}")
    else:
        report.json_parsed += 1


async def run_soak(url: str, total: int, concurrency: int = 16, seed: int = 0, json_share: float = 1 / 3) -> SoakReport:
    """Sends ``total`` requests, ``concurrency`` at a time, and classifies every outcome."""
    rng = random.Random(seed)
    report = SoakReport()
    kinds = iter([rng.choice(KINDS) for _ in range(total)])
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            for kind in kinds:
                try:
                    await _one(client, url, kind, rng, report, json_share)
                except httpx.HTTPError as exc:
                    report.unexpected.append(f"{kind}: {exc!r}")

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return report


async def settled(url: str) -> dict[str, Any]:
    """/health once the last aborted request has been released (it may trail the client by a step)."""
    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            while True:
                health: dict[str, Any] = (await client.get(url + "/health")).json()
                if health["running"] == health["waiting"] == health["live_sequences"] == 0:
                    return health
                await trio.sleep(0.05)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main(argv: Sequence[str] | None = None) -> int:
    import subprocess

    from bench.servers import free_port, server

    parser = argparse.ArgumentParser(prog="soak", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rss-growth-mb", type=float, default=300.0, help="allowed resident memory growth")
    args = parser.parse_args(argv)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "trioserve",
        "--port",
        str(port),
        "--hotload",
        "--max-concurrent",
        "16",
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
    ]
    from pathlib import Path

    log = Path(__file__).parent / "results" / "soak-server.log"
    log.parent.mkdir(exist_ok=True)
    with server(command, port, log) as url:
        pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--port {port}"]).split()[0])
        trio.run(run_soak, url, 50, args.concurrency, 1)  # warm-up: allocator pools, lazy imports
        before = rss_bytes(pid)
        report = trio.run(run_soak, url, args.requests, args.concurrency, 0)
        health = trio.run(settled, url)
        growth = (rss_bytes(pid) - before) / 2**20
        kv = [line for line in httpx.get(url + "/metrics").text.splitlines() if line.startswith("trioserve_kv_tokens ")]
    print(
        json.dumps(
            {
                "outcomes": report.outcomes,
                "json_answers_parsed": report.json_parsed,
                "unexpected": report.unexpected[:20],
                "health": health,
                "rss_growth_mb": round(growth, 1),
                "kv_tokens": kv,
            },
            indent=2,
        )
    )
    ok = report.ok and growth < args.rss_growth_mb and kv == ["trioserve_kv_tokens 0.0"]
    print("soak:", "PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
