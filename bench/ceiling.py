"""`./dev bench --instant`: the HTTP side's ceiling, streamed tokens/s and SSE events/s with no model.

Starts `bench.instant` (trioserve on `InstantRunner`, real Hypercorn) in its own process and drives
streaming chat clients against it at each concurrency; prints a table and writes JSON under bench/results/.
``--server-root`` serves another checkout's trioserve package with the same runner and client, so a
before/after comparison runs side by side in one invocation (e.g. ``--server-root /tmp/main``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import trio

from bench.client import run_level
from bench.model import bench_model_dir
from bench.servers import RESULTS, free_port, parse_levels, server

PROMPT = "Explain how a context manager works in Python. (#1)"
INSTANT = Path(__file__).with_name("instant.py")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    url: str, pid: int, levels: list[tuple[int, int]], body: dict[str, Any], repeats: int
) -> list[dict[str, float]]:
    """Each level's best run of ``repeats``, with the server's CPU time per streamed token (which a busy
    machine disturbs far less than throughput: it is the cost, not the rate)."""
    trio.run(run_level, url, 4, 8, body | {"max_tokens": 16})  # warm-up
    results = []
    for concurrency, requests in levels:
        runs = []
        for _ in range(repeats):
            before = cpu_seconds(pid)
            summary = trio.run(run_level, url, concurrency, requests, body).summary()
            used = cpu_seconds(pid) - before
            tokens = summary["output_tokens_per_s"] * summary["wall_seconds"]
            summary["server_cpu_us_per_token"] = 1e6 * used / tokens
            runs.append(summary)
        best = max(runs, key=lambda r: r["output_tokens_per_s"])
        best["server_cpu_us_per_token"] = min(r["server_cpu_us_per_token"] for r in runs)
        results.append(best)
        print(
            f"  c={concurrency}: {best['output_tokens_per_s']:.0f} tok/s, {best['events_per_s']:.0f} events/s, "
            f"server CPU {best['server_cpu_us_per_token']:.0f} us/token",
            file=sys.stderr,
        )
    return results


def run_server(
    root: str | None,
    model_dir: Path,
    step_ms: float,
    levels: list[tuple[int, int]],
    body: dict[str, Any],
    repeats: int,
    log: Path,
) -> list[dict[str, float]]:
    port = free_port()
    max_concurrency = max(c for c, _ in levels)
    # Run as a script: its own directory and then PYTHONPATH come first, so ``root`` decides which
    # trioserve package is imported, while the runner and the client stay the same.
    command = [sys.executable, str(INSTANT), "--port", str(port), "--model", str(model_dir)]
    command += ["--step-ms", str(step_ms), "--max-concurrent", str(max_concurrency)]
    root_path = str(Path(root or Path(__file__).parent.parent).resolve())
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [root_path, os.environ.get("PYTHONPATH")]))}
    pids: list[int] = []
    with server(command, port, log, env=env, ready_s=120, started=pids) as url:
        return measure(url, pids[0], levels, body, repeats)


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    header = (
        "| server | concurrency | streamed tok/s | SSE events/s | tokens/event | server CPU µs/token "
        "| TTFT p50 ms | ITL p50 / p99 ms |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        for r in results:
            lines.append(
                f"| {name} | {int(r['concurrency'])} | {r['output_tokens_per_s']:,.0f} | {r['events_per_s']:,.0f} | "
                f"{r['tokens_per_event']:.2f} | {r['server_cpu_us_per_token']:.0f} | {r['ttft_p50_ms']:.1f} | "
                f"{r['itl_p50_ms']:.2f} / {r['itl_p99_ms']:.2f} |"
            )
    return "\n".join(lines)


def run_ceiling(args: argparse.Namespace) -> int:
    levels = parse_levels(args.levels or "1:8,16:64,64:128")
    max_tokens = args.max_tokens or 128
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model_dir = bench_model_dir()  # only its tokenizer is used
    body = {
        "model": "instant",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rows: dict[str, list[dict[str, float]]] = {}
    if args.server_root:
        print(f"measuring {args.server_root}...", file=sys.stderr)
        log = RESULTS / f"{stamp}-instant-root.log"
        rows[args.server_root] = run_server(args.server_root, model_dir, args.step_ms, levels, body, args.repeats, log)
    print("measuring this checkout...", file=sys.stderr)
    log = RESULTS / f"{stamp}-instant.log"
    rows["this checkout"] = run_server(None, model_dir, args.step_ms, levels, body, args.repeats, log)
    report = {
        "when": stamp,
        "mode": "instant",
        "step_ms": args.step_ms,
        "max_tokens": max_tokens,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "servers": rows,
    }
    out = RESULTS / f"{stamp}-instant.json"
    out.write_text(json.dumps(report, indent=2))
    print(table(rows))
    print(f"\nfigures written to {out}", file=sys.stderr)
    return 0
