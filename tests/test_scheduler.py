"""The scheduler's prefill planning for models whose prompts must go through in one pass."""

from __future__ import annotations

from trioserve.engine.scheduler import Phase, Scheduler
from trioserve.types import GenerationRequest, SamplingParams


def request(name: str, length: int) -> GenerationRequest:
    return GenerationRequest(name, tuple(range(3, 3 + length)), SamplingParams(max_tokens=4))


def prefill_plans(scheduler: Scheduler) -> list[tuple[tuple[int, int, int], ...]]:
    """Plans steps until nothing prefills any more; each step's chunks as (seq_id, start, end)."""
    plans = []
    while True:
        plan = scheduler.plan()
        if not plan.prefill:
            return plans
        plans.append(tuple((c.seq_id, c.start, c.end) for c in plan.prefill))
        for chunk in plan.prefill:
            scheduler.prefilled(chunk)


def test_a_long_prompt_goes_in_chunks_by_default() -> None:
    scheduler = Scheduler(max_running=4, max_waiting=4, batch_size=1, prefill_chunk=16)
    scheduler.submit(0, request("long", 40))
    assert prefill_plans(scheduler) == [((0, 0, 16),), ((0, 16, 32),), ((0, 32, 40),)]


def test_prefill_whole_puts_each_prompt_through_in_one_step() -> None:
    scheduler = Scheduler(max_running=4, max_waiting=4, batch_size=1, prefill_chunk=16, prefill_whole=True)
    scheduler.submit(0, request("long", 40))
    scheduler.submit(1, request("short", 5))
    scheduler.submit(2, request("longer", 100))
    assert prefill_plans(scheduler) == [((0, 0, 40),), ((1, 0, 5),), ((2, 0, 100),)]
    assert all(scheduler.phase(seq_id) is Phase.DECODING for seq_id in range(3))


def test_prefill_whole_with_batching_still_groups_short_prompts() -> None:
    scheduler = Scheduler(max_running=4, max_waiting=4, batch_size=4, prefill_chunk=16, prefill_whole=True)
    scheduler.submit(0, request("a", 6))
    scheduler.submit(1, request("b", 7))
    scheduler.submit(2, request("long", 30))
    assert prefill_plans(scheduler) == [((0, 0, 6), (1, 0, 7)), ((2, 0, 30),)]
