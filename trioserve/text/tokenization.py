"""Text in and out: the chat template, an incremental detokenizer, and a stop-string matcher.

The detokenizer never emits half of a multi-byte UTF-8 character (it holds text that decodes to a trailing
U+FFFD until the next token completes it), and the stop matcher holds back any tail that could still grow
into a stop string, so a streamed response never shows text that the final answer would not contain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from transformers import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from trioserve.errors import InvalidRequest
from trioserve.types import ImageInputs

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context when decoding: enough for tokenizers whose pieces decode differently
# at the start of a string (SentencePiece's leading space) to decode the first generated token right.
_CONTEXT_TOKENS = 4
# Special tokens that mark tool calls or thinking: decoded as text (not skipped like other special tokens),
# so that the output parsers (`toolparsers`, `reasoning`) see where calls and thinking start and end.
SHOWN_MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "<think>", "</think>")


class ChatTokenizer:
    """A Hugging Face tokenizer seen as serving needs it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template; /v1/chat/completions needs one")
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        vocab = tokenizer.get_added_vocab()
        self._shown = {vocab[m]: m for m in SHOWN_MARKERS if m in vocab and vocab[m] in special}
        self._backend = _plain_backend(tokenizer)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """`render_chat`, tokenized.

        Raises:
            InvalidRequest: the template rejected the conversation (e.g. roles out of order).
        """
        return self.encode(self.render_chat(messages, tools, template_kwargs))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Renders the chat template with ``add_generation_prompt=True``. ``tools`` (OpenAI shape) reach
        templates that render tools; ``template_kwargs`` (e.g. ``enable_thinking``) are the template's own
        variables. Templates ignore what they do not use.

        Raises:
            InvalidRequest: the template rejected the conversation (e.g. roles out of order).
        """
        try:
            text = self.hf.apply_chat_template(
                [dict(message) for message in messages],
                tools=[dict(tool) for tool in tools] if tools else None,
                tokenize=False,
                add_generation_prompt=True,
                **dict(template_kwargs or {}),
            )
        except Exception as exc:  # jinja2's TemplateError and whatever the template raises on purpose
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc
        assert isinstance(text, str)
        return text

    @property
    def chat_template(self) -> str:
        """The chat template's source (all of them, for tokenizers that carry several)."""
        template = self.hf.chat_template
        return "\n".join(template.values()) if isinstance(template, dict) else str(template)

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` if the tokenizer has it as one added token (such as ``<tool_call>``), else None."""
        token_id = self.hf.get_added_vocab().get(text)
        return int(token_id) if token_id is not None else None

    def encode(self, text: str) -> list[int]:
        """Tokenizes text that already carries any special tokens it needs."""
        ids: list[int] = self.hf.encode(text, add_special_tokens=False)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenizes a raw prompt as the model expects one (its BOS token included, if it uses one)."""
        ids: list[int] = self.hf.encode(text)
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens left out except the markers that structure an output
        (tool calls, thinking), which the output parsers must see."""
        ids = list(token_ids)
        if not self._shown or self._shown.keys().isdisjoint(ids):
            return self._decode(ids)
        parts, start = [], 0
        for at, token_id in enumerate(ids):
            if token_id in self._shown:
                parts += [self._decode(ids[start:at]), self._shown[token_id]]
                start = at + 1
        parts.append(self._decode(ids[start:]))
        return "".join(parts)

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        if self._backend is not None:
            return str(self._backend.decode(token_ids, skip_special_tokens=True))
        text = self.hf.decode(token_ids, skip_special_tokens=True)
        assert isinstance(text, str)
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for, as OpenAI's logprobs report them."""
        return self.decode([token_id]).encode("utf-8", errors="replace")

    @property
    def takes_images(self) -> bool:
        return False

    def encode_images(self, prompt: str, images: Sequence[Any]) -> tuple[list[int], ImageInputs]:
        raise InvalidRequest("this model does not take image input", param="messages")

    def detokenizer(self, prompt_ids: Sequence[int]) -> IncrementalDetokenizer:
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        if self.decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a context ending mid-character would swallow the first generated bytes
        return IncrementalDetokenizer(self, context)


def _plain_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The `tokenizers.Tokenizer` behind ``tokenizer`` when decoding through it gives what
    ``tokenizer.decode`` gives, else None.

    The detokenizer decodes twice per generated token, and transformers' ``decode`` spends most of its time
    around the Rust call (argument conversion, keyword handling), about three quarters of it for short
    windows. That holds for a fast tokenizer whose class overrides neither ``decode`` nor ``_decode`` and that
    does no clean-up of spaces afterwards (transformers skips that clean-up for BPE models anyway).
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer) or not isinstance(tokenizer, TokenizersBackend):
        return None
    if type(tokenizer).decode is not PreTrainedTokenizerBase.decode:
        return None
    if type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    bpe = type(backend.model).__name__ == "BPE"
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    if tokenizer.clean_up_tokenization_spaces and (forced or not bpe):
        return None
    return backend


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
        self.matched: str | None = None  # the stop string found, once one is (Anthropic's stop_sequence)

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut, stop = self._first_completed(buffer)
        if stop is not None:
            self._held = ""
            self.matched = stop
            return buffer[:cut], True
        keep = self._longest_partial_match(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_completed(self, buffer: str) -> tuple[int, str | None]:
        """Start of the stop string that is completed first (earliest end; on a tie, the longer), and that
        string; (-1, None) if none is.

        Ordering by where a stop *ends* makes the result independent of how the text was split into
        pushes: it is where generation would have stopped had each character arrived on its own.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return (best[1], best[2]) if best is not None else (-1, None)

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
