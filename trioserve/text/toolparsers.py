"""Tool-call syntaxes of model families: which one a model uses, and reading calls out of its output.

A syntax (`CallSyntax`, plain data) says how calls are written; the grammar built from it (`grammars`) makes
the model write them exactly so, which is what lets `CallParser` be a small incremental scanner rather
than a forgiving heuristic: it streams the text before the calls as content, then each call's name once
known and its arguments as they are generated.

Syntaxes (``--tool-call-parser``):

- ``hermes`` (Hermes 2/3, Qwen2.5, Qwen3, QwQ, the built-in demo model): each call as
  ``<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>``, after any text.
- ``llama3_json`` (Llama 3.1-3.3): ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``, ``; ``-separated, only at the start of the answer.
- ``mistral`` (Mistral 7B v0.3, Nemo, Small up to 3; JSON-list templates):
  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.
- ``mistral_v11`` (Mistral's tokenizers from v11: Mistral Small 3.1+, Magistral, Devstral, Ministral 3):
  ``[TOOL_CALLS]name[ARGS]{...}`` for each call, after any text.
- ``json`` (forced calls for a model whose template shows no syntax): one bare ``{"name": ..., "arguments": ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from trioserve.types import CallSyntax, Marker

HERMES = CallSyntax(
    "hermes", open=Marker("<tool_call>"), close=Marker("</tool_call>"), each=True, padding="\n", separator="\n"
)
LLAMA3_JSON = CallSyntax(
    "llama3_json", open=Marker("<|python_tag|>"), each=False, separator="; ", at_start=True, arguments_key="parameters"
)
MISTRAL = CallSyntax("mistral", open=Marker("[TOOL_CALLS]"), each=False, array=True)
MISTRAL_V11 = CallSyntax("mistral_v11", open=Marker("[TOOL_CALLS]"), name_marker=Marker("[ARGS]"))
BARE_JSON = CallSyntax("json", each=False, at_start=True)

SYNTAXES = {s.name: s for s in (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, BARE_JSON)}
ALIASES = {"qwen": "hermes", "qwen2_5": "hermes", "qwen3": "hermes", "llama": "llama3_json", "llama3": "llama3_json"}
PARSER_NAMES = ("auto", "none", *SYNTAXES, *ALIASES)


def detect_syntax(template: str) -> CallSyntax | None:
    """The call syntax a chat template teaches its model, from the markers it renders; None if unknown."""
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL_V11 if "[ARGS]" in template else MISTRAL
    if "<|python_tag|>" in template or '"parameters": dictionary of argument name' in template:
        return LLAMA3_JSON
    return None


def choose_syntax(parser: str, template: str, token_id: Callable[[str], int | None]) -> CallSyntax | None:
    """The syntax for ``--tool-call-parser`` ``parser`` ("auto": detected from ``template``; "none": none),
    its markers resolved to token ids where the tokenizer has them as single added tokens."""
    if parser == "none":
        return None
    syntax = detect_syntax(template) if parser == "auto" else SYNTAXES[ALIASES.get(parser, parser)]
    if syntax is None:
        return None

    def resolve(marker: Marker | None) -> Marker | None:
        return None if marker is None else Marker(marker.text, token_id(marker.text))

    return dataclasses.replace(
        syntax, open=resolve(syntax.open), close=resolve(syntax.close), name_marker=resolve(syntax.name_marker)
    )


def call_id(syntax: CallSyntax) -> str:
    """A new call id; Mistral's templates accept only nine letters or digits."""
    if syntax.name.startswith("mistral"):
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


# -- reading calls ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str  # a fragment of the arguments' JSON text


@dataclass(frozen=True, slots=True)
class CallFinished:
    index: int
    id: str
    name: str
    arguments: str  # the whole arguments JSON text, as generated


CallEvent = Content | CallStarted | CallArguments | CallFinished


class CallParser:
    """Reads text and calls out of an output written in ``syntax``, piece by piece.

    Text before the calls is content; whitespace right before the calls is dropped, and a tail that could
    still become the opening marker is held back, so streamed content never shows part of a marker. Once
    the calls open, every top-level JSON object is a call: its name is reported once complete, then its
    arguments' text as it comes (whitespace after the value held back), then the whole call. `finish`
    returns what was held; `open_call` is the raw text of a call cut short (``max_tokens``, a stop string).
    """

    def __init__(self, syntax: CallSyntax) -> None:
        self._syntax = syntax
        self._opening = syntax.open.text if syntax.open is not None else ""
        self._in_calls = False
        self._decided = not syntax.at_start  # at_start: the first character decides text or calls
        self._held = ""
        self._calls = 0
        self._call: _CallScanner | _ArgumentsScanner | None = None
        self._raw = ""  # raw text since the calls opened or the last complete call ended

    def feed(self, text: str) -> list[CallEvent]:
        events: list[CallEvent] = []
        if not self._in_calls:
            text = self._text(text, events)
        for char in text:
            self._char(char, events)
        return _merged(events)

    def finish(self) -> list[CallEvent]:
        """What was held back, at the end of the output."""
        events: list[CallEvent] = []
        if not self._in_calls and self._held:
            events.append(Content(self._held))
        self._held = ""
        return events

    @property
    def calls(self) -> int:
        """Complete calls read so far."""
        return self._calls

    @property
    def open_call(self) -> str:
        """The raw text of a call started and not completed (with its opening marker), else empty."""
        return self._raw.lstrip() if self._call is not None else ""

    def _text(self, text: str, events: list[CallEvent]) -> str:
        """Consumes content; returns the text after the calls opened (empty while they have not)."""
        buffer = self._held + text
        if not self._decided:
            if not buffer or (self._opening and self._opening.startswith(buffer)):
                self._held = buffer  # could still be the opening marker
                return ""
            self._decided = True
            if buffer.startswith("{") or (self._opening and buffer.startswith(self._opening)):
                self._held, self._in_calls, self._raw = "", True, ""
                if self._opening and buffer.startswith(self._opening):
                    self._raw, buffer = self._opening, buffer[len(self._opening) :]
                return buffer
            self._opening = ""  # plain text: calls can no longer follow
        if self._opening and (at := buffer.find(self._opening)) >= 0:
            if buffer[:at].strip():
                events.append(Content(buffer[:at].rstrip()))
            self._held, self._in_calls = "", True
            self._raw = self._opening
            return buffer[at + len(self._opening) :]
        keep = _partial_suffix(buffer, self._opening) if self._opening else 0
        body, tail = buffer[: len(buffer) - keep], buffer[len(buffer) - keep :]
        shown = body.rstrip()
        self._held = body[len(shown) :] + tail
        if shown:
            events.append(Content(shown))
        return ""

    def _char(self, char: str, events: list[CallEvent]) -> None:
        if self._call is None:
            if char != "{":
                self._raw += char
                return  # wrapping between calls: markers, padding, separators, array brackets
            # What a cut-short call shows as text: from its own opening marker (each-call syntaxes), else
            # the opening of the calls for the first one.
            at = self._raw.rfind(self._syntax.open.text) if self._syntax.each and self._syntax.open else -1
            self._raw = self._raw[at:] if at >= 0 else self._raw if self._calls == 0 else ""
            self._call = self._scanner()
        self._raw += char
        self._call.push(char, events)
        if self._call.done:
            self._call, self._raw = None, ""
            self._calls += 1

    def _scanner(self) -> _CallScanner | _ArgumentsScanner:
        """A scanner for the call starting now; its name is already in the raw text if the syntax writes it
        before the arguments (between the opening and the name marker)."""
        syntax = self._syntax
        if syntax.name_marker is None:
            return _CallScanner(self._calls, call_id(syntax), syntax.arguments_key)
        head = self._raw.removeprefix(syntax.open.text if syntax.open else "")
        name = head.removesuffix(syntax.name_marker.text).strip()
        return _ArgumentsScanner(self._calls, call_id(syntax), name)


class _ArgumentsScanner:
    """A call whose name came before it: the object is the arguments, reported as they come."""

    def __init__(self, index: int, call_id: str, name: str) -> None:
        self.index, self.id, self._name = index, call_id, name
        self.done = False
        self._started = False
        self._json = _JsonDepth()
        self._arguments = ""

    def push(self, char: str, events: list[CallEvent]) -> None:
        if not self._started:
            self._started = True
            events.append(CallStarted(self.index, self.id, self._name))
        self._arguments += char
        events.append(CallArguments(self.index, char))
        self._json.track(char)
        if self._json.depth == 0:
            self.done = True
            events.append(CallFinished(self.index, self.id, self._name, self._arguments))


class _CallScanner:
    """One call object, character by character: the name, then the arguments as they are generated."""

    def __init__(self, index: int, call_id: str, arguments_key: str) -> None:
        self.index, self.id, self._key_name = index, call_id, arguments_key
        self.done = False
        self._json = _JsonDepth()
        self._expect_key = True  # at depth 1: the next string is a key
        self._key: str | None = None
        self._raw = ""  # the current depth-1 key or value
        self._in_value = False
        self._name: str | None = None
        self._arguments = ""
        self._held = ""  # whitespace after the arguments' value, not yet known to be inside it
        self._pending = ""  # arguments generated before the name (not with our grammars; kept correct anyway)

    def push(self, char: str, events: list[CallEvent]) -> None:
        top_level = self._json.depth == 1 and not self._json.in_string
        if top_level and char in ",}":
            self._end_value(events)
            self._expect_key = True
        elif top_level and char == ":":
            self._key, self._raw, self._expect_key = json.loads(self._raw.strip()), "", False
        elif self._json.depth >= 1 and not (top_level and char.isspace() and not self._in_value):
            self._in_value = self._in_value or not self._expect_key
            self._raw += char
            if self._in_value and self._key == self._key_name:
                self._argument_char(char, events)
        self._json.track(char)
        if self._json.depth == 0:
            self.done = True
            name = self._name or ""
            events.append(CallFinished(self.index, self.id, name, self._arguments))

    def _argument_char(self, char: str, events: list[CallEvent]) -> None:
        if self._json.depth == 1 and not self._json.in_string and char.isspace():
            self._held += char
            return
        text, self._held = self._held + char, ""
        self._arguments += text
        if self._name is None:
            self._pending += text
        else:
            events.append(CallArguments(self.index, text))

    def _end_value(self, events: list[CallEvent]) -> None:
        if self._key == "name" and self._in_value:
            self._name = json.loads(self._raw.strip())
            events.append(CallStarted(self.index, self.id, self._name or ""))
            if self._pending:
                events.append(CallArguments(self.index, self._pending))
                self._pending = ""
        self._key, self._raw, self._in_value, self._held = None, "", False, ""


class _JsonDepth:
    """Where a character of JSON text is: its nesting depth and whether it is inside a string."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self._escape = False

    def track(self, char: str) -> None:
        if self.in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def _merged(events: list[CallEvent]) -> list[CallEvent]:
    """Adjacent fragments of the same kind joined: one delta per piece, not one per character."""
    merged: list[CallEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if isinstance(event, CallArguments) and isinstance(last, CallArguments) and last.index == event.index:
            merged[-1] = CallArguments(event.index, last.text + event.text)
        elif isinstance(event, Content) and isinstance(last, Content):
            merged[-1] = Content(last.text + event.text)
        else:
            merged.append(event)
    return merged
