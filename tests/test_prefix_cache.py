"""Prefix caching on the model side: exact reuse, slots, eviction, isolation, release (no event loop).

Every exactness test compares a runner with prefix caching against one without it, on the same model and
the same arrivals: the tokens must be equal, token for token.
"""

from __future__ import annotations

import numpy
import pytest
import torch
from transformers import PreTrainedModel

from tests.conftest import live_caches
from tests.test_architectures import FAMILIES, tiny_model
from tests.test_runner import Arrival, _windowed_model, drive, greedy
from trioserve.engine.scheduler import Scheduler
from trioserve.model.prefixcache import PrefixCache
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinymodel import build_model
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, PrefillChunk, SamplingParams, StepPlan


def runner_of(
    model: PreTrainedModel, tokenizer: ChatTokenizer, *, caching: bool = True, slots: int = 8, cache_slots: int = 0
) -> TransformersRunner:
    eos_ids = model.generation_config.eos_token_id
    eos = frozenset(int(i) for i in (eos_ids if isinstance(eos_ids, list) else [eos_ids]))
    return TransformersRunner(
        model,
        tokenizer,
        model_id="tiny",
        max_batch_size=slots,
        eos_token_ids=eos,
        prefix_caching=caching,
        prefix_cache_slots=cache_slots,
    )


def request(name: str, prompt: list[int], max_tokens: int, scope: str = "", **params: object) -> GenerationRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if params:
        sampling = SamplingParams(max_tokens=max_tokens, **params)  # type: ignore[arg-type]
    return GenerationRequest(name, tuple(prompt), sampling, cache_scope=scope)


def conversation(tokenizer: ChatTokenizer, turns: int) -> list[int]:
    messages = [{"role": "system", "content": "You are a careful assistant. " * 3}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn}: what about the rivers?"})
        messages.append({"role": "assistant", "content": f"answer {turn}: they flow."})
    messages.append({"role": "user", "content": "and then?"})
    return tokenizer.encode_chat(messages)


def hits(runner: TransformersRunner) -> int:
    assert runner.prefix_cache is not None
    return runner.prefix_cache.hit_tokens


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def model(request: pytest.FixtureRequest, chat_tokenizer: ChatTokenizer) -> PreTrainedModel:
    return build_model(chat_tokenizer.hf, dtype=request.param)


@pytest.mark.parametrize("chunk", [8, 13, 256], ids=["chunked", "hit-ends-mid-chunk", "grouped"])
def test_a_hit_gives_the_tokens_a_cold_prefill_gives(
    model: PreTrainedModel, chat_tokenizer: ChatTokenizer, chunk: int
) -> None:
    """Multi-turn histories, a shared system prompt, staggered arrivals, a release mid-batch: greedy tokens
    with the cache equal those without it, and most of the later prompts came from the cache."""
    first, second, third = (conversation(chat_tokenizer, n) for n in (0, 1, 2))
    other = chat_tokenizer.encode_chat([{"role": "user", "content": "something else entirely"}])
    arrivals = [
        Arrival(0, greedy("first", first, 6)),
        Arrival(0, greedy("other", other, 9)),
        Arrival(12, greedy("second", second, 7)),
        Arrival(12, greedy("first-again", first, 5), leave_after=3),  # a whole-prompt hit (capped at n - 1)
        Arrival(30, greedy("third", third, 8)),
        Arrival(31, greedy("second-again", second, 4)),
    ]
    cold = drive(runner_of(model, chat_tokenizer, caching=False), arrivals, chunk=chunk)
    runner = runner_of(model, chat_tokenizer)
    warm = drive(runner, arrivals, chunk=chunk)
    assert warm == cold
    # The system prompt at least, for every prompt after the first of its kind (and whole histories after).
    assert hits(runner) >= len(first) + 2 * (len(first) - 20) + len(second) - 1
    assert runner.live_sequences() == 0 and runner.kv_tokens() == 0
    assert live_caches() == 0


def test_seeded_sampling_gives_the_same_tokens_with_and_without_a_hit(
    model64: PreTrainedModel, chat_tokenizer: ChatTokenizer
) -> None:
    prompt = conversation(chat_tokenizer, 1)
    arrivals = [Arrival(0, request("warm", prompt[:-3], 4)), Arrival(8, request("s", prompt, 12, seed=7, top_k=20))]
    cold = drive(runner_of(model64, chat_tokenizer, caching=False), arrivals, chunk=64)
    runner = runner_of(model64, chat_tokenizer)
    assert drive(runner, arrivals, chunk=64) == cold
    assert hits(runner) == len(prompt) - 3


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_hits_are_exact_or_not_offered(kind: str, chat_tokenizer: ChatTokenizer) -> None:
    """A slot keeps only the last window of a sliding layer's keys: a hit that extends the whole earlier prompt
    is exact; one that ends earlier would need keys the slot lost, so it is not offered."""
    model = _windowed_model(kind, chat_tokenizer)
    base = list(range(20, 40))  # past the window (6)
    turns = [
        (greedy("a", base, 5), 0),
        (greedy("extends", [*base, 50, 51, 52], 6), len(base)),  # needs keys near position 20: held
        (greedy("diverges", [*base[:12], 60, 61, 62], 6), 0),  # would need keys near 12: lost, not offered
    ]
    runner = runner_of(model, chat_tokenizer)
    cold_runner = runner_of(model, chat_tokenizer, caching=False)
    for turn, reused in turns:
        before = hits(runner)
        assert drive(runner, [Arrival(0, turn)]) == drive(cold_runner, [Arrival(0, turn)])
        assert hits(runner) - before == reused, turn.request_id


def test_n_choices_share_their_prompt_and_keep_their_own_tokens(
    model64: PreTrainedModel, chat_tokenizer: ChatTokenizer
) -> None:
    cold_runner = runner_of(model64, chat_tokenizer, caching=False)
    long, short = conversation(chat_tokenizer, 0), chat_tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    for prompt, chunk in ((long, 8), (short, 256)):
        runner = runner_of(model64, chat_tokenizer)
        loaded = runner.forward_passes
        choices = [Arrival(0, request(f"c{i}", prompt, 6, seed=i, temperature=1.0)) for i in range(3)]
        assert drive(runner, choices, chunk=chunk) == drive(cold_runner, choices, chunk=chunk)
        if chunk == 8:  # the first choice prefills in chunks; the others copy its KV and compute one token
            assert hits(runner) == 2 * (len(prompt) - 1)
        else:  # whole prompts grouped: one row computed for all three, then a decode pass per later token
            assert runner.forward_passes - loaded == 1 + 5


def test_entries_are_bounded_and_evicted_least_recently_used(
    model64: PreTrainedModel, chat_tokenizer: ChatTokenizer
) -> None:
    """More conversations than slots: the cache never holds more entries than it has slots for, the oldest go
    first, and cache-only slots take what leaves the request slots."""
    runner = runner_of(model64, chat_tokenizer, slots=2, cache_slots=1)
    cache = runner.prefix_cache
    assert cache is not None and runner.arena is not None
    prompts = [[100 + i, *range(30, 60)] for i in range(5)]
    for i, prompt in enumerate(prompts):
        drive(runner, [Arrival(0, greedy(f"p{i}", prompt, 3))])
        assert len(cache.entries) <= 3
    # The three most recent remain; the first two were evicted.
    kept = sorted(int(entry.prompt[0]) - 100 for entry in cache.entries.values())
    assert kept == [2, 3, 4] and cache.evictions == 2
    assert {e.slot for e in cache.entries.values()} == {0, 1, 2}
    # A hit from the cache-only slot (a copy into a request slot) is exact too.
    cold = drive(runner_of(model64, chat_tokenizer, caching=False), [Arrival(0, greedy("again", prompts[2], 5))])
    before = hits(runner)
    assert drive(runner, [Arrival(0, greedy("again", prompts[2], 5))]) == cold
    assert hits(runner) - before == len(prompts[2]) - 1


def test_scopes_never_share(model64: PreTrainedModel, chat_tokenizer: ChatTokenizer) -> None:
    runner = runner_of(model64, chat_tokenizer)
    prompt = conversation(chat_tokenizer, 0)
    drive(runner, [Arrival(0, request("a", prompt, 2, scope="tenant-a\x00"))])
    drive(runner, [Arrival(0, request("b", prompt, 2, scope="tenant-b\x00"))])
    drive(runner, [Arrival(0, request("salted", prompt, 2, scope="tenant-a\x00salt"))])
    assert hits(runner) == 0
    drive(runner, [Arrival(0, request("a2", prompt, 2, scope="tenant-a\x00"))])
    assert hits(runner) == len(prompt) - 1


def test_a_release_during_a_cached_prefill_frees_the_slot_and_keeps_the_entry(
    model64: PreTrainedModel, chat_tokenizer: ChatTokenizer
) -> None:
    """Cancelled after the first chunk of a prompt that extends a retained entry (taken in place): the slot is
    free at once, nothing is live, and the entry is still there, unchanged, for the next request."""
    runner = runner_of(model64, chat_tokenizer)
    first = conversation(chat_tokenizer, 0)
    drive(runner, [Arrival(0, greedy("first", first, 3))])
    longer = [*first, *range(30, 70)]  # the next turn of the same conversation
    scheduler = Scheduler(max_running=8, max_waiting=8, batch_size=8, prefill_chunk=8)
    scheduler.submit(0, greedy("longer", longer, 5))
    plan = scheduler.plan()
    output = runner.step(plan)
    assert output.cached[0] == len(first) and output.prefilled[0] == len(first) + 8 < len(longer)
    assert runner.arena is not None and runner.arena.free_slots == 7
    scheduler.remove(0)
    runner.release(0)
    assert runner.arena.free_slots == 8 and runner.live_sequences() == 0 and runner.kv_tokens() == 0
    assert live_caches() == 0
    cold = drive(runner_of(model64, chat_tokenizer, caching=False), [Arrival(0, greedy("again", longer, 4))])
    before = hits(runner)
    assert drive(runner, [Arrival(0, greedy("again", longer, 4))]) == cold
    assert hits(runner) - before >= len(first) - 1


def test_off_means_no_entries_and_the_lowest_slot(model64: PreTrainedModel, chat_tokenizer: ChatTokenizer) -> None:
    runner = runner_of(model64, chat_tokenizer, caching=False)
    assert runner.prefix_cache is None and runner.prefix_cache_stats() is None
    assert runner.prefix_caching.startswith("off")
    prompt = conversation(chat_tokenizer, 0)
    plan = StepPlan(prefill=(PrefillChunk(0, greedy("x", prompt, 3), 0, len(prompt)),))
    output = runner.step(plan)
    assert output.prefilled == {0: len(prompt)} and output.cached == {0: 0}


def test_live_slots_stay_packed_while_entries_move_out_of_the_way(
    model64: PreTrainedModel, chat_tokenizer: ChatTokenizer
) -> None:
    runner = runner_of(model64, chat_tokenizer, slots=4)
    cache = runner.prefix_cache
    assert cache is not None
    drive(runner, [Arrival(0, greedy("a", [7, *range(30, 50)], 2))])
    assert set(cache.entries) == {0}
    # A prompt sharing nothing takes slot 0 all the same; the entry moves to the highest empty slot.
    scheduler = Scheduler(max_running=4, max_waiting=4, batch_size=4, prefill_chunk=64)
    scheduler.submit(0, greedy("b", [9, 9, 9], 2))
    runner.step(scheduler.plan())
    assert runner._sequences[0].slot == 0 and set(cache.entries) == {0, 3}
    assert int(cache.entries[3].prompt[0]) == 7
    runner.release(0)


def test_recurrent_models_say_why_they_reuse_nothing(chat_tokenizer: ChatTokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mamba",
        vocab_size=len(chat_tokenizer.hf),
        hidden_size=32,
        state_size=4,
        num_hidden_layers=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = [0]
    runner = runner_of(model, chat_tokenizer)
    assert runner.prefix_cache is None and "not decoded from the KV arena" in runner.prefix_caching


def test_prefix_cache_prefers_the_longer_hit_and_a_retained_slot() -> None:
    cache = PrefixCache(live_slots=4, cache_slots=0, windows=(None,))
    cache.stored(0, "", numpy.array([1, 2, 3, 4]), [], (0,), owner=10)
    cache.stored(1, "", numpy.array([1, 2, 3, 4, 5, 6]), [], (0,), owner=11)
    cache.released(1, 11)
    hit = cache.lookup("", numpy.array([1, 2, 3, 4, 5, 6, 7]))
    assert hit is not None and (hit.slot, hit.length, hit.retained) == (1, 6, True)
    hit = cache.lookup("", numpy.array([1, 2, 3, 9]))
    assert hit is not None and (hit.slot, hit.length, hit.retained) == (1, 3, True)
    assert cache.lookup("other", numpy.array([1, 2, 3, 9])) is None
    assert cache.lookup("", numpy.array([1])) is None  # capped at len - 1


def test_hits_are_exact_for_multi_head_latent_attention(chat_tokenizer: ChatTokenizer) -> None:
    """DeepSeek-V3's arena keeps keys and values of different sizes (a latent and a rotary key): entries still
    seed prefills and move between slots exactly."""
    model = tiny_model(next(f for f in FAMILIES if f.model_type == "deepseek_v3"))
    first = list(range(20, 60))
    second = [*first[:30], *range(70, 80)]
    arrivals = [
        Arrival(0, greedy("first", first, 5)),
        Arrival(20, greedy("unrelated", [9, 9, 9], 6)),  # takes slot 0: the entry of "first" moves
        Arrival(22, greedy("second", second, 6)),
        Arrival(50, greedy("first-again", first, 4)),
    ]
    cold = drive(runner_of(model, chat_tokenizer, caching=False, slots=4), arrivals, chunk=16)
    runner = runner_of(model, chat_tokenizer, slots=4)
    arena = runner.arena
    assert arena is not None
    assert {k.shape[-1] for k in arena.keys} != {v.shape[-1] for v in arena.values}
    moves = []
    copy = arena.copy
    arena.copy = lambda *args: (moves.append(args), copy(*args))[1]  # type: ignore[method-assign]
    assert drive(runner, arrivals, chunk=16) == cold
    assert moves
    assert hits(runner) >= 2 * 30  # "second" and "first-again" both start from a cached prefix
