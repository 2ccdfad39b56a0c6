"""`./dev bench --multi-turn`: an agent-shaped trace, prefix caching on and off, and `transformers serve`.

Several conversations run at once, more than the server has request slots. Each starts from one shared
system prompt carrying tool definitions (~1,300 tokens); every turn adds a user message (~60 tokens) and
the previous turn's assistant reply (~90 tokens), taken from the trace rather than from the model, so every
server sees the same prompts; each turn streams a few tokens. Agents resend the whole history each turn, so
a server that reuses prefixes prefills only the new messages. A control of distinct prompts (no shared
prefix) checks that caching costs nothing where it cannot help.

The same trace runs against trioserve with `--prefix-caching`, with `--no-prefix-caching`, and against
`transformers serve --continuous-batching` (when installed: `pip install 'trioserve[bench]'`), one after the
other in one invocation. Printed: a table per server (TTFT p50/p99 by turn, cached-token share from usage,
wall time, output tokens/s) and the ratios; JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from bench.client import Connection, RequestTiming, percentile
from bench.model import bench_model_dir
from bench.servers import RESULTS, free_port, server

WORDS = [
    "parcel",
    "river",
    "port",
    "crane",
    "ledger",
    "invoice",
    "route",
    "harbour",
    "vessel",
    "cargo",
    "schedule",
    "manifest",
    "customs",
    "berth",
    "tide",
    "barge",
    "quay",
    "freight",
    "anchor",
    "pilot",
    "storage",
    "warehouse",
    "container",
    "weight",
    "volume",
    "priority",
    "delivery",
    "depot",
]
TOOLS = [
    {
        "name": f"tool_{i}",
        "description": f"Looks up the {word} records of a shipment and returns them as JSON.",
        "parameters": {
            "type": "object",
            "properties": {"shipment_id": {"type": "string"}, "detail": {"type": "string", "enum": WORDS[:6]}},
            "required": ["shipment_id"],
        },
    }
    for i, word in enumerate(WORDS[:3])
]


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def system_prompt() -> str:
    rng = random.Random(0)
    rules = "\n".join(f"- {text(rng, 14)}." for _ in range(8))
    return f"You are a logistics agent. Call tools when needed.\nTools:\n{json.dumps(TOOLS)}\nRules:\n{rules}"


def trace(conversations: int, turns: int, seed: int = 1) -> list[list[tuple[str, str]]]:
    """Per conversation, per turn: the user message and the assistant reply that follows it in the trace."""
    rng = random.Random(seed)
    return [[(text(rng, 16), text(rng, 22)) for _ in range(turns)] for _ in range(conversations)]


def control(requests: int, seed: int = 2) -> list[str]:
    """Distinct system prompts of the same length as the trace's (no shared prefix beyond the template)."""
    rng = random.Random(seed)
    return [f"{rng.random()} " + text(rng, 320) for _ in range(requests)]


async def run_trace(
    url: str, model: str, conversations: list[list[tuple[str, str]]], max_tokens: int
) -> tuple[float, dict[int, list[RequestTiming]]]:
    """Every conversation as its own client, turn after turn; returns the wall time and timings by turn."""
    by_turn: dict[int, list[RequestTiming]] = defaultdict(list)
    system = system_prompt()

    async def converse(turns: list[tuple[str, str]]) -> None:
        connection = await Connection.open(url)
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        try:
            for index, (user, reply) in enumerate(turns):
                messages.append({"role": "user", "content": user})
                timing = RequestTiming(sent=time.perf_counter())
                await connection.post_stream("/v1/chat/completions", _body(model, messages, max_tokens), timing)
                by_turn[index].append(timing)
                messages.append({"role": "assistant", "content": reply})
        finally:
            await connection.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for turns in conversations:
            nursery.start_soon(converse, turns)
    return time.perf_counter() - start, by_turn


async def run_control(
    url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[float, list[RequestTiming]]:
    timings: list[RequestTiming] = []
    pending = iter(prompts)

    async def worker() -> None:
        connection = await Connection.open(url)
        try:
            for prompt in pending:
                timing = RequestTiming(sent=time.perf_counter())
                messages = [{"role": "system", "content": prompt}, {"role": "user", "content": "Go on."}]
                await connection.post_stream("/v1/chat/completions", _body(model, messages, max_tokens), timing)
                timings.append(timing)
        finally:
            await connection.aclose()

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - start, timings


def _body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": list(messages),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def summarize(wall: float, timings: list[RequestTiming]) -> dict[str, float]:
    ttft = [t.ttft for t in timings if t.token_times]
    prompt = sum(t.prompt_tokens for t in timings)
    return {
        "requests": len(timings),
        "wall_seconds": wall,
        "output_tokens_per_s": sum(t.completion_tokens or len(t.token_times) for t in timings) / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "prompt_tokens": prompt,
        "cached_share": sum(t.cached_tokens for t in timings) / prompt if prompt else 0.0,
    }


def measure(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    # A warm-up request on another prompt: first-call costs are not what we compare, and it shares nothing.
    trio.run(run_control, url, model, control(1, seed=99), 1, 2)
    conversations = trace(args.conversations, args.turns)
    wall, by_turn = trio.run(run_trace, url, model, conversations, args.max_tokens)
    everything = [t for turn in by_turn.values() for t in turn]
    later = [t for index, turn in by_turn.items() if index > 0 for t in turn]
    result: dict[str, Any] = {
        "trace": summarize(wall, everything),
        "turns_2_plus": summarize(wall, later),
        "by_turn": {str(i + 1): summarize(wall, by_turn[i]) for i in sorted(by_turn)},
    }
    control_wall, control_timings = trio.run(
        run_control, url, model, control(args.control), args.max_concurrent, args.max_tokens
    )
    result["control"] = summarize(control_wall, control_timings)
    return result


def table(report: dict[str, Any]) -> str:
    names = list(report["servers"])
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label: str, cell: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(report["servers"][n]) for n in names) + " |")

    row("TTFT p50, turns 2+ (ms)", lambda r: f"{r['turns_2_plus']['ttft_p50_ms']:.0f}")
    row("TTFT p99, turns 2+ (ms)", lambda r: f"{r['turns_2_plus']['ttft_p99_ms']:.0f}")
    for turn in report["servers"][names[0]]["by_turn"]:
        row(f"TTFT p50, turn {turn} (ms)", lambda r, t=turn: f"{r['by_turn'][t]['ttft_p50_ms']:.0f}")
    row("cached-token share (usage)", lambda r: f"{r['trace']['cached_share']:.0%}")
    row("wall (s)", lambda r: f"{r['trace']['wall_seconds']:.1f}")
    row("output tok/s", lambda r: f"{r['trace']['output_tokens_per_s']:.2f}")
    row("control: TTFT p50 (ms)", lambda r: f"{r['control']['ttft_p50_ms']:.0f}")
    row("control: output tok/s", lambda r: f"{r['control']['output_tokens_per_s']:.2f}")
    ratios = []
    servers = report["servers"]
    on = servers.get("trioserve (cache on)")
    for name in names:
        if on is None or name == "trioserve (cache on)":
            continue
        theirs = servers[name]
        ttft = on["turns_2_plus"]["ttft_p50_ms"] / theirs["turns_2_plus"]["ttft_p50_ms"]
        wall = on["trace"]["wall_seconds"] / theirs["trace"]["wall_seconds"]
        ratios.append(f"- cache on vs {name}: TTFT p50 turns 2+ {ttft:.2f}x, wall {wall:.2f}x")
    off = servers.get("trioserve (cache off)")
    if on is not None and off is not None:
        tok = on["control"]["output_tokens_per_s"] / off["control"]["output_tokens_per_s"]
        ttft = on["control"]["ttft_p50_ms"] / off["control"]["ttft_p50_ms"]
        ratios.append(f"- control (no reuse), cache on vs off: tok/s {tok:.3f}x, TTFT p50 {ttft:.3f}x")
    return "\n".join([*rows, "", *ratios])


def run_multi_turn(args: argparse.Namespace) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model_dir = bench_model_dir(positions=4096)  # the trace's last turns pass 2,048 tokens
    servers: dict[str, dict[str, Any]] = {}
    common = ["--model", str(model_dir), "--hotload", "--torch-dtype", "float32", "--log-level", "warning"]
    common += ["--max-model-len", str(args.max_model_len)]
    common += ["--max-concurrent", str(args.max_concurrent), *args.trioserve_args.split()]
    runs = [
        ("trioserve (cache on)", ["--prefix-caching", "--prefix-cache-slots", str(args.prefix_cache_slots)]),
        ("trioserve (cache off)", ["--no-prefix-caching"]),
    ]
    for name, flags in runs:
        port = free_port()
        command = [sys.executable, "-m", "trioserve", "--port", str(port), *common, *flags]
        print(f"measuring {name}...", file=sys.stderr)
        with server(command, port, RESULTS / f"{stamp}-multiturn-{name.split()[-1].strip(')')}.log") as url:
            servers[name] = measure(url, "bench", args)
    have_peer = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("uvicorn") is not None
    if not args.skip_peers and have_peer:
        port = free_port()
        transformers_cli = str(Path(sys.executable).with_name("transformers"))
        command = [transformers_cli, "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1"]
        command += ["--dtype", "float32", "--device", "cpu", "--continuous-batching"]
        print("measuring transformers serve --continuous-batching...", file=sys.stderr)
        with server(command, port, RESULTS / f"{stamp}-multiturn-tf-serve-cb.log") as url:
            servers["tf-serve-cb"] = measure(url, str(model_dir), args)
    elif not args.skip_peers:
        print("transformers serve needs fastapi and uvicorn (pip install 'trioserve[bench]'); skipped", file=sys.stderr)
    report = {
        "when": stamp,
        "mode": "multi-turn",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "settings": {k: v for k, v in vars(args).items() if isinstance(v, int | str | float | bool)},
        "servers": servers,
    }
    out = RESULTS / f"{stamp}-multiturn.json"
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nJSON: {out}")
    return 0
