"""Answers beyond JSON (vLLM's ``structured_outputs``: ``regex``, ``choice``, ``grammar``) as Lark grammars
for llguidance, which already enforces our JSON schemas.

Each becomes one standalone Lark grammar (its own ``start``): compiled alone for an answer that is all the
output, or nested as a named sub-grammar (``@answer``) where a thinking block or tool calls surround it
(`grammars`). A regex is written the way llguidance writes one (its ``grammar_from_regex``), a choice as an
alternation of JSON-quoted literals, a grammar as Lark or, converted by llguidance, llama.cpp's GBNF (vLLM
takes both). Each is checked here, so a pattern llguidance cannot take is a 400 naming its field.
"""

from __future__ import annotations

import json

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import any_to_lark

from trioserve.errors import InvalidRequest
from trioserve.text.guided import _is_panic
from trioserve.types import OutputSchema


def answer_lark(spec: OutputSchema) -> str | None:
    """The Lark grammar the answer must match (None: a JSON schema or free text), checked.

    Raises:
        InvalidRequest: the regex or grammar is invalid or uses what llguidance cannot enforce (look-around,
            back-references), or the choice list is empty; ``param`` is ``spec.param``.
    """
    try:
        if spec.regex is not None:
            lark = str(json.loads(LLMatcher.grammar_from_regex(spec.regex))["grammars"][0]["lark_grammar"])
        elif spec.choice is not None:
            if not spec.choice:
                raise InvalidRequest("choice must list at least one string", param=spec.param)
            lark = "start: " + " | ".join(json.dumps(option) for option in spec.choice)
        elif spec.grammar is not None:
            lark = any_to_lark(spec.grammar)
        else:
            return None
        is_error, messages = LLMatcher.validate_grammar_with_warnings(LLMatcher.grammar_from_lark(lark), None)
    except InvalidRequest:
        raise
    except BaseException as exc:
        # Exception: llguidance's parsers raise their own kinds (GbnfToLarkError, ValueError, ...).
        if not isinstance(exc, Exception) and not _is_panic(exc):
            raise
        raise InvalidRequest(f"Invalid {spec.param}: {exc}", param=spec.param) from exc
    if is_error:
        raise InvalidRequest(f"Invalid {spec.param}: {messages[0]}", param=spec.param)
    return lark


def with_answer(main: str, answer: str) -> str:
    """The llguidance grammar of ``main`` (Lark that refers to ``@answer``) with ``answer`` nested in it."""
    return json.dumps({"grammars": [{"lark_grammar": main}, {"name": "answer", "lark_grammar": answer}]})
