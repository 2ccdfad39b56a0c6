"""vLLM's ``structured_outputs`` (``regex``, ``choice``, ``grammar``, ``json``) through the official `openai`
SDK against a real server, on chat and legacy completions, streamed and not: a random-weight model's output
matches in every run, because llguidance enforces the pattern while sampling.

The property draws patterns from a safe subset (literals, classes, alternation, bounded repetition, so a
random model completes them well within ``max_tokens``), writes each one both as a regex and as a Lark
grammar, and checks the output with Python's own ``re.fullmatch``, independently of llguidance.
Hypothesis runs in a worker thread with the blocking SDK, against one server for the whole property.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import Served, chat, legacy, serve_on_loopback
from tests.servers import demo_app as _demo_app
from tests.toolmodel import token, tool_app

pytestmark = pytest.mark.socket

ASK = [{"role": "user", "content": "Answer."}]

# A pattern: ("lit", text) | ("class", chars) | ("seq", parts) | ("alt", parts) | ("rep", part, low, high)
LITERALS = st.text("abcxyz019 -_", min_size=1, max_size=3)
LEAVES = st.tuples(st.just("lit"), LITERALS) | st.tuples(
    st.just("class"), st.text("abcdef0189", min_size=1, max_size=4)
)
PATTERNS = st.recursive(
    LEAVES,
    lambda inner: (
        st.tuples(st.just("seq"), st.lists(inner, min_size=2, max_size=3))
        | st.tuples(st.just("alt"), st.lists(inner, min_size=2, max_size=3))
        | st.integers(0, 2).flatmap(lambda low: st.tuples(st.just("rep"), inner, st.just(low), st.integers(low, 3)))
    ),
    max_leaves=5,
)


def as_regex(node: Any) -> str:
    kind = node[0]
    if kind == "lit":
        return re.escape(node[1])
    if kind == "class":
        return "[" + "".join(sorted(set(node[1]))) + "]"
    if kind == "seq":
        return "".join(f"({as_regex(part)})" for part in node[1])
    if kind == "alt":
        return "(" + "|".join(as_regex(part) for part in node[1]) + ")"
    return f"({as_regex(node[1])}){{{node[2]},{node[3]}}}"


def as_lark(node: Any) -> str:
    kind = node[0]
    if kind == "lit":
        return json.dumps(node[1])
    if kind == "class":
        return "(" + " | ".join(json.dumps(c) for c in sorted(set(node[1]))) + ")"
    if kind == "seq":
        return "(" + " ".join(as_lark(part) for part in node[1]) + ")"
    if kind == "alt":
        return "(" + " | ".join(as_lark(part) for part in node[1]) + ")"
    return f"({as_lark(node[1])}){{{node[2]},{node[3]}}}"


CHOICES = st.lists(st.text('ab"\\ é{}x', min_size=1, max_size=6), min_size=1, max_size=4, unique=True)


def generate(client: openai.OpenAI, route: str, stream: bool, seed: int, structured: dict[str, Any]) -> str:
    """The text of one choice, joined from the stream when streaming; asserts it ended by itself."""
    common: dict[str, Any] = {"model": "m", "max_tokens": 200, "seed": seed, "stream": stream}
    extra = {"extra_body": {"structured_outputs": structured}}
    if route == "chat":
        result = client.chat.completions.create(messages=ASK, **common, **extra)
        if not stream:
            assert result.choices[0].finish_reason == "stop"
            return str(result.choices[0].message.content)
        chunks = [c for c in result if c.choices]
        assert chunks[-1].choices[0].finish_reason == "stop"
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    result = client.completions.create(prompt="Answer:", **common, **extra)
    if not stream:
        assert result.choices[0].finish_reason == "stop"
        return str(result.choices[0].text)
    chunks = [c for c in result if c.choices]
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].text for c in chunks)


async def test_regex_choice_and_grammar_outputs_always_match() -> None:
    async with serve_on_loopback(_demo_app(max_concurrent=8)) as served:
        client = openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0)
        shapes = st.sampled_from(["regex", "grammar", "choice"])

        @settings(max_examples=36, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            shape=shapes,
            pattern=PATTERNS,
            choices=CHOICES,
            route=st.sampled_from(["chat", "legacy"]),
            stream=st.booleans(),
            seed=st.integers(0, 10_000),
        )
        def check(shape: str, pattern: Any, choices: list[str], route: str, stream: bool, seed: int) -> None:
            structured = {
                "regex": {"regex": as_regex(pattern)},
                "grammar": {"grammar": "start: " + as_lark(pattern)},
                "choice": {"choice": choices},
            }[shape]
            text = generate(client, route, stream, seed, structured)
            if shape == "choice":
                assert text in choices
            else:
                assert re.fullmatch(as_regex(pattern), text), (as_regex(pattern), text)

        try:
            await trio.to_thread.run_sync(check)
        finally:
            client.close()


async def test_gbnf_grammars_and_json_schemas_are_taken(served: Served) -> None:
    gbnf = 'root ::= answer " " answer\nanswer ::= "yes" | "no"'
    for stream in (False, True):
        result = await chat(
            served, messages=ASK, max_tokens=50, stream=stream, extra_body={"structured_outputs": {"grammar": gbnf}}
        )
        text = "".join(c.choices[0].delta.content or "" for c in result if c.choices) if stream else None
        text = text if stream else result.choices[0].message.content
        assert re.fullmatch("(yes|no) (yes|no)", text)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    for given_as in (schema, json.dumps(schema)):
        completion = await legacy(
            served, prompt="x", max_tokens=400, seed=1, extra_body={"structured_outputs": {"json": given_as}}
        )
        jsonschema.validate(json.loads(completion.choices[0].text), schema)
    completion = await chat(
        served, messages=ASK, max_tokens=100, seed=3, extra_body={"structured_outputs": {"json_object": True}}
    )
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(completion.choices[0].message.content), dict)


@pytest.mark.parametrize(
    ("structured", "extra", "param"),
    [
        ({"regex": "(?=a)b"}, {}, "structured_outputs.regex"),  # look-around: llguidance cannot take it
        ({"regex": "(a"}, {}, "structured_outputs.regex"),
        ({"regex": r"(a)\1"}, {}, "structured_outputs.regex"),
        ({"grammar": "start: undefined_rule"}, {}, "structured_outputs.grammar"),
        ({"grammar": "::= nonsense"}, {}, "structured_outputs.grammar"),
        ({"choice": []}, {}, "structured_outputs.choice"),
        ({"json": "{not json"}, {}, "structured_outputs.json"),
        ({"json": {"type": "wat"}}, {}, "structured_outputs.json"),
        ({}, {}, "structured_outputs"),
        ({"regex": "a", "choice": ["a"]}, {}, "structured_outputs"),
        ({"regex": "a"}, {"response_format": {"type": "json_object"}}, "structured_outputs"),
        ({"regex": "a"}, {"ignore_eos": True}, "ignore_eos"),
        ({"structural_tag": "{}"}, {}, "structured_outputs.structural_tag"),
        ({"regex": "a", "guided_regex": "b"}, {}, "structured_outputs.guided_regex"),
        ({"regex": 5}, {}, "structured_outputs.regex"),
        ({"regex": "a"}, {"guided_regex": "a"}, "guided_regex"),
    ],
)
async def test_what_llguidance_cannot_take_is_a_400_naming_the_field(
    served: Served, structured: dict[str, Any], extra: dict[str, Any], param: str
) -> None:
    for create in (chat, legacy):
        kwargs: dict[str, Any] = {"messages": ASK} if create is chat else {"prompt": "x"}
        with pytest.raises(openai.BadRequestError) as caught:
            await create(served, max_tokens=5, **kwargs, extra_body={"structured_outputs": structured} | extra)
        error = caught.value.body
        assert isinstance(error, dict) and error["param"] == param, error
    # The server is unharmed.
    assert (await chat(served, messages=ASK, max_tokens=2)).choices[0].message.content is not None


async def test_with_tools_the_text_answer_matches_and_calls_validate() -> None:
    """``tool_choice`` auto with a regex answer: the model either calls (arguments valid) or answers in the
    pattern; a bias on the call marker makes both happen. With a thinking template, the
    pattern applies after the thinking block."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    regex = "(yes|no)-[0-9]{1,2}"
    seen = set()
    for thinking in (False, True):
        async with serve_on_loopback(tool_app(thinking=thinking)) as served:
            for seed in range(6):
                # A call in every third run, text in the others; the thinking block kept short.
                bias = {str(token("<tool_call>")): 10 if seed % 3 == 0 else -100, str(token("</think>")): 8}
                completion = await chat(
                    served,
                    messages=ASK,
                    tools=tools,
                    seed=seed,
                    max_tokens=120,
                    logit_bias=bias,
                    extra_body={"structured_outputs": {"regex": regex}},
                )
                message, finish = completion.choices[0].message, completion.choices[0].finish_reason
                if message.tool_calls:
                    assert finish == "tool_calls" and message.tool_calls[0].function.name == "f"
                    assert json.loads(message.tool_calls[0].function.arguments) == {}
                    seen.add("call")
                elif finish == "stop":
                    assert re.fullmatch(regex, message.content), message.content
                    seen.add("thinking answer" if thinking else "answer")
    assert {"call", "answer", "thinking answer"} <= seen, seen
