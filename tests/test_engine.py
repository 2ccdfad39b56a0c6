"""Engine semantics under trio's MockClock: admission, cancellation at every stage, exact virtual times.

Steps take virtual time through `FakeRunner.offload` (prefill chunk 10 ms, decode pass 5 ms, both in one step
15 ms), so every assertion on `trio.current_time()` is exact.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.fakes import DECODE_SECONDS, PREFILL_SECONDS, FakeRunner, fake_token
from trioserve.engine.engine import Engine
from trioserve.errors import GenerationFailed, Overloaded
from trioserve.types import FinishReason, GenerationRequest, SamplingParams, StepPlan

CHUNK = 16


def request(name: str, prompt_tokens: int = 4, max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(name, tuple(range(2, 2 + prompt_tokens)), SamplingParams(max_tokens=max_tokens))


def expected(name: str, count: int) -> list[int]:
    return [fake_token(name, i) for i in range(count)]


@asynccontextmanager
async def running_engine(runner: FakeRunner, **options: int) -> AsyncIterator[Engine]:
    settings = {"max_concurrent": 4, "max_queue": 4, "batch_size": 8} | options
    engine = Engine(lambda: runner, prefill_chunk=CHUNK, hotload=True, offload=runner.offload, **settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


async def collect(engine: Engine, req: GenerationRequest, times: list[float] | None = None) -> list[int]:
    tokens = []
    async with engine.submit(req) as stream:
        async for event in stream:
            tokens.append(event.token.token_id)
            if times is not None:
                times.append(trio.current_time())
    return tokens


async def test_single_request_exact_timeline(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner) as engine:
        start = trio.current_time()
        times: list[float] = []
        tokens = await collect(engine, request("a", max_tokens=3), times)
    assert tokens == expected("a", 3)
    # The first token comes from the prefill step, then one per decode step.
    assert [t - start for t in times] == pytest.approx(
        [PREFILL_SECONDS, PREFILL_SECONDS + DECODE_SECONDS, PREFILL_SECONDS + 2 * DECODE_SECONDS], abs=1e-9
    )
    assert runner.live_sequences() == 0
    assert engine.history[-1].outcome == "length"


async def test_eos_finishes_with_stop(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner(eos_token_ids=frozenset({fake_token("e", 1)}))
    async with running_engine(runner) as engine:
        events = []
        async with engine.submit(request("e", max_tokens=10)) as stream:
            events = [event async for event in stream]
    assert [e.finish_reason for e in events] == [None, FinishReason.STOP]
    assert runner.live_sequences() == 0


async def test_concurrent_requests_batch_and_keep_their_tokens(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    results: dict[str, list[int]] = {}
    async with running_engine(runner) as engine:

        async def one(name: str, max_tokens: int) -> None:
            results[name] = await collect(engine, request(name, max_tokens=max_tokens))

        async with trio.open_nursery() as nursery:
            for name, max_tokens in [("a", 6), ("b", 4), ("c", 9)]:
                nursery.start_soon(one, name, max_tokens)
    assert results == {"a": expected("a", 6), "b": expected("b", 4), "c": expected("c", 9)}
    # Decode passes carried several sequences at once.
    assert max(len(p.plan.decode) for p in runner.passes) == 3
    assert runner.live_sequences() == 0


async def test_cancel_while_waiting_for_a_slot(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_concurrent=1) as engine:
        a_tokens: list[int] = []
        c_times: list[float] = []

        async def run_a() -> None:
            a_tokens.extend(await collect(engine, request("a", max_tokens=5)))

        async def run_c() -> None:
            await collect(engine, request("c", max_tokens=1), c_times)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_a)
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(0.012):
                await collect(engine, request("b"))  # waits behind a, then gives up
            assert engine.waiting == 0 and engine.running == 1
            nursery.start_soon(run_c)
    assert a_tokens == expected("a", 5)
    # b never reached the runner; c took the slot as soon as a finished (t = 10 + 4*5 = 30 ms).
    assert all(c.request.request_id != "b" for p in runner.passes for c in p.plan.prefill)
    a_done = PREFILL_SECONDS + 4 * DECODE_SECONDS
    assert c_times == pytest.approx([a_done + PREFILL_SECONDS], abs=1e-9)


async def test_cancel_during_prefill_drops_cache_and_frees_slot(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_concurrent=1) as engine:
        waiter_times: list[float] = []
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                async with engine.submit(request("long", prompt_tokens=3 * CHUNK)) as stream:
                    nursery.start_soon(collect, engine, request("next", max_tokens=1), waiter_times)
                    await trio.sleep(0.015)  # in the middle of the second of three chunks
                    cache = runner.cache_ref(0)
                    scope.cancel()
                    await stream.__anext__()
            exited = trio.current_time()
            # The step carrying the chunk cannot be interrupted: the scope exits when it returns, KV gone.
            assert exited == pytest.approx(2 * PREFILL_SECONDS, abs=1e-9)
            gc.collect()
            assert cache() is None
            assert runner.live_sequences() == 0
    carrying = runner.passes_carrying(0)
    assert [c.end for p in carrying for c in p.plan.prefill] == [CHUNK, 2 * CHUNK]
    assert all(p.started < exited for p in carrying)
    # The slot went to the waiter at the very next step.
    assert waiter_times == pytest.approx([exited + PREFILL_SECONDS], abs=1e-9)


async def test_cancel_between_decode_steps_keeps_others_unchanged(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner) as engine:
        other: list[int] = []

        async def run_other() -> None:
            other.extend(await collect(engine, request("other", max_tokens=12)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_other)
            await trio.testing.wait_all_tasks_blocked()
            got = []
            async with engine.submit(request("quitter", max_tokens=50)) as stream:
                async for event in stream:
                    got.append(event.token.token_id)
                    if len(got) == 3:
                        cache = runner.cache_ref(1)
                        break
            exited = trio.current_time()
            gc.collect()
            assert cache() is None, "the KV must be gone once the request's scope has exited"
    assert got == expected("quitter", 3)
    assert other == expected("other", 12)
    later = [p for p in runner.passes if p.started >= exited]
    assert later, "the other request kept running after the quitter left"
    assert all(1 not in p.plan.seq_ids() for p in later)


async def test_cancel_mid_step_drops_rows_before_next_step(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner) as engine:
        other: list[int] = []
        async with trio.open_nursery() as nursery:

            async def run_other() -> None:
                other.extend(await collect(engine, request("other", max_tokens=10)))

            nursery.start_soon(run_other)
            await trio.testing.wait_all_tasks_blocked()
            deadline = trio.current_time() + 0.037  # inside a 5 ms decode step
            with trio.move_on_at(deadline):
                async with engine.submit(request("cut", max_tokens=50)) as stream:
                    async for _ in stream:
                        pass
            exited = trio.current_time()
    # The step running at the deadline carried "cut"; the scope exit waited it out, and no more.
    (in_flight,) = [p for p in runner.passes if p.started < deadline < p.ended]
    assert 1 in in_flight.plan.seq_ids()
    assert exited == pytest.approx(in_flight.ended, abs=1e-9)
    assert exited == pytest.approx(deadline + 0.003, abs=1e-9)
    after = [p for p in runner.passes if p.started >= exited - 1e-9]
    assert all(1 not in p.plan.seq_ids() for p in after)
    assert other == expected("other", 10)
    assert runner.live_sequences() == 0


async def test_stopping_the_engine_mid_step_still_releases_and_ends_release_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The engine cancelled while a step runs (shutdown): a request leaving at that moment still gets its KV
    released when the step's thread returns, so its shielded wait for the release ends."""
    runner = FakeRunner()
    engine = Engine(
        lambda: runner,
        prefill_chunk=CHUNK,
        hotload=True,
        offload=runner.offload,
        max_concurrent=4,
        max_queue=4,
        batch_size=8,
    )
    exited: list[float] = []
    async with trio.open_nursery() as nursery:
        engine_scope = trio.CancelScope()

        async def run_engine(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with engine_scope:
                await engine.run(task_status=task_status)

        await nursery.start(run_engine)
        deadline = trio.current_time() + 0.037  # inside a 5 ms decode step

        async def client() -> None:
            with trio.move_on_at(deadline):
                async with engine.submit(request("cut", max_tokens=50)) as stream:
                    async for _ in stream:
                        pass
            exited.append(trio.current_time())

        nursery.start_soon(client)
        await trio.sleep_until(deadline)
        engine_scope.cancel()
    (in_flight,) = [p for p in runner.passes if p.started < deadline < p.ended]
    assert exited == [pytest.approx(in_flight.ended, abs=1e-9)]
    assert runner.live_sequences() == 0


async def test_queue_full_is_overloaded_and_frees_on_leave(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_concurrent=1, max_queue=1) as engine:
        first = engine.submit(request("1", max_tokens=100))
        second = engine.submit(request("2"))
        with pytest.raises(Overloaded):
            engine.submit(request("3"))
        second.close()  # leaving the queue frees its place at once
        third = engine.submit(request("3"))
        first.close()
        third.close()
        assert engine.active == 0


async def test_failed_step_fails_only_its_sequences(autojump_clock: trio.testing.MockClock) -> None:
    # Bystanders the failing step does not carry: one decoding (one sequence per decode pass, so the pass that
    # prefills "doomed" decodes only one of "early" and "late") and one queued behind a full house.
    carried: list[StepPlan] = []

    def fail_once(plan: StepPlan) -> BaseException | None:
        if any(c.request.request_id == "doomed" for c in plan.prefill) and not carried:
            carried.append(plan)
            return RuntimeError("simulated CUDA error")
        return None

    runner = FakeRunner(fail_when=fail_once, max_batch_size=1)
    results: dict[str, list[int] | str] = {}

    async def one(name: str, max_tokens: int) -> None:
        try:
            results[name] = await collect(engine, request(name, max_tokens=max_tokens))
        except GenerationFailed:
            results[name] = "failed"

    async with running_engine(runner, batch_size=1, max_concurrent=3, max_queue=4) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "early", 8)
            nursery.start_soon(one, "late", 8)
            await trio.sleep(3 * PREFILL_SECONDS)  # both decoding now
            nursery.start_soon(one, "doomed", 5)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "queued", 3)  # no slot: waits while "doomed" runs
            await trio.testing.wait_all_tasks_blocked()
            assert engine.waiting == 2  # "doomed" and "queued", submitted while a step runs: both live
        assert engine.active == 0
    (plan,) = carried
    assert results.pop("doomed") == "failed"
    by_id = {c.seq_id: c.request.request_id for p in runner.passes for c in p.plan.prefill}
    in_failed_step = {by_id.get(seq_id, "doomed") for seq_id in plan.seq_ids()}
    spared = set(results) - in_failed_step
    assert {"queued"} < spared  # a queued bystander and at least one decoding one, outside the failed step
    for name, tokens in results.items():
        if name in spared:
            assert tokens == expected(name, {"queued": 3}.get(name, 8)), name
        else:
            assert tokens == "failed", name
    assert runner.live_sequences() == 0


async def test_one_request_per_pass_mode_interleaves(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner(max_batch_size=1)
    results: dict[str, list[int]] = {}
    async with running_engine(runner, batch_size=1) as engine:

        async def one(name: str) -> None:
            results[name] = await collect(engine, request(name, max_tokens=4))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "x")
            nursery.start_soon(one, "y")
    assert results == {"x": expected("x", 4), "y": expected("y", 4)}
    assert all(len(p.plan.decode) <= 1 for p in runner.passes)
    decoded = [p.plan.decode[0] for p in runner.passes if p.plan.decode]
    assert set(decoded[:4]) == {0, 1}  # in turn, not one after the other


async def test_lazy_load_happens_once_for_concurrent_first_requests(autojump_clock: trio.testing.MockClock) -> None:
    loads: list[int] = []
    runner = FakeRunner()

    def load() -> FakeRunner:
        loads.append(1)
        return runner

    engine = Engine(load, max_concurrent=4, max_queue=4, batch_size=4, hotload=False, offload=runner.offload)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert engine.runner is None
        results: list[list[int]] = []

        async def first(name: str) -> None:
            async with engine.generate(request(name, max_tokens=2)) as stream:
                results.append([e.token.token_id async for e in stream])

        async with trio.open_nursery() as inner:
            for name in "pqr":
                inner.start_soon(first, name)
        nursery.cancel_scope.cancel()
    assert loads == [1]
    assert len(results) == 3


# -- backpressure: a stream that reads slowly (or never) holds its slot, not the device ---------------------


async def test_a_stream_that_reads_nothing_stops_decoding_at_the_bound_and_keeps_its_kv(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_unread=4) as engine:
        idle = engine.submit(request("idle", max_tokens=1000))
        busy = await collect(engine, request("busy", max_tokens=20))  # the batch goes on without it
        await trio.sleep(60)  # a minute of virtual time: nothing reads `idle`
        idle_id = next(seq for seq, name in runner.requests.items() if name == "idle")
        carried = sum(idle_id in p.plan.seq_ids() for p in runner.passes)
        assert carried == 4  # its prefill's token, then 3 decode passes; none since
        assert runner.live_sequences() == 1  # held, not released: its slot and KV wait for the reader
        assert engine.running == 1
        assert busy == expected("busy", 20)
        passes_before = len(runner.passes)
        await trio.sleep(60)
        assert len(runner.passes) == passes_before  # a held stream alone: the step loop sleeps
        async with idle:
            got = [event.token.token_id for event in await idle.receive_ready()]
            assert got == expected("idle", 4)
            # Taking the tokens resumes it at once: the next decode step carries it again.
            resumed_at = trio.current_time()
            more = await idle.receive_ready()
            assert trio.current_time() - resumed_at == pytest.approx(DECODE_SECONDS)
            assert [event.token.token_id for event in more] == expected("idle", 5)[4:]
        assert runner.live_sequences() == 0


async def test_a_slow_reader_gets_every_token_at_its_own_pace(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_unread=3) as engine, engine.submit(request("slow", max_tokens=30)) as slow:
        tokens: list[int] = []
        reads: list[int] = []
        started = trio.current_time()
        while events := await slow.receive_ready():
            tokens += [event.token.token_id for event in events]
            reads.append(len(events))
            await trio.sleep(1.0)  # one read a second
    assert tokens == expected("slow", 30)
    # The first token, then 3 a read (the bound): never cut, generation only waited for the reader.
    assert reads == [1, *[3] * 9, 2]
    assert trio.current_time() - started == pytest.approx(len(reads), abs=0.1)
    assert len(runner.passes) == 30


async def test_closing_a_held_stream_releases_its_kv_before_the_next_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_unread=2) as engine:
        held = engine.submit(request("held", max_tokens=100))
        await trio.sleep(1)
        assert runner.live_sequences() == 1
        other = engine.submit(request("other", max_tokens=3))
        assert held.close()  # what a send timeout or a disconnect does
        assert runner.live_sequences() == 0
        async with other:
            assert [event.token.token_id async for event in other] == expected("other", 3)
        record = next(r for r in engine.history if r.request_id == "held")
        assert record.outcome == "closed" and record.generated == 2


async def test_a_stream_cut_short_drops_the_tokens_it_had_not_handed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = FakeRunner()
    async with running_engine(runner, max_unread=50) as engine, engine.submit(request("cut", max_tokens=100)) as cut:
        await trio.sleep(0.2)  # 40 tokens wait for a reader that is late
        assert cut.close()  # the drain or a deadline ends it: its end goes out without the backlog
        assert await cut.receive_ready() == []
