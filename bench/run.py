"""`just bench`: trioserve against the forward-pass bound and `transformers serve`, side by side, one run.

Prints a markdown table with ratios and writes the figures as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
import trio

from bench.bound import runner_bound, static_batch
from bench.client import run_level
from bench.model import bench_model_dir
from bench.servers import RESULTS, free_port, parse_levels, server
from trioserve.text.guided import json_grammar
from trioserve.text.tokenization import ChatTokenizer

# JSON mode under load: a string that cannot close within max_tokens, so every request produces exactly
# max_tokens tokens (as ignore_eos does for the plain runs, which a grammar refuses) with the grammar's
# mask computed and applied at every step.
JSON_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "long_text", "schema": {"type": "string", "minLength": 5000}},
}
PROMPT = (
    "You are a helpful assistant. Tell me, in a few sentences, what is good about the food, the weather, "
    "the cities and the rivers of the place you know best, and why people like to visit it."
)


def measure_server(url: str, levels: list[tuple[int, int]], body: dict[str, Any]) -> list[dict[str, float]]:
    results = []
    # One warm-up request: first-call costs (allocator, lazy imports) are not what we compare.
    trio.run(run_level, url, 1, 1, body | {"max_tokens": 8})
    for concurrency, requests in levels:
        result = trio.run(run_level, url, concurrency, requests, body)
        results.append(result.summary())
        print(f"  c={concurrency}: {results[-1]['output_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return results


def table(report: dict[str, Any]) -> str:
    """A markdown table: one row per concurrency, ours against the bound and each peer."""
    peers = report["peers"]
    header = ["concurrency", "static HF batch tok/s", "bound (runner alone) tok/s", "trioserve tok/s", "vs bound"]
    header += ["TTFT p50/p99 ms", "ITL p50/p99 ms"]
    for name in peers:
        header += [f"{name} tok/s", f"trioserve / {name}", f"{name} TTFT p50 ms", f"TTFT vs {name}"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, ours in enumerate(report["trioserve"]):
        c = str(int(ours["concurrency"]))
        rate = ours["output_tokens_per_s"]
        cells = [c, f"{report['static_batch'][c]:.1f}", f"{report['bound'][c]:.1f}", f"{rate:.1f}"]
        cells += [f"{rate / report['bound'][c]:.0%}"]
        cells += [
            f"{ours['ttft_p50_ms']:.0f} / {ours['ttft_p99_ms']:.0f}",
            f"{ours['itl_p50_ms']:.0f} / {ours['itl_p99_ms']:.0f}",
        ]
        for peer in peers.values():
            theirs = peer[i]
            cells += [f"{theirs['output_tokens_per_s']:.1f}", f"{rate / theirs['output_tokens_per_s']:.2f}x"]
            cells += [f"{theirs['ttft_p50_ms']:.0f}", f"{ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x"]
        rows.append("| " + " | ".join(cells) + " |")
    if report.get("trioserve_json"):
        rows += [
            "",
            "| concurrency | trioserve tok/s | with json_schema tok/s | ratio | json bound tok/s | json vs its bound |",
            "|---|---|---|---|---|---|",
        ]
        for ours, constrained in zip(report["trioserve"], report["trioserve_json"], strict=True):
            c = str(int(ours["concurrency"]))
            plain, guided, bound = (
                ours["output_tokens_per_s"],
                constrained["output_tokens_per_s"],
                report["bound_json"][c],
            )
            rows.append(
                f"| {c} | {plain:.1f} | {guided:.1f} | {guided / plain:.2f} | {bound:.1f} | {guided / bound:.0%} |"
            )
    return "\n".join(rows)


def tensor_parallel_costs(url: str) -> dict[str, float]:
    """Rank 0's per-message cost of the plan broadcast and the counts' all-gather, from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for name in ("messages", "broadcast_seconds", "gather_seconds"):
        line = next(line for line in text.splitlines() if line.startswith(f"trioserve_tp_{name}_total "))
        values[name] = float(line.split()[1])
    messages = max(values["messages"], 1.0)
    return {
        "messages": values["messages"],
        "broadcast_us": values["broadcast_seconds"] / messages * 1e6,
        "gather_us": values["gather_seconds"] / messages * 1e6,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--levels", default=None, help="concurrency:requests pairs (default 1:4,4:8,16:32)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64)")
    parser.add_argument("--skip-peers", action="store_true", help="do not run transformers serve")
    parser.add_argument("--trioserve-args", default="", help="extra flags for trioserve")
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="serve trioserve over N ranks (gloo on the CPU); reports the per-step broadcast cost",
    )
    parser.add_argument("--instant", action="store_true", help="the HTTP side's ceiling: a runner with no model")
    parser.add_argument("--step-ms", type=float, default=0.0, help="--instant: sleep per step (a device step)")
    parser.add_argument("--server-root", help="--instant: serve the trioserve package found in this checkout")
    parser.add_argument("--repeats", type=int, default=1, help="--instant: runs per level (the best is kept)")
    parser.add_argument(
        "--gpu", action="store_true", help="the GPU table: static generate, trioserve, transformers serve"
    )
    parser.add_argument("--layouts", help="--gpu: model layouts, of tiny, 1b, 8b (default 1b,8b on CUDA, else tiny)")
    parser.add_argument("--models-dir", default="/tmp/trioserve-bench-models", help="--gpu: where models are built")
    parser.add_argument(
        "--multi-turn",
        action="store_true",
        help="agent-shaped turns: prefix caching on, off, transformers serve",
    )
    parser.add_argument("--conversations", type=int, default=5, help="--multi-turn: conversations at once")
    parser.add_argument("--turns", type=int, default=6, help="--multi-turn: turns per conversation")
    parser.add_argument("--max-model-len", type=int, default=2560, help="--multi-turn: trioserve's context")
    parser.add_argument("--control", type=int, default=4, help="--multi-turn: distinct-prompt requests (no reuse)")
    parser.add_argument("--max-concurrent", type=int, default=4, help="--multi-turn: the servers' request slots")
    parser.add_argument("--prefix-cache-slots", type=int, default=4, help="--multi-turn: trioserve's cache-only slots")
    parser.add_argument(
        "--image", action="store_true", help="TTFT with one image beside a text prompt of as many tokens (CPU)"
    )
    parser.add_argument("--image-text-hidden", type=int, default=512, help="--image: the language model's width")
    parser.add_argument("--image-text-layers", type=int, default=4, help="--image: the language model's layers")
    args = parser.parse_args(argv)
    if args.image:
        from bench.vision import run_image

        args.repeats = max(args.repeats, 5)
        return run_image(args)
    if args.multi_turn:
        from bench.multiturn import run_multi_turn

        args.max_tokens = args.max_tokens or 8
        return run_multi_turn(args)
    if args.gpu:
        from bench.gpu import run_gpu

        return run_gpu(args)
    if args.instant:
        from bench.ceiling import run_ceiling

        return run_ceiling(args)
    levels = parse_levels(args.levels or "1:4,4:8,16:32")
    args.max_tokens = args.max_tokens or 64
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    print("building/loading the benchmark model...", file=sys.stderr)
    model_dir = bench_model_dir(shardable=args.tensor_parallel_size > 1)
    from transformers import AutoTokenizer

    tokenizer = ChatTokenizer(AutoTokenizer.from_pretrained(model_dir))
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.encode_chat(messages)
    body = {
        "model": "bench",
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    print("measuring the in-process bound (runner alone) and the static transformers batch...", file=sys.stderr)
    bound = {str(c): runner_bound(model_dir, prompt_ids, c, args.max_tokens) for c, _ in levels}
    static = {str(c): static_batch(model_dir, prompt_ids, c, args.max_tokens) for c, _ in levels}
    grammar = json_grammar(JSON_FORMAT["json_schema"]["schema"])
    bound_json = {str(c): runner_bound(model_dir, prompt_ids, c, args.max_tokens, grammar=grammar) for c, _ in levels}

    max_concurrency = max(c for c, _ in levels)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "trioserve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--hotload",
        "--max-concurrent",
        str(max_concurrency),
        "--torch-dtype",
        "float32",
        "--log-level",
        "warning",
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        *args.trioserve_args.split(),
    ]
    print("measuring trioserve...", file=sys.stderr)
    with server(command, port, RESULTS / f"{stamp}-trioserve.log") as url:
        ours = measure_server(url, levels, body)
        print("measuring trioserve with response_format (constrained decoding)...", file=sys.stderr)
        json_body = {k: v for k, v in body.items() if k != "ignore_eos"} | {"response_format": JSON_FORMAT}
        ours_json = measure_server(url, levels, json_body)
        collectives = tensor_parallel_costs(url) if args.tensor_parallel_size > 1 else None

    peers: dict[str, list[dict[str, float]]] = {}
    have_peer = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("uvicorn") is not None
    if not args.skip_peers and have_peer:
        transformers_cli = str(Path(sys.executable).with_name("transformers"))
        for name, flags in [("tf-serve-cb", ["--continuous-batching"]), ("tf-serve", [])]:
            port = free_port()
            command = [
                transformers_cli,
                "serve",
                str(model_dir),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--dtype",
                "float32",
                "--device",
                "cpu",
                *flags,
            ]
            print(f"measuring {name}...", file=sys.stderr)
            # transformers serve refuses fields it does not know (422), ignore_eos among them. The random
            # model rarely samples EOS; tokens/s counts the tokens actually produced either way.
            peer_body = {k: v for k, v in body.items() if k != "ignore_eos"} | {"model": str(model_dir)}
            with server(command, port, RESULTS / f"{stamp}-{name}.log") as url:
                peers[name] = measure_server(url, levels, peer_body)
    elif not args.skip_peers:
        print("transformers serve needs fastapi and uvicorn (pip install 'trioserve[bench]'); skipped", file=sys.stderr)

    report = {
        "when": stamp,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "model": {"dir": str(model_dir), "prompt_tokens": len(prompt_ids), "max_tokens": args.max_tokens},
        "bound": bound,
        "static_batch": static,
        "bound_json": bound_json,
        "trioserve": ours,
        "trioserve_json": ours_json,
        "peers": peers,
        "tensor_parallel": collectives,
    }
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    if collectives is not None:
        print(
            f"\ntensor parallel ({args.tensor_parallel_size} ranks): {collectives['messages']:.0f} messages, "
            f"broadcast {collectives['broadcast_us']:.0f} us and live-count all-gather "
            f"{collectives['gather_us']:.0f} us per message (rank 0, mean)"
        )
    print(f"\nfigures written to {out}", file=sys.stderr)
    return 0
