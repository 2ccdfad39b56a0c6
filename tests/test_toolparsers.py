"""Call syntaxes and the thinking split without a server: detection from templates, the grammars they
compile to (checked with llguidance's matcher on the demo tokenizer), and reading outputs piece by piece."""

from __future__ import annotations

import dataclasses
import json
from typing import get_args

import llguidance.hf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from llguidance import LLMatcher
from transformers import PreTrainedTokenizerBase

from trioserve.api.chatoutput import ChoiceReader, OutputPlan, message_of
from trioserve.config import ConfigError, ReasoningParser, ToolCallParser, load_settings
from trioserve.errors import InvalidRequest
from trioserve.model.tinymodel import CHATML_TEMPLATE
from trioserve.text import reasoning, toolparsers
from trioserve.text.grammars import output_grammar
from trioserve.text.reasoning import choose_thinking, prompt_opens
from trioserve.text.toolparsers import (
    BARE_JSON,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    MISTRAL_V11,
    CallArguments,
    CallStarted,
    Content,
    detect_syntax,
)
from trioserve.types import CallSyntax, FinishReason, Marker, OutputSchema, ToolSpec

CITY = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}, "required": ["name"]}
TRIP = {  # pydantic's shape for a nested model: a root reference into $defs
    "$defs": {"City": CITY},
    "type": "object",
    "properties": {"origin": {"$ref": "#/$defs/City"}},
    "required": ["origin"],
    "additionalProperties": False,
}
TOOLS = (ToolSpec("trip", TRIP, param="tools[0].function.parameters"), ToolSpec("noop", {"type": "object"}))
HERMES_OUTPUT = 'Sure.\n<tool_call>\n{"name": "trip", "arguments": {"origin": {"name": "Oslo"}}}\n</tool_call>'


def accepts(hf_tokenizer: PreTrainedTokenizerBase, spec: OutputSchema, text: str) -> bool:
    table = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=len(hf_tokenizer))
    matcher = LLMatcher(table, output_grammar(spec), log_level=0)
    ok = all(matcher.consume_token(t) for t in hf_tokenizer.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error() and matcher.is_accepting()


def test_syntaxes_are_detected_from_templates() -> None:
    assert detect_syntax(CHATML_TEMPLATE) is HERMES
    assert detect_syntax("{{ '[TOOL_CALLS]' + calls|tojson }}") is MISTRAL
    assert detect_syntax("{{ '[TOOL_CALLS]' + call.name + '[ARGS]' + call.arguments|tojson }}") is MISTRAL_V11
    assert detect_syntax("{{- '<|python_tag|>' }}") is LLAMA3_JSON
    assert detect_syntax("{{ messages }}") is None


@pytest.mark.parametrize(
    ("syntax", "good", "bad"),
    [
        (HERMES, HERMES_OUTPUT, 'Sure.\n<tool_call>\n{"name": "trip", "arguments": {"origin": {}}}\n</tool_call>'),
        (HERMES, "No call needed: <b>", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'),
        (
            LLAMA3_JSON,
            '{"name": "noop", "parameters": {}}; {"name": "noop", "parameters": {}}',
            '{"name": "trip", "parameters": {}}',
        ),
        (LLAMA3_JSON, "Plain text.", '{"text": 1}'),
        (
            MISTRAL,
            'ok[TOOL_CALLS][{"name": "noop", "arguments": {}}]',
            '[TOOL_CALLS][{"name": "trip", "arguments": {}}]',
        ),
        (
            MISTRAL_V11,
            'ok[TOOL_CALLS]noop[ARGS]{}[TOOL_CALLS]trip[ARGS]{"origin": {"name": "Oslo"}}',
            '[TOOL_CALLS]trip[ARGS]{"origin": {"name": "Oslo", "x": 1}}',
        ),
        (MISTRAL_V11, "Plain text.", '[TOOL_CALLS]{"name": "noop", "arguments": {}}'),
    ],
)
def test_auto_grammars_accept_text_or_valid_calls_only(
    hf_tokenizer: PreTrainedTokenizerBase, syntax: CallSyntax, good: str, bad: str
) -> None:
    spec = OutputSchema(tools=TOOLS, calls=syntax)
    assert accepts(hf_tokenizer, spec, good)
    assert not accepts(hf_tokenizer, spec, bad)


def test_required_and_single_calls(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    required = OutputSchema(tools=TOOLS, calls=HERMES, required=True)
    assert not accepts(hf_tokenizer, required, "Sure.")
    assert accepts(hf_tokenizer, required, HERMES_OUTPUT.removeprefix("Sure.\n"))
    two = HERMES_OUTPUT + "\n" + HERMES_OUTPUT.removeprefix("Sure.\n")
    assert accepts(hf_tokenizer, OutputSchema(tools=TOOLS, calls=HERMES), two)
    assert not accepts(hf_tokenizer, OutputSchema(tools=TOOLS, calls=HERMES, parallel=False), two)


def test_a_json_answer_or_calls_after_thinking(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    thinking = dataclasses.replace(choose_thinking("auto", "</think>", lambda _: None), opened=True)  # type: ignore[arg-type]
    spec = OutputSchema({"type": "object", "required": ["a"]}, tools=TOOLS, calls=HERMES, thinking=thinking)
    assert accepts(hf_tokenizer, spec, 'hmm {not json}</think>\n\n{"a": 1}')
    assert accepts(hf_tokenizer, spec, "hmm</think>" + HERMES_OUTPUT.removeprefix("Sure.\n"))
    assert not accepts(hf_tokenizer, spec, "hmm</think>plain text")


def test_a_bad_tool_schema_names_its_tool() -> None:
    broken = ToolSpec("broken", {"$ref": "#/$defs/Missing"}, param="tools[3].function.parameters")
    with pytest.raises(InvalidRequest) as caught:
        output_grammar(OutputSchema(tools=(TOOLS[0], broken), calls=HERMES))
    assert caught.value.param == "tools[3].function.parameters"


SPLIT_OUTPUTS = {
    "hermes": HERMES_OUTPUT + "\n" + HERMES_OUTPUT.removeprefix("Sure.\n").replace("Oslo", 'O\\"}{'),
    "mistral_v11": 'Sure. [TOOL_CALLS]trip[ARGS]{"origin": {"name": "Oslo"}}[TOOL_CALLS]trip[ARGS]'
    '{"origin": {"name": "O\\"}{"}}',
}


@pytest.mark.parametrize("syntax", [HERMES, MISTRAL_V11], ids=lambda syntax: syntax.name)
@given(cuts=st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_reading_does_not_depend_on_how_the_output_is_split(syntax: CallSyntax, cuts: list[int]) -> None:
    text = SPLIT_OUTPUTS[syntax.name]
    reader, events, at = ChoiceReader(OutputPlan(calls=syntax)), [], 0
    for cut in cuts * 20:
        events += reader.feed(text[at : at + cut])
        at += cut
    events += reader.feed(text[at:]) + reader.finish()
    assert "".join(e.text for e in events if isinstance(e, Content)) == "Sure."
    assert [e.name for e in events if isinstance(e, CallStarted)] == ["trip", "trip"]
    arguments = ["", ""]
    for event in events:
        if isinstance(event, CallArguments):
            arguments[event.index] += event.text
    assert [json.loads(a)["origin"]["name"] for a in arguments] == ["Oslo", 'O"}{']


def test_messages_for_each_syntax() -> None:
    stop = FinishReason.STOP
    llama, finish = message_of(
        OutputPlan(calls=LLAMA3_JSON), '<|python_tag|>{"name": "f", "parameters": {"x": 1}}', stop
    )
    assert finish == "tool_calls" and llama.content is None and llama.tool_calls
    assert llama.tool_calls[0].function.arguments == '{"x": 1}'
    mistral, _ = message_of(
        OutputPlan(calls=MISTRAL), '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]', stop
    )
    assert [c.function.name for c in mistral.tool_calls or []] == ["f", "g"]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in mistral.tool_calls or [])  # Mistral's templates insist
    v11, finish = message_of(
        OutputPlan(calls=MISTRAL_V11), 'Both.[TOOL_CALLS]f[ARGS]{"a": "}"}[TOOL_CALLS]g[ARGS]{}', stop
    )
    assert finish == "tool_calls" and v11.content == "Both." and v11.tool_calls
    assert [(c.function.name, c.function.arguments) for c in v11.tool_calls] == [("f", '{"a": "}"}'), ("g", "{}")]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in v11.tool_calls)
    cut, finish = message_of(OutputPlan(calls=MISTRAL_V11), 'x[TOOL_CALLS]f[ARGS]{"a": ', FinishReason.LENGTH)
    assert (finish, cut.tool_calls, cut.content) == ("length", None, 'x[TOOL_CALLS]f[ARGS]{"a": ')
    named, finish = message_of(OutputPlan(calls=BARE_JSON, named=True), '{"name": "f", "arguments": {}}', stop)
    assert finish == "stop" and named.tool_calls
    cut, finish = message_of(OutputPlan(calls=HERMES), HERMES_OUTPUT[:40], FinishReason.LENGTH)
    assert (
        finish == "length" and cut.tool_calls is None and cut.content == HERMES_OUTPUT[:40].replace("Sure.\n", "Sure.")
    )


def test_thinking_split() -> None:
    thinking = choose_thinking("auto", "{{ '</think>' }}", lambda _: None)
    assert thinking is not None and choose_thinking("none", "</think>", lambda _: None) is None
    assert prompt_opens("<|im_start|>assistant\n<think>\n", thinking)
    assert not prompt_opens("<|im_start|>assistant\n<think>\n\n</think>\n\n", thinking)
    opened = dataclasses.replace(thinking, opened=True)
    message, _ = message_of(OutputPlan(thinking=opened), "step 1</think>\n\nAnswer", FinishReason.STOP)
    assert (message.reasoning_content, message.content) == ("step 1", "Answer")
    message, _ = message_of(OutputPlan(thinking=thinking), "<think>x</think>y", FinishReason.STOP)
    assert (message.reasoning_content, message.content) == ("x", "y")
    message, _ = message_of(OutputPlan(thinking=thinking), "no thinking <think>", FinishReason.STOP)
    assert (message.reasoning_content, message.content) == (None, "no thinking <think>")


def test_parser_flags_name_the_known_parsers() -> None:
    assert set(get_args(ToolCallParser)) == set(toolparsers.PARSER_NAMES)
    assert set(get_args(ReasoningParser)) == set(reasoning.PARSER_NAMES)
    settings = load_settings(["--tool-call-parser", "qwen3"], {"REASONING_PARSER": "none"})
    assert (settings.tool_call_parser, settings.reasoning_parser) == ("qwen3", "none")
    with pytest.raises(ConfigError):
        load_settings([], {"TOOL_CALL_PARSER": "nonsense"})


def test_markers_become_tokens_where_the_tokenizer_has_them() -> None:
    ids = {"[TOOL_CALLS]": 7}
    syntax = toolparsers.choose_syntax("auto", "{{ '[TOOL_CALLS]' }}", ids.get)
    assert syntax is not None and syntax.open == Marker("[TOOL_CALLS]", 7)
    assert toolparsers.choose_syntax("hermes", "", ids.get) == HERMES  # no tokens: text markers
    assert toolparsers.choose_syntax("none", CHATML_TEMPLATE, ids.get) is None
    assert toolparsers.choose_syntax("llama", "", ids.get) == LLAMA3_JSON
