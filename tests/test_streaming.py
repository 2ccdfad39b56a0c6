"""Streaming under load: a consumer that falls behind takes every waiting token at once and sends one chunk.

The runner is the benchmark's `InstantRunner` (no model, tokens from the real tiny tokenizer) with steps
of exact virtual duration under `autojump_clock`; the services are the real chat and legacy completion
services on a real engine. A fast consumer (one chunk per token) and a slow one (several tokens per chunk)
must see the same text, logprob entries, finish reason and usage: coalescing changes only the chunking.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.instant import InstantRunner
from tests.fakes import FakeRunner, fake_token
from trioserve.api.chat import ChatService
from trioserve.api.completions import CompletionService
from trioserve.api.protocol import ChatCompletionRequest, CompletionRequest
from trioserve.api.replies import ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, Delta, TokenLogprob, Usage, dump
from trioserve.api.serving import RequestTiming
from trioserve.engine import engine as engine_module
from trioserve.engine.engine import Engine
from trioserve.errors import GenerationFailed, TrioserveError
from trioserve.model.tinymodel import build_tokenizer
from trioserve.server.sse import ChunkEncoder
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, SamplingParams, StepOutput, StepPlan

STEP = 0.005  # virtual seconds per step
SLOW = 4 * STEP  # the slow consumer's pause after each chunk: about four tokens wait for it
TEXT = "héllo wörld 😀, say stop here; "  # multi-byte characters split across byte-level tokens


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(build_tokenizer())


def instant_runner(tokenizer: ChatTokenizer) -> InstantRunner:
    """Every sequence's tokens spell TEXT over and over (from a different start for each sequence)."""
    eos = frozenset({tokenizer.hf.convert_tokens_to_ids("<|im_end|>")})
    return InstantRunner(tokenizer, tokenizer.encode(TEXT), eos, len(tokenizer.hf), model_id="instant")


async def virtual_offload(
    step: Callable[[StepPlan], StepOutput], plan: StepPlan, limiter: trio.CapacityLimiter
) -> StepOutput:
    with trio.CancelScope(shield=True):
        async with limiter:
            await trio.sleep(STEP)
            return step(plan)


@asynccontextmanager
async def engine_on(runner: Any) -> AsyncIterator[Engine]:
    offload = runner.offload if isinstance(runner, FakeRunner) else virtual_offload
    engine = Engine(lambda: runner, max_concurrent=8, max_queue=8, batch_size=8, offload=offload)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


async def stream_chunks(
    tokenizer: ChatTokenizer, body: dict[str, Any], pause: float, legacy: bool = False, time_limit: float = 600
) -> list[dict[str, Any]]:
    """Every chunk of a streamed response (as JSON values, errors as error objects), read with ``pause``
    after each one; a fresh engine each time, so fast and slow runs get the same tokens."""
    async with engine_on(instant_runner(tokenizer)) as engine:
        service = CompletionService(engine) if legacy else ChatService(engine)
        model = CompletionRequest if legacy else ChatCompletionRequest
        request = model.model_validate(body | {"stream": True})
        prepared = await service.prepare(request, time_limit=time_limit)  # type: ignore[arg-type]
        streams = [engine.submit(generation) for generation in prepared.generations]
        encoder = ChunkEncoder()
        chunks = []
        async with aclosing(service.stream(prepared, streams)) as items:  # type: ignore[arg-type]
            async for item in items:
                if isinstance(item, TrioserveError):
                    chunks.append(item.to_dict())
                else:
                    chunks.append(json.loads(encoder.encode(item).removeprefix(b"data: ")))
                await trio.sleep(pause)
        assert engine.active == 0
        return chunks


def content_chunks(chunks: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    return [
        c["choices"][0]
        for c in chunks
        if c.get("choices") and c["choices"][0]["index"] == index and c["choices"][0]["delta"].get("content")
    ]


def summary(chunks: list[dict[str, Any]], index: int = 0) -> tuple[str, list[str], list[str | None], Any]:
    """What the client ends up with for one choice: text, logprob tokens, finish reasons, usage."""
    choices = [c["choices"][0] for c in chunks if c.get("choices") and c["choices"][0]["index"] == index]
    text = "".join(choice["delta"].get("content") or "" for choice in choices)
    logprobs = [e["token"] for choice in choices if choice["logprobs"] for e in choice["logprobs"]["content"]]
    finishes = [choice["finish_reason"] for choice in choices if choice["finish_reason"]]
    return text, logprobs, finishes, chunks[-1].get("usage")


BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 40,
    "ignore_eos": True,
    "stream_options": {"include_usage": True},
}


async def test_a_slow_consumer_gets_several_tokens_per_chunk_and_the_same_answer(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    body = BODY | {"logprobs": True, "top_logprobs": 2}
    fast = await stream_chunks(tokenizer, body, 0)
    slow = await stream_chunks(tokenizer, body, SLOW)
    assert fast[-1]["usage"]["completion_tokens"] == 40
    # Fast: one content chunk per token (but a multi-byte character waits for its last byte's token).
    assert len(content_chunks(fast)) >= 30
    assert len(content_chunks(slow)) <= 40 // 3  # several tokens per chunk
    assert summary(slow) == summary(fast)
    text, logprobs, finishes, usage = summary(slow)
    assert len(logprobs) == usage["completion_tokens"] == 40  # one logprob entry per token
    assert finishes == ["length"]
    assert text.startswith(TEXT)
    assert all(len(choice["logprobs"]["content"]) > 1 for choice in content_chunks(slow)[1:-1])


async def test_a_stop_string_inside_a_batch_cuts_there_with_the_same_usage(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    body = BODY | {"stop": ["stop"], "logprobs": True}
    fast = await stream_chunks(tokenizer, body, 0)
    slow = await stream_chunks(tokenizer, body, SLOW)
    assert summary(slow) == summary(fast)
    text, logprobs, finishes, usage = summary(slow)
    assert text == TEXT[: TEXT.index("stop")]
    assert finishes == ["stop"]
    assert usage["completion_tokens"] == len(logprobs) < 40  # tokens up to the one completing the stop


async def test_while_the_loop_is_behind_each_chunk_after_the_first_token_carries_two(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = BODY | {"logprobs": True, "stop": ["stop"], "max_tokens": 60}
    fast = await stream_chunks(tokenizer, body, 0)
    # The engine's measurement of the loop's lag needs real threads; here the signal is set, and the
    # serving policy that reads it is what is checked.
    monkeypatch.setattr(Engine, "behind", property(lambda engine: True))
    behind = await stream_chunks(tokenizer, body, 0)
    assert summary(behind) == summary(fast)
    counts = [len(choice["logprobs"]["content"]) for choice in content_chunks(behind)]
    assert counts[0] == 1  # the first token is never held back
    assert all(count >= 2 for count in counts[1:-1])


async def test_each_token_reaches_its_stream_once_the_next_step_is_under_way(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    # The streams' work overlaps the model's: the step loop starts step k+1 before the streams wake for the
    # token of step k (`streams.Outbox`), so a stream's work never delays the next step's start.
    log: list[str] = []

    async def offload(step: Callable[[StepPlan], StepOutput], plan: StepPlan, limiter: trio.CapacityLimiter) -> Any:
        async with limiter:  # where trio.to_thread.run_sync starts the thread
            log.append("step")
            await trio.sleep(STEP)
            return step(plan)

    engine = Engine(lambda: instant_runner(tokenizer), max_concurrent=8, max_queue=8, batch_size=8, offload=offload)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        request = GenerationRequest("r", tuple(tokenizer.encode("hi")), SamplingParams(max_tokens=20, ignore_eos=True))
        async with engine.submit(request) as stream:
            async for _ in stream:
                log.append("token")
        nursery.cancel_scope.cancel()
    tokens = [i for i, entry in enumerate(log) if entry == "token"]
    assert len(tokens) == 20
    # Token i (from 1) comes from step i; step i + 1 has started before it arrives (but the last).
    for i, at in enumerate(tokens[:-1], start=1):
        assert log[:at].count("step") >= i + 1


async def test_streams_that_cannot_keep_up_with_the_steps_put_the_engine_behind(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine's own signal, in virtual time: as each step ends, how many streams have not yet taken the
    # previous step's token. A consumer slower than the steps leaves its stream behind every time.
    # The signal's other half, the loop's lag, is real time (perf_counter): over 1 ms on a busy machine
    # even here, so it is put out of reach and only the backlog, counted in streams, decides.
    monkeypatch.setattr(engine_module, "BEHIND_SECONDS", 3600.0)

    async def behind_seen(pause: float) -> list[bool]:
        async with engine_on(instant_runner(tokenizer)) as engine:
            service = ChatService(engine)
            request = ChatCompletionRequest.model_validate(BODY | {"stream": True, "n": 2})
            prepared = await service.prepare(request, time_limit=600)
            streams = [engine.submit(generation) for generation in prepared.generations]
            seen = []
            async with aclosing(service.stream(prepared, streams)) as items:
                async for _ in items:
                    seen.append(engine.behind)
                    await trio.sleep(pause)
            return seen

    assert not any(await behind_seen(0))
    slow = await behind_seen(2 * STEP)
    assert slow[-1] and sum(slow) > len(slow) // 2


async def test_choices_are_coalesced_each_on_its_own(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    body = BODY | {"n": 2, "max_tokens": 24}
    fast = await stream_chunks(tokenizer, body, 0)
    slow = await stream_chunks(tokenizer, body, SLOW)
    for index in (0, 1):
        assert summary(slow, index)[:3] == summary(fast, index)[:3]
        assert len(content_chunks(slow, index)) < len(content_chunks(fast, index))
    assert slow[-1]["usage"] == fast[-1]["usage"] and slow[-1]["usage"]["completion_tokens"] == 48


async def test_legacy_completions_coalesce_with_legacy_logprobs(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    body = {"prompt": "hi", "max_tokens": 30, "ignore_eos": True, "logprobs": 1}

    def legacy_view(chunks: list[dict[str, Any]]) -> tuple[str, list[str], list[int]]:
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        text = "".join(choice["text"] for choice in choices)
        tokens = [t for choice in choices for t in choice["logprobs"]["tokens"]]
        offsets = [o for choice in choices for o in choice["logprobs"]["text_offset"]]
        return text, tokens, offsets

    fast = await stream_chunks(tokenizer, body, 0, legacy=True)
    slow = await stream_chunks(tokenizer, body, SLOW, legacy=True)
    assert legacy_view(slow) == legacy_view(fast)
    assert len(legacy_view(slow)[1]) == 30
    assert len(slow) < len(fast) // 2


async def test_the_deadline_still_applies_to_a_slow_consumer(
    autojump_clock: trio.testing.MockClock, tokenizer: ChatTokenizer
) -> None:
    chunks = await stream_chunks(tokenizer, BODY | {"max_tokens": 400}, SLOW, time_limit=0.5)  # engine left empty
    assert chunks[-1]["error"]["code"] == "request_timeout"
    text = summary(chunks[:-1])[0]
    assert 0 < len(text) < 400


async def test_events_before_a_failed_step_arrive_then_the_failure(autojump_clock: trio.testing.MockClock) -> None:
    runner = FakeRunner(fail_when=lambda plan: RuntimeError("boom") if len(runner.passes) >= 4 else None)
    async with engine_on(runner) as engine:
        request = GenerationRequest("r", (2, 3, 4), SamplingParams(max_tokens=20))
        async with engine.submit(request) as stream:
            await trio.sleep(1)  # every step runs (the 5th fails) before the consumer looks
            events = await stream.receive_ready()
            assert len(events) == 4  # one prefill and three decode steps, all at once
            with pytest.raises(GenerationFailed):
                await stream.receive_ready()
            assert await stream.receive_ready() == []


async def test_events_taken_before_a_deadline_are_not_lost(autojump_clock: trio.testing.MockClock) -> None:
    request = GenerationRequest("r", (2, 3, 4), SamplingParams(max_tokens=20))
    async with engine_on(FakeRunner()) as engine, engine.submit(request) as stream:
        first = await stream.receive_ready()
        with trio.move_on_after(0.0075):  # one more token comes (decode steps take 5 ms), not two
            await stream.receive_ready(at_least=2)
        taken = stream.take_received()
        assert len(first) == len(taken) == 1
        rest = await stream.receive_ready()
        ids = [e.token.token_id for e in first + taken + rest]
        assert ids == [fake_token("r", i) for i in range(len(ids))]


def test_timing_shares_a_delivery_gap_among_its_tokens() -> None:
    timing = RequestTiming(arrived=0.0, deadline=10.0)
    timing.tokens(1.0, 2)
    timing.tokens(1.3, 3)
    timing.tokens(1.4, 1)
    assert timing.completion_tokens == 6
    assert timing.first_token == 1.0
    assert timing.gaps == pytest.approx([0.1, 0.1, 0.1, 0.1])


# -- SSE framing: the content template gives the same JSON value as the full serialization ----------------


def chat_chunk(text: str | None, index: int = 0, **choice: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChunkChoice(index=index, delta=Delta(content=text), **choice)],
        system_fingerprint="fp",
    )


def full(chunk: ChatCompletionChunk) -> Any:
    return json.loads(json.dumps(dump(chunk)))


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=5), index=st.integers(0, 3))
def test_content_deltas_encode_to_the_same_json_as_the_full_path(texts: list[str], index: int) -> None:
    encoder = ChunkEncoder()
    for text in texts:
        event = encoder.encode(chat_chunk(text, index))
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and b"\n\n" not in event[:-2]
        assert json.loads(event[6:]) == full(chat_chunk(text, index))


def test_other_chunks_take_the_full_path_unchanged() -> None:
    encoder = ChunkEncoder()
    entry = TokenLogprob(token="a", logprob=-0.5, bytes=[97], top_logprobs=[])
    others = [
        chat_chunk("x", finish_reason="stop"),
        chat_chunk("x", logprobs=ChoiceLogprobs(content=[entry])),
        chat_chunk(None, finish_reason="length"),
        ChatCompletionChunk(
            id="chatcmpl-1",
            created=1,
            model="m",
            choices=[ChunkChoice(index=0, delta=Delta(role="assistant", content=""))],
        ),
        ChatCompletionChunk(
            id="chatcmpl-1",
            created=1,
            model="m",
            choices=[],
            usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        ),
    ]
    encoder.encode(chat_chunk("warm the template"))
    for chunk in others:
        assert json.loads(encoder.encode(chunk)[6:]) == full(chunk)
    # A template belongs to its own id: a chunk of another completion is not written into it.
    other = chat_chunk("y").model_copy(update={"id": "chatcmpl-2"})
    assert json.loads(encoder.encode(other)[6:])["id"] == "chatcmpl-2"
