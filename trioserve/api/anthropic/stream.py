"""`EventWriter`: a streamed chat completion's deltas as the Messages API's event sequence; no I/O.

``message_start`` and a ``ping``; then each content block as it forms, in output order: a
``content_block_start``, its deltas (``thinking_delta``, ``text_delta``, ``input_json_delta`` carrying a
call's argument fragments as they are sampled), a ``content_block_stop`` once the next block starts or the
message ends; then ``message_delta`` (stop reason, output tokens) and ``message_stop``. An error ends the
stream with an ``error`` event.
"""

from __future__ import annotations

from typing import Any

from trioserve.api.toolcalls import ToolCallDelta

Event = dict[str, Any]  # each has a "type", which is also its SSE event name


class EventWriter:
    """Builds the events of one streamed message, tracking the content block that is open."""

    def __init__(self) -> None:
        self._index = -1  # the open block's index; -1 before the first
        self._open: str | None = None  # its type: thinking, text, tool_use

    def start(self, message: dict[str, Any]) -> list[Event]:
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def thinking(self, text: str) -> list[Event]:
        events = self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
        return [*events, self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> list[Event]:
        events = self._begin("text", {"type": "text", "text": ""})
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def call(self, delta: ToolCallDelta) -> list[Event]:
        """A chat tool-call delta: a new call (it has an id) opens a ``tool_use`` block."""
        events: list[Event] = []
        if delta.id is not None:
            events += self._close()
            block = {"type": "tool_use", "id": delta.id, "name": delta.function.name or "", "input": {}}
            events += self._begin("tool_use", block)
        if delta.function.arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": delta.function.arguments}))
        return events

    def finish(
        self, stop_reason: str, stop_sequence: str | None, output_tokens: int, prompt_tokens: int, cached_tokens: int
    ) -> list[Event]:
        """The last events. Their usage (cumulative, as Anthropic's) splits the prompt into what was read from
        the prefix cache and the rest, known only once its prefill ran, after ``message_start``."""
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        usage = {
            "input_tokens": prompt_tokens - cached_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens,
        }
        return [
            *self._close(),
            {"type": "message_delta", "delta": delta, "usage": usage},
            {"type": "message_stop"},
        ]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[Event]:
        if self._open == kind and kind != "tool_use":
            return []
        events = self._close()
        self._index += 1
        self._open = kind
        return [*events, {"type": "content_block_start", "index": self._index, "content_block": block}]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        events: list[Event] = []
        if self._open == "thinking":  # the SDK's thinking blocks carry a signature; ours is empty
            events.append(self._delta({"type": "signature_delta", "signature": ""}))
        self._open = None
        return [*events, {"type": "content_block_stop", "index": self._index}]
