"""A chat choice's output as the client sees it: the thinking block, the text, and the tool calls.

`ChoiceReader` chains the two output parsers (`reasoning.ReasoningSplitter`, then
`toolparsers.CallParser` over the answer) and is fed the choice's text piece by piece, streamed or not, so
both paths read an output the same way. `message_of` and `deltas_of` make its events into OpenAI shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from trioserve.api.replies import AssistantMessage, Delta
from trioserve.api.toolcalls import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from trioserve.text.reasoning import Answer, Reasoning, ReasoningSplitter
from trioserve.text.toolparsers import CallArguments, CallFinished, CallParser, CallStarted, Content
from trioserve.types import CallSyntax, FinishReason, Thinking

Event = Reasoning | Content | CallStarted | CallArguments | CallFinished


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """How to read one request's outputs: the call syntax when tools are in play, the thinking block when
    the model writes one, and whether ``tool_choice`` named a function (OpenAI's finish reason is then
    ``"stop"``, not ``"tool_calls"``)."""

    calls: CallSyntax | None = None
    thinking: Thinking | None = None
    named: bool = False


class ChoiceReader:
    """Reads one choice's output, piece by piece (see the module docstring)."""

    def __init__(self, plan: OutputPlan) -> None:
        self._plan = plan
        self._splitter = ReasoningSplitter(plan.thinking) if plan.thinking is not None else None
        self._calls = CallParser(plan.calls) if plan.calls is not None else None

    def feed(self, text: str) -> list[Event]:
        if self._splitter is None:
            return self._answer(text)
        return self._read(self._splitter.feed(text))

    def finish(self) -> list[Event]:
        """Whatever was held back, once the output has ended."""
        events = self._read(self._splitter.finish()) if self._splitter is not None else []
        if self._calls is not None:
            events += self._calls.finish()
        return events

    @property
    def calls(self) -> int:
        """Complete calls read so far."""
        return self._calls.calls if self._calls is not None else 0

    @property
    def cut_short(self) -> str:
        """The raw text of a call that was started and never completed (the output was cut)."""
        return self._calls.open_call if self._calls is not None else ""

    def finish_reason(self, finish: FinishReason | None) -> str | None:
        """OpenAI's finish reason: ``"tool_calls"`` (``"stop"`` for a named function) when the output ended
        normally after calls."""
        if finish is FinishReason.STOP and self.calls and not self.cut_short:
            return "stop" if self._plan.named else "tool_calls"
        return finish.value if finish is not None else None

    def _read(self, parts: list[Reasoning | Answer]) -> list[Event]:
        events: list[Event] = []
        for part in parts:
            events += [part] if isinstance(part, Reasoning) else self._answer(part.text)
        return events

    def _answer(self, text: str) -> list[Event]:
        if self._calls is None:
            return [Content(text)] if text else []
        return list(self._calls.feed(text))


def message_of(plan: OutputPlan, text: str, finish: FinishReason | None) -> tuple[AssistantMessage, str | None]:
    """A whole choice's message and finish reason. A call cut short (``max_tokens``, a stop string) is not
    returned as a call (it would not parse): its text is part of the content."""
    reader = ChoiceReader(plan)
    events = reader.feed(text) + reader.finish()
    content = "".join(e.text for e in events if isinstance(e, Content)) + reader.cut_short
    reasoning = "".join(e.text for e in events if isinstance(e, Reasoning))
    calls = [
        ToolCall(id=e.id, function=FunctionCall(name=e.name, arguments=e.arguments))
        for e in events
        if isinstance(e, CallFinished)
    ]
    message = AssistantMessage(
        content=None if calls and not content else content,
        tool_calls=calls or None,
        reasoning_content=reasoning or None,
    )
    return message, reader.finish_reason(finish)


def deltas_of(events: list[Event]) -> list[Delta]:
    """Stream deltas for ``events``: a call's first delta carries its index, id, type and name (arguments
    empty), the following ones fragments of its arguments, as OpenAI streams them."""
    deltas = []
    for event in events:
        if isinstance(event, Content):
            deltas.append(Delta(content=event.text))
        elif isinstance(event, Reasoning):
            deltas.append(Delta(reasoning_content=event.text))
        elif isinstance(event, CallStarted):
            function = FunctionCallDelta(name=event.name, arguments="")
            deltas.append(
                Delta(tool_calls=[ToolCallDelta(index=event.index, id=event.id, type="function", function=function)])
            )
        elif isinstance(event, CallArguments):
            function = FunctionCallDelta(arguments=event.text)
            deltas.append(Delta(tool_calls=[ToolCallDelta(index=event.index, function=function)]))
    return deltas
