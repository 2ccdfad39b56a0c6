"""`./dev bench --gpu`: the issue's GPU table in one run, per model layout.

For each layout (random-weight Llama-3.2-1B and Llama-3.1-8B shapes, or ``tiny`` to exercise the whole
procedure on a CPU): transformers' own static-cache ``generate`` (compiled on CUDA), trioserve, and
``transformers serve --continuous-batching``, each driven by the same streaming clients at c=1/16/64 with
2c requests: a 23-token ChatML prompt, 128 streamed tokens, temperature 0. tokens/s = completion tokens
(from usage) / wall time. Prints the table and writes JSON, with the device's name, under bench/results/.
Every model, server and bound runs in a process of its own, so each starts with the GPU to itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

from bench.client import run_level
from bench.layouts import LAYOUTS
from bench.servers import RESULTS, free_port, parse_levels, server
from bench.static_generate import PROMPT


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def measure(url: str, levels: list[tuple[int, int]], body: dict[str, Any], name: str) -> list[dict[str, float]]:
    trio.run(run_level, url, 1, 1, body | {"max_tokens": 8})  # warm-up: first-call costs are not compared
    results = []
    for concurrency, requests in levels:
        result = trio.run(run_level, url, concurrency, requests, body).summary()
        results.append(result)
        print(f"  {name} c={concurrency}: {result['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return results


def static_bound(model_dir: Path, max_tokens: int, batches: list[int], log: Path) -> dict[str, dict[str, float]]:
    command = [sys.executable, "-m", "bench.static_generate", str(model_dir), str(max_tokens)]
    command.append(",".join(str(b) for b in batches))
    with log.open("w") as err:
        out = subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=err, text=True).stdout
    return {str(int(r["batch"])): r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}


def run_layout(layout: str, args: argparse.Namespace, stamp: str, cuda: bool) -> dict[str, Any]:
    model_dir = Path(args.models_dir) / layout
    print(f"[{layout}] building the model in {model_dir} (once)...", file=sys.stderr)
    device = "cuda" if cuda else "cpu"
    subprocess.run([sys.executable, "-m", "bench.layouts", layout, str(model_dir), device], check=True)
    levels = parse_levels(args.levels or "1:2,16:32,64:128")
    max_concurrency = max(c for c, _ in levels)
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    report: dict[str, Any] = {"model_dir": str(model_dir)}
    print(f"[{layout}] transformers static-cache generate...", file=sys.stderr)
    log = RESULTS / f"{stamp}-{layout}-static.log"
    report["static_generate"] = static_bound(model_dir, args.max_tokens, [c for c, _ in levels], log)

    port = free_port()
    command = [sys.executable, "-m", "trioserve", "--model", str(model_dir), "--port", str(port), "--hotload"]
    command += ["--max-concurrent", str(max_concurrency), "--log-level", "warning", *args.trioserve_args.split()]
    print(f"[{layout}] trioserve...", file=sys.stderr)
    with server(command, port, RESULTS / f"{stamp}-{layout}-trioserve.log", ready_s=900) as url:
        report["trioserve"] = measure(url, levels, body | {"model": "m", "ignore_eos": True}, "trioserve")

    have_peer = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("uvicorn") is not None
    if args.skip_peers or not have_peer:
        print(f"[{layout}] transformers serve skipped (--skip-peers, or no fastapi/uvicorn)", file=sys.stderr)
        return report
    port = free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--continuous-batching"]
    command += ["--port", str(port), "--host", "127.0.0.1", "--device", device]
    command += ["--dtype", "bfloat16" if cuda else "float32"]
    print(f"[{layout}] transformers serve --continuous-batching...", file=sys.stderr)
    # transformers serve refuses fields it does not know (ignore_eos among them); random weights rarely
    # sample EOS, and tokens/s counts the tokens actually produced either way.
    with server(command, port, RESULTS / f"{stamp}-{layout}-tf-serve-cb.log", ready_s=900) as url:
        report["tf_serve_cb"] = measure(url, levels, body | {"model": str(model_dir)}, "transformers serve CB")
    return report


def table(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}", ""]
    header = "| layout | system | c | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
    for layout, figures in report["layouts"].items():
        lines += [header, "|---|---|---|---|---|---|"]
        for c, bound in figures["static_generate"].items():
            compiled = "compiled, " if bound["compiled"] else ""
            name = f"transformers generate, static cache ({compiled}one static batch)"
            lines.append(f"| {layout} | {name} | {c} | {bound['tok_per_s']:,.1f} | | {bound['ms_per_step']:.1f} |")
        for key, name in (("trioserve", "trioserve"), ("tf_serve_cb", "transformers serve --continuous-batching")):
            for r in figures.get(key, []):
                lines.append(
                    f"| {layout} | {name} | {int(r['concurrency'])} | {r['output_tokens_per_s']:,.1f} | "
                    f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |"
                )
        lines.append("")
    return "\n".join(lines)


def run_gpu(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    layouts = (args.layouts or ("1b,8b" if cuda else "tiny")).split(",")
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown:
        print(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    args.max_tokens = args.max_tokens or 128
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report: dict[str, Any] = {
        "when": stamp,
        "device": device_name(),
        "torch": torch.__version__,
        "max_tokens": args.max_tokens,
        "layouts": {},
    }
    for layout in layouts:
        report["layouts"][layout] = run_layout(layout, args, stamp, cuda)
    slug = report["device"].split(" (")[0].replace(" ", "-").lower()
    out = RESULTS / f"{stamp}-gpu-{slug}.json"
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nfigures written to {out}", file=sys.stderr)
    return 0
