"""Prefix caching as clients see it, over a real Hypercorn with the official `openai` SDK: cached tokens in
usage (chat, streamed usage, legacy completions, Responses), isolation between API keys and salts, metrics,
and aborted streams that leave nothing live and the cache within its bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.servers import Served
from tests.threaded import served_in_thread

pytestmark = pytest.mark.socket

KEYS = ["key-a", "key-b"]
SYSTEM = "You are the assistant of a shipping company. Answer about parcels, rivers and ports. " * 4


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_in_thread(api_key=KEYS, max_concurrent=4) as served:
        yield served


def client(served: Served, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=served.url + "/v1", max_retries=0, timeout=120)


def ask(served: Served, question: str, *, key: str = "key-a", **extra: Any) -> Any:
    with client(served, key) as sdk:
        return sdk.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=3,
            temperature=0,
            **extra,
        )


def cached(completion: Any) -> int:
    details = completion.usage.prompt_tokens_details
    assert details is not None
    return int(details.cached_tokens)


def metric(served: Served, name: str) -> float:
    text = httpx.get(served.url + "/metrics", headers={"Authorization": "Bearer key-a"}, timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, name
    return values[0]


def test_the_next_turn_reports_its_cached_prompt_tokens(served: Served) -> None:
    first = ask(served, "Where is parcel 1?")
    second = ask(served, "Where is parcel 2?")
    # The system prompt (and the template around it) came from the cache; the question did not.
    assert first.usage.prompt_tokens - 20 <= cached(second) < second.usage.prompt_tokens
    assert metric(served, "trioserve_prefix_cache_hit_tokens_total") >= cached(second)
    assert metric(served, "trioserve_prefix_cache_entries") >= 1


def test_streamed_usage_and_legacy_completions_report_cached_tokens(served: Served) -> None:
    ask(served, "Warm up.")
    with client(served) as sdk:
        chunks = list(
            sdk.chat.completions.create(
                model="m",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Streamed?"}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens > 0
        prompt = "Legacy completions share prefixes too. " * 8
        sdk.completions.create(model="m", prompt=prompt + "One", max_tokens=2)
        again = sdk.completions.create(model="m", prompt=prompt + "Two", max_tokens=2)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens >= len(prompt) - 8


def test_other_keys_and_salts_never_share(served: Served) -> None:
    question = "Isolation: where is parcel 77?"
    ask(served, question, key="key-a", extra_body={"cache_salt": "s1"})
    assert cached(ask(served, question, key="key-b", extra_body={"cache_salt": "s1"})) == 0  # another tenant
    assert cached(ask(served, question, key="key-a", extra_body={"cache_salt": "s2"})) == 0  # another salt
    assert cached(ask(served, question, key="key-b")) == 0  # no salt is a salt of its own
    assert cached(ask(served, question, key="key-a", extra_body={"cache_salt": "s1"})) > 0  # the same: shared
    assert cached(ask(served, question, key="key-b", extra_body={"cache_salt": "s1"})) > 0


def test_an_empty_salt_is_a_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(served, "x", extra_body={"cache_salt": ""})
    assert caught.value.body is not None and caught.value.body.get("param") == "cache_salt"  # type: ignore[union-attr]


def test_previous_response_id_hits_the_stored_conversation(served: Served) -> None:
    with client(served) as sdk:
        first = sdk.responses.create(model="m", instructions=SYSTEM, input="Track parcel 9.", max_output_tokens=4)
        second = sdk.responses.create(
            model="m", instructions=SYSTEM, input="And parcel 10?", previous_response_id=first.id, max_output_tokens=4
        )
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 8


def test_aborted_streams_leave_nothing_live_and_the_cache_bounded(served: Served) -> None:
    """Streams closed after their first chunk, many sharing the system prompt: afterwards nothing is live and
    the cache holds at most one entry per arena slot (no cache-only slots here)."""
    with client(served) as sdk:
        for i in range(40):
            stream = sdk.chat.completions.create(
                model="m",
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"abort {i}"}],
                max_tokens=500,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            next(iter(stream))
            stream.close()
    assert served.engine.runner is not None
    runner = served.engine.runner
    deadline = time.monotonic() + 60  # the last aborts' releases land within a step or two (real sockets)
    while metric(served, "trioserve_live_sequences") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(served, "trioserve_live_sequences") == 0 and metric(served, "trioserve_kv_tokens") == 0
    assert metric(served, "trioserve_requests_running") == 0
    assert runner.arena is not None  # type: ignore[attr-defined]
    slots = runner.arena.slots  # type: ignore[attr-defined]
    assert 1 <= metric(served, "trioserve_prefix_cache_entries") <= slots
    stats = runner.prefix_cache_stats()
    assert stats is not None and stats.retained_entries <= slots
