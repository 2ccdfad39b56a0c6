"""The Responses event sequence, built from pieces of a chat stream.

`EventWriter` holds the output items being formed and numbers every event (``sequence_number``). At most
one reasoning item and one message are open at a time; a call opens its own ``function_call`` item, keyed
by the chat delta's call ``index``. Whatever comes next closes what came before (text after reasoning
closes the reasoning; a call closes the text), so items are added and done in output order, as OpenAI
streams them. No I/O: the service feeds it deltas and yields what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trioserve.api.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    ErrorEvent,
    FunctionCall,
    ItemStatus,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Reasoning,
    ReasoningText,
    Response,
    ResponseEvent,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
    item_id,
)
from trioserve.api.toolcalls import ToolCallDelta
from trioserve.errors import TrioserveError


@dataclass
class _Open:
    """An output item still forming: where it is, its id, and its text or arguments so far."""

    kind: Literal["reasoning", "message", "function_call"]
    output_index: int
    id: str
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        return "".join(self.parts)


class EventWriter:
    """Numbers events and tracks the output items of one streamed response."""

    def __init__(self) -> None:
        self._sequence = 0
        self._items: list[OutputItem | _Open] = []  # in output order; `_Open` until done
        self._reasoning: _Open | None = None
        self._message: _Open | None = None
        self._calls: dict[int, _Open] = {}

    def output(self) -> list[OutputItem]:
        """The items done so far (an item still forming is left out)."""
        return [item for item in self._items if not isinstance(item, _Open)]

    def lifecycle(self, kind: str, response: Response) -> ResponseEvent:
        return ResponseEvent(type=kind, sequence_number=self._next(), response=response)

    def reasoning(self, delta: str) -> list[StreamEvent]:
        events = self._close_message("completed") + self._close_calls()
        if self._reasoning is None:
            self._reasoning = self._open("reasoning", "rs")
            item = Reasoning(id=self._reasoning.id, content=[], status="in_progress")
            events.append(self._item_event("response.output_item.added", self._reasoning, item))
        self._reasoning.parts.append(delta)
        events.append(self._text_delta("response.reasoning_text.delta", self._reasoning, delta))
        return events

    def text(self, delta: str) -> list[StreamEvent]:
        events = self._close_reasoning() + self._close_calls() + self._ensure_message()
        assert self._message is not None
        self._message.parts.append(delta)
        events.append(self._text_delta("response.output_text.delta", self._message, delta))
        return events

    def call(self, delta: ToolCallDelta) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = self._calls.get(delta.index)
        if current is None:
            events += self._close_reasoning() + self._close_message("completed")
            current = self._open("function_call", "fc")
            current.call_id = delta.id or f"call_{current.id[3:27]}"
            current.name = delta.function.name or ""
            self._calls[delta.index] = current
            events.append(self._item_event("response.output_item.added", current, self._call_item(current)))
        if delta.function.arguments:
            current.parts.append(delta.function.arguments)
            events.append(
                ArgumentsDeltaEvent(
                    sequence_number=self._next(),
                    item_id=current.id,
                    output_index=current.output_index,
                    delta=delta.function.arguments,
                )
            )
        return events

    def finish(self, status: ItemStatus) -> list[StreamEvent]:
        """Closes every open item. A response with no output at all gets an empty message, as a non-streamed
        one does."""
        if not self._items:
            return self._ensure_message() + self._close_message(status)
        return self._close_reasoning() + self._close_message(status) + self._close_calls()

    def error(self, error: TrioserveError) -> list[StreamEvent]:
        return [ErrorEvent(sequence_number=self._next(), code=error.code, message=error.message, param=error.param)]

    def _ensure_message(self) -> list[StreamEvent]:
        if self._message is not None:
            return []
        self._message = self._open("message", "msg")
        item = OutputMessage(id=self._message.id, status="in_progress", content=[])
        return [
            self._item_event("response.output_item.added", self._message, item),
            self._part_event("response.content_part.added", self._message, OutputText(text="")),
        ]

    # -- closing ----------------------------------------------------------------------------------------

    def _close_reasoning(self) -> list[StreamEvent]:
        current, self._reasoning = self._reasoning, None
        if current is None:
            return []
        item = Reasoning(id=current.id, content=[ReasoningText(text=current.text)], status="completed")
        return [
            self._text_done("response.reasoning_text.done", current),
            self._item_event("response.output_item.done", current, item),
        ]

    def _close_message(self, status: ItemStatus) -> list[StreamEvent]:
        current, self._message = self._message, None
        if current is None:
            return []
        part = OutputText(text=current.text)
        return [
            self._text_done("response.output_text.done", current),
            self._part_event("response.content_part.done", current, part),
            self._item_event(
                "response.output_item.done", current, OutputMessage(id=current.id, status=status, content=[part])
            ),
        ]

    def _close_calls(self) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for current in self._calls.values():
            events.append(
                ArgumentsDoneEvent(
                    sequence_number=self._next(),
                    item_id=current.id,
                    output_index=current.output_index,
                    name=current.name,
                    arguments=current.text,
                )
            )
            events.append(self._item_event("response.output_item.done", current, self._call_item(current, "completed")))
        self._calls.clear()
        return events

    # -- event shapes -------------------------------------------------------------------------------------

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    def _open(self, kind: Literal["reasoning", "message", "function_call"], prefix: str) -> _Open:
        current = _Open(kind, len(self._items), item_id(prefix))
        self._items.append(current)
        return current

    @staticmethod
    def _call_item(current: _Open, status: ItemStatus = "in_progress") -> FunctionCall:
        return FunctionCall(
            id=current.id, call_id=current.call_id, name=current.name, arguments=current.text, status=status
        )

    def _item_event(self, kind: str, current: _Open, item: OutputItem) -> OutputItemEvent:
        if kind == "response.output_item.done":
            self._items[current.output_index] = item
        return OutputItemEvent(
            type=kind,
            sequence_number=self._next(),
            output_index=current.output_index,
            item=item,
        )

    def _part_event(self, kind: str, current: _Open, part: OutputText) -> ContentPartEvent:
        return ContentPartEvent(
            type=kind,
            sequence_number=self._next(),
            item_id=current.id,
            output_index=current.output_index,
            content_index=0,
            part=part,
        )

    def _text_delta(self, kind: str, current: _Open, delta: str) -> TextDeltaEvent:
        return TextDeltaEvent(
            type=kind,
            sequence_number=self._next(),
            item_id=current.id,
            output_index=current.output_index,
            content_index=0,
            delta=delta,
        )

    def _text_done(self, kind: str, current: _Open) -> TextDoneEvent:
        return TextDoneEvent(
            type=kind,
            sequence_number=self._next(),
            item_id=current.id,
            output_index=current.output_index,
            content_index=0,
            text=current.text,
        )
