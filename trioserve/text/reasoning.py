"""Thinking blocks: which models write one, and splitting it off the answer.

Reasoning models (DeepSeek-R1 and its distills, Qwen3, QwQ) think in a ``<think>...</think>`` block before
answering. The block goes to ``reasoning_content``, the rest to ``content``. Some templates open the block
in the prompt (R1's ``<think>\\n`` after the assistant header), so the output starts inside it; others let
the model open it (Qwen3), or close it in the prompt when thinking is off (Qwen3's ``enable_thinking``
false renders an empty block), and then the output is all answer. Which case applies is read from the
rendered prompt (`prompt_opens`), per request.

| name | models |
|---|---|
| ``think`` (aliases ``deepseek_r1``, ``qwen3``) | templates that render ``<think>`` / ``</think>`` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trioserve.types import Marker, Thinking

OPEN, CLOSE = "<think>", "</think>"
ALIASES = {"deepseek_r1": "think", "qwen3": "think"}
PARSER_NAMES = ("auto", "none", "think", *ALIASES)


def choose_thinking(parser: str, template: str, token_id: Callable[[str], int | None]) -> Thinking | None:
    """The thinking block for ``--reasoning-parser`` ``parser`` ("auto": if ``template`` renders one), its
    markers resolved to token ids where the tokenizer has them as single added tokens."""
    if parser == "none" or (parser == "auto" and CLOSE not in template):
        return None
    return Thinking(Marker(OPEN, token_id(OPEN)), Marker(CLOSE, token_id(CLOSE)))


def prompt_opens(prompt: str, thinking: Thinking) -> bool:
    """Whether the rendered prompt ends inside an open thinking block (the output starts in it)."""
    at = prompt.rfind(thinking.open.text)
    return at >= 0 and thinking.close.text not in prompt[at:] and not prompt[at + len(thinking.open.text) :].strip()


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str


@dataclass(frozen=True, slots=True)
class Answer:
    text: str


class ReasoningSplitter:
    """Splits an output into its thinking block and its answer, piece by piece.

    A tail that could still become a marker is held back; whitespace between the block and the answer is
    dropped. An output that does not start with the block (after whitespace) is all answer.
    """

    def __init__(self, thinking: Thinking) -> None:
        self._open, self._close = thinking.open.text, thinking.close.text
        self._state = "thinking" if thinking.opened else "start"
        self._held = ""

    def feed(self, text: str) -> list[Reasoning | Answer]:
        buffer, self._held = self._held + text, ""
        parts: list[Reasoning | Answer] = []
        if self._state == "start":
            stripped = buffer.lstrip()
            if self._open.startswith(stripped):
                self._held = buffer  # could still open the block
                return parts
            if stripped.startswith(self._open):
                self._state, buffer = "thinking", stripped[len(self._open) :]
            else:
                self._state = "answer"
        if self._state == "thinking":
            at = buffer.find(self._close)
            if at < 0:
                keep = _partial_suffix(buffer, self._close)
                if buffer[: len(buffer) - keep]:
                    parts.append(Reasoning(buffer[: len(buffer) - keep]))
                self._held = buffer[len(buffer) - keep :]
                return parts
            if at:
                parts.append(Reasoning(buffer[:at]))
            self._state, buffer = "gap", buffer[at + len(self._close) :]
        if self._state == "gap":
            buffer = buffer.lstrip()
            if not buffer:
                return parts
            self._state = "answer"
        if buffer:
            parts.append(Answer(buffer))
        return parts

    def finish(self) -> list[Reasoning | Answer]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [Reasoning(held)] if self._state == "thinking" else [Answer(held)]


def _partial_suffix(text: str, marker: str) -> int:
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
