"""Text in and out: the chat template, an incremental detokenizer, and a stop-string matcher.

The detokenizer never emits half of a multi-byte UTF-8 character (it holds text that decodes to a trailing
U+FFFD until the next token completes it), and the stop matcher holds back any tail that could still grow
into a stop string, so a streamed response never shows text that the final answer would not contain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from trioserve.errors import InvalidRequest

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context when decoding: enough for tokenizers whose pieces decode differently
# at the start of a string (SentencePiece's leading space) to decode the first generated token right.
_CONTEXT_TOKENS = 4


class ChatTokenizer:
    """A Hugging Face tokenizer seen as serving needs it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; /v1/chat/completions needs one")

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Renders the chat template with ``add_generation_prompt=True`` and tokenizes it.

        Raises:
            InvalidRequest: the template rejected the conversation (e.g. roles out of order).
        """
        try:
            text = self.hf.apply_chat_template(
                [dict(message) for message in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2's TemplateError and whatever the template raises on purpose
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        assert isinstance(text, str)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        """Tokenizes text that already carries any special tokens it needs."""
        ids: list[int] = self.hf.encode(text, add_special_tokens=False)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self.hf.decode(list(token_ids), skip_special_tokens=True)
        assert isinstance(text, str)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for, as OpenAI's logprobs report them."""
        return self.decode([token_id]).encode("utf-8", errors="replace")

    def detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids[-_CONTEXT_TOKENS:])


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    The text emitted so far always equals the decode of all tokens pushed so far, minus a held-back tail
    that ends in an incomplete UTF-8 sequence; `flush` releases that tail (as U+FFFD if it never completed).
    """

    def __init__(self, tokenizer: ChatTokenizer, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is now certain (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns whatever was held back; call once the sequence has ended."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) and not final:
            return ""
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        delta = new_text[len(prefix_text) :]
        # Keep a short window so each push decodes a handful of tokens, not the whole output.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta


class StopMatcher:
    """Finds stop strings in streamed text, across any token boundaries.

    `push` returns the text safe to show and whether a stop string was found; the stop string itself and
    anything after it are never returned. A tail that is a prefix of some stop string is held back until
    the next push resolves it, and released by `flush` when the stream ends without a stop.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(stop) for stop in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buffer[:cut], True
        keep = self._longest_partial_match(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
