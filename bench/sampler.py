"""Micro-benchmark of `sample_rows`: the batched sampler against the row-by-row one it replaced.

    python -m bench.sampler [--vocab 32000] [--steps 30] [--device cpu] [--threads N] [--grammar]

For 1, 16 and 64 rows it times one call (median over ``--steps`` calls on fresh samplers, after two
warm-up calls) for three batches: all plain greedy; all default sampling (temperature 1, seeded); and a
mix cycling through greedy, top-p, top-k + top-p, min-p, penalties with logit bias, and top logprobs. The
old implementation is read from git (`OLD`, the last commit before the rewrite) and imported as a module.
``--grammar`` adds sampled rows under a JSON grammar, with the bench model's 16k tokenizer (old guides
from `OLD`'s guided.py against the new ones).

On a shared CPU, run with ``--threads 1`` for the algorithmic comparison: the batched ops are large enough
for torch to split them over its threads (the old row-by-row ones mostly were not), and when the other
core is busy each such split waits for the scheduler to run the second thread (a few ms).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from trioserve.model import sampling
from trioserve.types import SamplingParams

OLD = "308cb81"  # main before the batched sampler

MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9, seed=1),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.95),
    SamplingParams(min_p=0.05),
    SamplingParams(temperature=0.0, repetition_penalty=1.1, presence_penalty=0.3, logit_bias={11: 2.0}),
    SamplingParams(frequency_penalty=0.2, logprobs=5),
]
BATCHES = {
    "greedy": [SamplingParams(temperature=0.0)],
    "sampled": [SamplingParams(seed=7)],
    "mixed": MIXED,
}


def load_old(name: str) -> ModuleType:
    """``trioserve/<name>.py`` as it was at `OLD`, imported as ``old_<name>``."""
    source = subprocess.run(
        ["git", "show", f"{OLD}:trioserve/{name}.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"old_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"old_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_calls(
    module: Any,
    params: Sequence[SamplingParams],
    rows: int,
    vocab: int,
    steps: int,
    device: str,
    guide: Callable[[], Any] | None = None,
) -> float:
    """Median milliseconds of one `sample_rows` call over ``rows`` sequences cycling through ``params``,
    each with a fresh guide from ``guide`` if given."""
    dev = torch.device(device)
    prompt = tuple(range(0, 400, 3))
    samplers = [
        module.SequenceSampler(params[i % len(params)], prompt, vocab, dev, guide() if guide else None)
        for i in range(rows)
    ]
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(rows, vocab, generator=generator).to(dev) * 3 for _ in range(4)]
    sample: Callable[..., Any] = module.sample_rows
    eos = frozenset({2})
    for step in range(2):
        sample(logits[step % 4], samplers, eos)
    times = []
    for step in range(steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        sample(logits[step % 4], samplers, eos)  # returns Python ints: synchronised
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--grammar", action="store_true", help="also rows under a JSON grammar (16k vocabulary)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    old = load_old("sampling")
    print(
        f"sample_rows, ms per call (median of {args.steps}), vocab {args.vocab}, device {args.device}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"| batch | rows | old ({OLD}) | new | old / new |")
    print("|---|---|---|---|---|")
    for name, params in BATCHES.items():
        for rows in (1, 16, 64):
            before = time_calls(old, params, rows, args.vocab, args.steps, args.device)
            after = time_calls(sampling, params, rows, args.vocab, args.steps, args.device)
            print(f"| {name} | {rows} | {before:.2f} | {after:.2f} | {before / after:.1f}x |", flush=True)
    if args.grammar:
        grammar_rows(old, args.steps, args.device)
    return 0


def grammar_rows(old: ModuleType, steps: int, device: str) -> None:
    """Sampled rows, each under a JSON grammar that stays open (a long string), with the bench model's
    tokenizer (16k vocabulary): the masks' cost, old guides (a bytes mask each) against new ones (a row of
    the batch's bitmask each)."""
    from trioserve.model.tinymodel import build_tokenizer
    from trioserve.text.guided import GuideFactory, json_grammar

    tokenizer = build_tokenizer(16384)
    vocab, eos = len(tokenizer), frozenset({int(tokenizer.convert_tokens_to_ids("<|im_end|>"))})
    grammar = json_grammar({"type": "string", "minLength": 5000})
    factories = {
        "new": GuideFactory(tokenizer, vocab, eos),
        "old": load_old("guided").GuideFactory(tokenizer, vocab, eos),
    }
    params = [SamplingParams(grammar=grammar)]
    for rows in (1, 16, 64):
        before = time_calls(old, params, rows, vocab, steps, device, lambda: factories["old"].guide(grammar))
        after = time_calls(sampling, params, rows, vocab, steps, device, lambda: factories["new"].guide(grammar))
        print(
            f"| json grammar, vocab {vocab} | {rows} | {before:.2f} | {after:.2f} | {before / after:.1f}x |", flush=True
        )


if __name__ == "__main__":
    sys.exit(main())
