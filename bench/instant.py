"""The HTTP side's ceiling: trioserve with a runner that returns at once, behind a real Hypercorn.

`InstantRunner` implements the `Runner` Protocol with no model: every step returns a token for each
sequence it carries, taken from real words of a real tokenizer, so detokenizing, stop strings and logprob
entries cost what they cost with a model. What is left is everything trioserve does per token besides the
forward pass: engine delivery, token streams, text assembly, chunk serialization, SSE framing, Quart and
Hypercorn. ``step_seconds`` stands in for a device step (a sleep in the worker thread releases the GIL, as
a GPU step mostly does).

``python -m bench.instant --port N`` serves it (the bench starts it as a subprocess, so the load generator
does not share the server's GIL); ``--profile FILE`` writes cProfile statistics of the event-loop thread.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from trioserve.config import Settings
from trioserve.errors import InvalidRequest
from trioserve.types import OutputSchema, SampledToken, StepOutput, StepPlan, Tokenizer

TOP_LOGPROBS = 20  # as many alternatives as a request may ask for


@dataclass(eq=False)
class InstantRunner:
    """A `Runner` whose steps cost nothing (or ``step_seconds`` of sleep): tokens without a model.

    Generated token ``k`` of a sequence is ``words[(seq_id + k) % len(words)]``: ordinary text tokens of the
    tokenizer (never EOS), so requests run to ``max_tokens`` and every token decodes to text.
    """

    tokenizer: Tokenizer
    words: Sequence[int]
    eos_token_ids: frozenset[int]
    vocab_size: int
    model_id: str = "instant"
    max_context: int = 1 << 20
    max_batch_size: int = 1024
    prefill_whole: bool = False
    step_seconds: float = 0.0
    positions: dict[int, int] = field(default_factory=dict)  # tokens held per sequence (its "KV")
    generated: dict[int, int] = field(default_factory=dict)
    steps: int = 0

    def compile_grammar(self, spec: OutputSchema) -> str:
        raise InvalidRequest("the instant runner samples no logits, so it takes no grammar", param=spec.param)

    def live_sequences(self) -> int:
        return len(self.positions)

    def kv_tokens(self) -> int:
        return sum(self.positions.values())

    def prefix_cache_stats(self) -> None:
        return None  # it holds no KV to reuse

    def release(self, seq_id: int) -> None:
        self.positions.pop(seq_id, None)
        self.generated.pop(seq_id, None)

    def step(self, plan: StepPlan) -> StepOutput:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.steps += 1
        tokens: dict[int, SampledToken] = {}
        for chunk in plan.prefill:
            if chunk.start == 0:
                self.positions[chunk.seq_id] = chunk.end
                self.generated[chunk.seq_id] = 0
            else:
                self.positions[chunk.seq_id] += chunk.end - chunk.start
            if chunk.is_last:
                tokens[chunk.seq_id] = self._next(chunk.seq_id)
        for seq_id in plan.decode:
            tokens[seq_id] = self._next(seq_id)
        return StepOutput(tokens)

    def _next(self, seq_id: int) -> SampledToken:
        self.positions[seq_id] += 1
        count = self.generated[seq_id]
        self.generated[seq_id] = count + 1
        words = self.words
        start = seq_id + count
        top = tuple((words[(start + i) % len(words)], -1.0 - i) for i in range(TOP_LOGPROBS))
        return SampledToken(words[start % len(words)], -1.0, top)


def word_tokens(tokenizer: Tokenizer, eos: frozenset[int], vocab_size: int, count: int = 512) -> list[int]:
    """Token ids that decode to plain printable text (merged words where the vocabulary has them)."""
    words = []
    for token_id in range(vocab_size - 1, -1, -1):
        if token_id in eos:
            continue
        text = tokenizer.decode([token_id])
        if text and text.isprintable() and "\ufffd" not in text:
            words.append(token_id)
            if len(words) == count:
                break
    return words


def instant_runner(model_dir: str | None, step_seconds: float = 0.0) -> InstantRunner:
    """The instant runner on a tokenizer: the one saved in ``model_dir``, else the demo model's."""
    from transformers import AutoTokenizer

    from trioserve.model.tinymodel import build_tokenizer
    from trioserve.text.tokenization import ChatTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir) if model_dir else build_tokenizer()
    tokenizer = ChatTokenizer(hf)
    eos = frozenset(int(hf.convert_tokens_to_ids(name)) for name in ("<|im_end|>", "<|endoftext|>"))
    vocab = len(hf)
    return InstantRunner(tokenizer, word_tokens(tokenizer, eos, vocab), eos, vocab, step_seconds=step_seconds)


async def _serve(settings: Settings, runner: InstantRunner) -> None:
    from hypercorn.trio import serve

    from trioserve.cli import build_app, drain_on_signal, hypercorn_config

    app = build_app(settings, load=lambda: runner)
    await serve(app, hypercorn_config(settings), shutdown_trigger=functools.partial(drain_on_signal, app))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.instant", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", help="a model directory whose tokenizer to use (default: the demo model's)")
    parser.add_argument("--step-ms", type=float, default=0.0, help="sleep per step in the worker thread")
    parser.add_argument("--max-concurrent", type=int, default=64)
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (seconds) for the experiment")
    parser.add_argument("--profile", help="write cProfile statistics of the event loop here on exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING")
    settings = Settings(
        port=args.port, hotload=True, max_concurrent=args.max_concurrent, max_queue=4096, log_level="warning"
    )
    runner = instant_runner(args.model, args.step_ms / 1000)
    if args.switch_interval:
        import sys

        sys.setswitchinterval(args.switch_interval)
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            trio.run(_serve, settings, runner)
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        trio.run(_serve, settings, runner)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
