"""The shape of an output (`OutputSchema`) as one llguidance grammar: a thinking block, then free text, a JSON
answer (or a regex, choice or grammar one, `patterns`), or tool calls in the model's own syntax.

A JSON ``response_format`` alone compiles straight from its schema (`guided.json_grammar`). Anything with
tools or thinking becomes a Lark grammar whose JSON parts are inline ``%json`` schemas:

- *auto* tool calls are lazy: any text is allowed until the call syntax's opening marker appears (a special
  token, or text such as ``<tool_call>``); from there the call must be ``{"name": <one of the tools>,
  "arguments": <that tool's schema>}`` in the syntax's wrapping, so every call parses and validates.
- a thinking block (``<think>...</think>``) is free; the grammar of the answer starts after it closes.

Tool parameters are placed under the call schema's root ``$defs`` (``tool_<i>``) and their local
references rewritten to point there, so ``$defs``/``definitions``/``#`` references inside a tool's
parameters resolve even though the parameters now sit deeper in a larger schema.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from trioserve.errors import InvalidRequest
from trioserve.text.guided import JSON_DEFAULTS, JSON_VALUES, _is_panic, closed, json_grammar
from trioserve.text.patterns import answer_lark, with_answer
from trioserve.types import CallSyntax, Marker, OutputSchema, Thinking, ToolSpec

# Whitespace allowed between a closed thinking block and the answer.
_GAP = r"/[ \t\r\n]{0,8}/"


def output_grammar(spec: OutputSchema) -> str:
    """An llguidance grammar for outputs of the shape ``spec`` describes.

    Raises:
        InvalidRequest: a schema (the answer's or a tool's, named by its ``param``) is invalid or cannot be
            enforced.
    """
    answer = answer_lark(spec)
    if not (spec.tools and spec.calls) and spec.thinking is None:
        if answer is not None:
            return LLMatcher.grammar_from_lark(answer)
        return json_grammar(dict(spec.schema or {}), strict=spec.strict, param=spec.param)
    # Each schema alone first, so that an error names the request field it came from.
    if spec.schema is not None:
        _check(json.dumps(spec.schema, sort_keys=True), spec.strict, spec.param)
    for tool in spec.tools if spec.calls else ():
        _check(json.dumps(tool.parameters, sort_keys=True), tool.strict, tool.param)
    lark = _lark(spec)
    try:
        grammar = LLMatcher.grammar_from_lark(lark) if answer is None else with_answer(lark, answer)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    except BaseException as exc:
        if not isinstance(exc, ValueError | TypeError) and not _is_panic(exc):
            raise
        raise InvalidRequest(f"Invalid schema: {exc}", param=_blame(spec)) from exc
    if is_error:
        raise InvalidRequest(f"Invalid schema: {messages[0]}", param=_blame(spec))
    return grammar


@functools.lru_cache(maxsize=256)
def _check(schema_json: str, strict: bool, param: str) -> None:
    """Compiles one schema alone (cached: agent frameworks send the same tools with every request)."""
    json_grammar(json.loads(schema_json), strict=strict, param=param)


def _blame(spec: OutputSchema) -> str:
    return "tools" if spec.tools else spec.param


def _lark(spec: OutputSchema) -> str:
    rules: list[str] = []
    answer = _answer(spec, rules)
    if spec.tools and spec.calls is not None:
        text_before = not spec.required and spec.free_answer
        calls = _calls(spec.calls, spec.tools, spec.parallel, rules, text_before=text_before)
        body = calls if spec.required else f"{answer} | {calls}"
    else:
        body = answer
    rules.insert(0, f"body: {body}")
    rules.insert(0, f"start: {_thinking(spec.thinking, rules)}body")
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


def _answer(spec: OutputSchema, rules: list[str]) -> str:
    if spec.schema is not None:
        rules.append(f"answer: %json {_options(spec.schema, spec.strict)}")
        return "answer"
    if not spec.free_answer:
        return "@answer"  # the regex, choice or grammar, nested (`patterns.with_answer`)
    syntax = spec.calls
    if spec.tools and syntax is not None and syntax.at_start:
        # Calls are bare JSON at the start: text that starts with "{" would be a call, so text may not.
        rules.append(r"TEXT: /[^{](.|\n)*/")
    else:
        rules.append(r"TEXT: /(.|\n)+/")
    return "TEXT?"


def _thinking(thinking: Thinking | None, rules: list[str]) -> str:
    if thinking is None:
        return ""
    close = _marker(thinking.close)
    if thinking.close.token_id is None:
        rules.append(f"think[lazy]: THOUGHT {close}")  # ends at the first close marker
    else:
        rules.append(f"think: THOUGHT? {close}")  # text cannot contain a special token
    rules.append(r"THOUGHT: /(.|\n)+/")
    rules.append(f"gap: {_GAP}")
    if thinking.opened:
        return "think gap "
    return f"({_marker(thinking.open)} think gap)? "


def _calls(
    syntax: CallSyntax, tools: tuple[ToolSpec, ...], parallel: bool, rules: list[str], *, text_before: bool
) -> str:
    """Adds the rules of a turn's calls; returns the expression for them (with any text allowed before)."""
    rules.append(f"call: {_call(syntax, tools, parallel, rules)}")
    separator, padding = _literal(syntax.separator), _literal(syntax.padding)
    close = _marker(syntax.close) if syntax.close is not None else ""
    opening = _marker(syntax.open) if syntax.open is not None else ""
    if syntax.each:
        rules.append(f"block: {opening} {padding} call {padding} {close}")
        more = f"({separator} block)*" if parallel else ""
        rules.append(f"calls: block {more}")
        after_opening = f"{padding} call {padding} {close} {more}"
    else:
        more = f"({separator} call)*" if parallel and not syntax.array else ""
        optional = "?" if syntax.at_start and opening else ""
        rules.append(f"calls: {opening}{optional} call {more} {close}")
        after_opening = f"call {more} {close}"
    if not text_before or syntax.at_start:
        return "calls"
    if syntax.open is None or syntax.open.token_id is not None:
        return "TEXT? calls"  # text never contains a special token: nothing to be lazy about
    # Any text until the opening marker first appears (lazy: the shortest match), then the calls.
    rules.append(f"head[lazy]: HEAD_TEXT {opening}")
    rules.append(r"HEAD_TEXT: /(.|\n)*/")
    rules.append(f"first: head {after_opening}")
    return "first"


def _call(syntax: CallSyntax, tools: tuple[ToolSpec, ...], parallel: bool, rules: list[str]) -> str:
    """The expression for one call (adding the rules it needs)."""
    if syntax.name_marker is not None:  # name, marker, then the arguments alone
        names = []
        for i, tool in enumerate(tools):
            rules.append(f"arguments_{i}: %json {_options(tool.parameters, tool.strict, CALL_JSON)}")
            names.append(f"{json.dumps(tool.name)} {_marker(syntax.name_marker)} arguments_{i}")
        return " | ".join(names)
    strict = any(tool.strict for tool in tools)
    schema = _call_schema(tools, syntax)
    if syntax.array:
        schema = {"$defs": schema.pop("$defs"), "type": "array", "items": schema, "minItems": 1}
        schema |= {} if parallel else {"maxItems": 1}
    return f"%json {_options(schema, strict, CALL_JSON)}"


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


def _marker(marker: Marker) -> str:
    return f"<[{marker.token_id}]>" if marker.token_id is not None else json.dumps(marker.text)


# Calls are written as chat templates render them (Jinja's tojson, Python's json.dumps): ", " and ": ", no
# other whitespace. In distribution for the model, and no tokens spent on whitespace.
CALL_JSON: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _options(schema: Mapping[str, Any], strict: bool, layout: Mapping[str, Any] = JSON_DEFAULTS) -> str:
    """A schema for ``%json``, with the whitespace ``layout`` and the strictness asked for (a schema's own
    "x-guidance" options win)."""
    options = dict(layout) | {"lenient": not strict} | dict(schema.get("x-guidance") or {})
    return json.dumps(closed(dict(schema)) | {"x-guidance": options})


def _call_schema(tools: tuple[ToolSpec, ...], syntax: CallSyntax) -> dict[str, Any]:
    """One call: ``{"name": <const>, <arguments key>: <that tool's parameters>}``, any of the tools."""
    defs = {f"tool_{i}": _relocate(dict(tool.parameters), f"#/$defs/tool_{i}") for i, tool in enumerate(tools)}
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, syntax.arguments_key: {"$ref": f"#/$defs/tool_{i}"}},
            "required": ["name", syntax.arguments_key],
            "additionalProperties": False,
        }
        for i, tool in enumerate(tools)
    ]
    return {"$defs": defs} | (calls[0] if len(calls) == 1 else {"anyOf": calls})


def _relocate(value: Any, base: str) -> Any:
    """``value`` with every local ``$ref`` ("#...") made relative to ``base``, where ``value`` will live."""
    if isinstance(value, dict):
        moved = {key: item if key in JSON_VALUES else _relocate(item, base) for key, item in value.items()}
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            moved["$ref"] = base + ref[1:]
        return moved
    if isinstance(value, list):
        return [_relocate(item, base) for item in value]
    return value
