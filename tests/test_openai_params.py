"""Every supported chat parameter through the official `openai` SDK against a real server, checking its
effect, not just the status."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio

from tests.servers import Served, chat, legacy
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.socket

TOKENIZER = ChatTokenizer(build_tokenizer())
HI = [{"role": "user", "content": "hi there"}]


def text(completion: Any) -> str:
    return str(completion.choices[0].message.content)


async def test_usage_equals_the_tokenizers_counts_and_length_finish(served: Served) -> None:
    completion = await chat(served, messages=HI, max_tokens=7, extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == len(TOKENIZER.encode_chat(HI))
    assert completion.usage.completion_tokens == 7
    assert completion.choices[0].finish_reason == "length"
    assert completion.system_fingerprint
    alias = await chat(served, messages=HI, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert alias.usage.completion_tokens == 3


async def test_logit_bias_minus_100_keeps_a_token_out(served: Served) -> None:
    greedy = await chat(served, messages=HI, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    first = TOKENIZER.encode(text(greedy))[0]
    biased = await chat(
        served,
        messages=HI,
        max_tokens=20,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body={"ignore_eos": True},
    )
    assert first not in TOKENIZER.encode(text(biased))
    (letter_a,) = TOKENIZER.encode("A")
    forced = await chat(
        served, messages=HI, max_tokens=5, logit_bias={str(letter_a): 100}, extra_body={"ignore_eos": True}
    )
    assert text(forced) == "A" * 5


async def test_same_seed_same_text_while_others_run(served: Served) -> None:
    results: list[str] = []

    async def seeded() -> None:
        completion = await chat(
            served, messages=HI, max_tokens=24, seed=1234, temperature=1.0, extra_body={"ignore_eos": True}
        )
        results.append(text(completion))

    async def noise(i: int) -> None:
        await chat(served, messages=[{"role": "user", "content": f"other {i}"}], max_tokens=30, temperature=1.0)

    await seeded()
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(noise, i)
        nursery.start_soon(seeded)
    other_seed = await chat(
        served, messages=HI, max_tokens=24, seed=99, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert results[0] == results[1]
    assert text(other_seed) != results[0]


async def test_stop_string_and_list(served: Served) -> None:
    base = text(await chat(served, messages=HI, max_tokens=30, temperature=0, extra_body={"ignore_eos": True}))
    stop = base[8:10]
    cut = await chat(served, messages=HI, max_tokens=30, temperature=0, stop=stop, extra_body={"ignore_eos": True})
    assert text(cut) == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    listed = await chat(
        served, messages=HI, max_tokens=30, temperature=0, stop=["\x00never", stop], extra_body={"ignore_eos": True}
    )
    assert text(listed) == text(cut)


async def test_logprobs_shape(served: Served) -> None:
    completion = await chat(
        served, messages=HI, max_tokens=4, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}
    )
    content = completion.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0
        assert isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


async def test_content_parts_roles_and_user(served: Served) -> None:
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ]
    completion = await chat(served, messages=parts, max_tokens=2, user="someone")
    expected = TOKENIZER.encode_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    )
    assert completion.usage.prompt_tokens == len(expected)


async def test_extensions_have_their_effect(served: Served) -> None:
    truncated = await chat(served, messages=HI, max_tokens=2, extra_body={"truncate": 5})
    assert truncated.usage.prompt_tokens == 5
    top1 = await chat(
        served, messages=HI, max_tokens=12, temperature=1.0, seed=5, extra_body={"top_k": 1, "ignore_eos": True}
    )
    greedy = await chat(served, messages=HI, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert text(top1) == text(greedy)  # top_k=1 is greedy whatever the temperature
    min_p = await chat(
        served, messages=HI, max_tokens=12, temperature=1.0, seed=5, extra_body={"min_p": 1.0, "ignore_eos": True}
    )
    assert text(min_p) == text(greedy)
    # Greedy decoding of a random model loops over a few tokens; a strong repetition penalty breaks the loop.
    plain, penalised = [
        await chat(
            served,
            messages=HI,
            max_tokens=30,
            temperature=0,
            extra_body={"repetition_penalty": penalty, "ignore_eos": True},
        )
        for penalty in (1.0, 5.0)
    ]
    plain_ids, ids = TOKENIZER.encode(text(plain)), TOKENIZER.encode(text(penalised))
    assert len(set(ids)) > len(set(plain_ids)), (text(plain), text(penalised))
    at_least = await chat(served, messages=HI, max_tokens=40, extra_body={"min_tokens": 40})
    assert at_least.usage.completion_tokens == 40


async def test_errors_reach_the_sdk_as_its_exceptions(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await chat(served, messages=HI, max_tokens=5000)
    assert bad.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as stops:
        await chat(served, messages=HI, stop=["a", "b", "c", "d", "e"])
    assert stops.value.param == "stop"
    with pytest.raises(openai.BadRequestError):
        await chat(served, messages=HI, top_logprobs=3)  # needs logprobs=true


async def test_n_choices_are_separate_sequences(served: Served) -> None:
    completion = await chat(
        served, messages=HI, max_tokens=6, n=3, seed=7, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert len({text_of(c) for c in completion.choices}) == 3  # distinct seeds, distinct samples
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage.completion_tokens == 18
    assert completion.usage.prompt_tokens == len(TOKENIZER.encode_chat(HI))
    again = await chat(served, messages=HI, max_tokens=6, n=3, seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    assert [text_of(c) for c in again.choices] == [text_of(c) for c in completion.choices]

    chunks = await chat(
        served,
        messages=HI,
        max_tokens=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finishes = {
        c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    }
    assert finishes == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 8


def text_of(choice: Any) -> str:
    return str(choice.message.content)


async def test_legacy_completions_prompt_forms(served: Served) -> None:
    one = await legacy(served, prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.usage.prompt_tokens == len(TOKENIZER.encode_prompt("Once upon a time"))
    assert one.usage.completion_tokens == 5
    assert one.choices[0].finish_reason == "length"
    assert one.model == "trioserve-tiny-random"
    many = await legacy(served, prompt=["a b", "c d e"], n=2, max_tokens=3, extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.usage.prompt_tokens == len(TOKENIZER.encode_prompt("a b")) + len(TOKENIZER.encode_prompt("c d e"))
    assert many.usage.completion_tokens == 12
    ids = TOKENIZER.encode_prompt("token ids")
    by_ids = await legacy(served, prompt=ids, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    by_text = await legacy(served, prompt="token ids", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = await legacy(
        served, prompt="echo me", max_tokens=3, echo=True, temperature=0, extra_body={"ignore_eos": True}
    )
    plain = await legacy(served, prompt="echo me", max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "echo me" + plain.choices[0].text


async def test_legacy_completions_logprobs_stream_and_errors(served: Served) -> None:
    scored = await legacy(served, prompt="hi", max_tokens=4, logprobs=2, extra_body={"ignore_eos": True})
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)

    chunks = await legacy(
        served,
        prompt="stream",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 5
    for bad, param in (({"suffix": "tail"}, None), ({"prompt": [10**6]}, "prompt"), ({"max_tokens": 10**6}, "prompt")):
        kwargs = {"prompt": "x", "max_tokens": 2} | bad
        with pytest.raises(openai.BadRequestError) as info:
            await legacy(served, **kwargs)
        if param is not None:
            assert info.value.param == param


async def test_every_reasoning_effort_the_sdk_knows_is_accepted(served: Served) -> None:
    # Read from the installed SDK, so a value OpenAI adds shows up here (xhigh and max were 400s once).
    from typing import get_args

    from openai.types.shared.reasoning_effort import ReasoningEffort

    (efforts,) = (arg for arg in get_args(ReasoningEffort) if get_args(arg))
    for effort in get_args(efforts):
        completion = await chat(served, messages=HI, max_tokens=2, reasoning_effort=effort)
        assert completion.choices[0].message.content is not None
