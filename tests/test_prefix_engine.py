"""The engine with a runner that reports prefix-cache hits, under trio's MockClock: a hit shortens prefill to
what the cache lacks, the stream learns its cached count, and a cancellation during a partly cached
prefill releases at the step boundary exactly as without a cache."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
import trio.testing
from transformers import DynamicCache

from tests.fakes import DECODE_SECONDS, PREFILL_SECONDS, FakeRunner
from tests.test_engine import CHUNK, collect, expected, request, running_engine
from trioserve.types import SampledToken, StepOutput, StepPlan


@dataclass
class CachingFakeRunner(FakeRunner):
    """A fake runner whose prompts of requests named ``hit-*`` find all but their last ``missing`` tokens in a
    cache: their first chunk starts there and covers as many tokens as the chunk would (as the real runner)."""

    missing: int = 3

    def step(self, plan: StepPlan) -> StepOutput:
        for seq_id in plan.seq_ids():
            assert seq_id not in self.released, f"released sequence {seq_id} reached a forward pass"
        tokens: dict[int, SampledToken] = {}
        held: dict[int, int] = {}
        cached: dict[int, int] = {}
        for chunk in plan.prefill:
            size = len(chunk.request.prompt_ids)
            start = chunk.start
            if chunk.start == 0:
                self.caches[chunk.seq_id] = DynamicCache()
                self.requests[chunk.seq_id] = chunk.request.request_id
                self.positions[chunk.seq_id] = 0
                hit = size - self.missing if chunk.request.request_id.startswith("hit") else 0
                cached[chunk.seq_id] = hit
                start = hit
            held[chunk.seq_id] = min(start + chunk.end - chunk.start, size)
            if held[chunk.seq_id] == size:
                tokens[chunk.seq_id] = self._next(chunk.seq_id)
        for seq_id in plan.decode:
            tokens[seq_id] = self._next(seq_id)
        return StepOutput(tokens, prefilled=held, cached=cached)


async def test_a_hit_prefills_only_what_the_cache_lacks(autojump_clock: trio.testing.MockClock) -> None:
    runner = CachingFakeRunner()
    async with running_engine(runner) as engine:
        start = trio.current_time()
        times: list[float] = []
        # 3 chunks of 16 without a cache; with all but 3 tokens cached, one step gives the first token.
        tokens = await collect(engine, request("hit-a", prompt_tokens=3 * CHUNK, max_tokens=2), times)
        assert tokens == expected("hit-a", 2)
        assert [t - start for t in times] == pytest.approx(
            [PREFILL_SECONDS, PREFILL_SECONDS + DECODE_SECONDS], abs=1e-9
        )
        cold_start = trio.current_time()
        cold: list[float] = []
        await collect(engine, request("cold", prompt_tokens=3 * CHUNK, max_tokens=1), cold)
        assert cold[0] - cold_start == pytest.approx(3 * PREFILL_SECONDS, abs=1e-9)
    assert [r.cached_tokens for r in engine.history] == [3 * CHUNK - 3, 0]
    assert runner.live_sequences() == 0


async def test_the_stream_knows_its_cached_tokens_before_its_first_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = CachingFakeRunner()
    async with running_engine(runner) as engine, engine.submit(request("hit-b", prompt_tokens=20)) as stream:
        assert stream.cached_tokens == 0
        async for _ in stream:
            assert stream.cached_tokens == 17
            break


async def test_a_cancel_during_a_partly_cached_prefill_releases_before_the_next_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """All but 40 tokens cached: the first chunk (16 new tokens) leaves 24 to go. Closed while that step runs,
    the sequence is released when it returns, before anything else is planned, and never carried again."""
    runner = CachingFakeRunner(missing=40)
    async with running_engine(runner) as engine:
        start = trio.current_time()
        with trio.move_on_after(PREFILL_SECONDS / 2):
            await collect(engine, request("hit-c", prompt_tokens=100, max_tokens=5))
        # Leaving the stream waited (shielded) for the step in flight, and no longer: its KV is gone now.
        assert trio.current_time() - start == pytest.approx(PREFILL_SECONDS, abs=1e-9)
        assert runner.released == [0]
        record = engine.history[-1]
        assert record.outcome == "closed" and record.released - start == pytest.approx(PREFILL_SECONDS, abs=1e-9)
        assert len(runner.passes_carrying(0)) == 1
        # The engine goes on: a later request is served normally.
        assert await collect(engine, request("after", max_tokens=2)) == expected("after", 2)
    assert runner.live_sequences() == 0
