"""The detokenizer and the stop matcher: examples, then properties over random token streams."""

from __future__ import annotations

import functools
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from trioserve.text.tokenization import ChatTokenizer, StopMatcher, _plain_backend


def stream_text(tokenizer: ChatTokenizer, ids: list[int], context: list[int]) -> tuple[list[str], str]:
    detokenizer = tokenizer.detokenizer(context)
    pieces = [detokenizer.push(i) for i in ids]
    return pieces, detokenizer.flush()


def test_multibyte_characters_are_never_split(chat_tokenizer: ChatTokenizer) -> None:
    ids = chat_tokenizer.encode("né 世界 🎉")
    pieces, tail = stream_text(chat_tokenizer, ids, [])
    assert "".join(pieces) + tail == "né 世界 🎉"
    for piece in pieces:
        assert "\ufffd" not in piece
        piece.encode("utf-8")  # every piece is valid text on its own


def test_chat_template_adds_generation_prompt(chat_tokenizer: ChatTokenizer) -> None:
    ids = chat_tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    text = chat_tokenizer.hf.decode(ids)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_stop_string_across_token_boundaries() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("hello E") == ("hello ", False)  # "E" held back: it may start "END"
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)


def test_partial_match_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("xE") == ("x", False)
    assert matcher.push("Nx") == ("ENx", False)
    assert matcher.push("EN") == ("", False)
    assert matcher.flush() == "EN"


def test_first_completed_stop_wins() -> None:
    # "cd" completes (at 4) before "abcde" would (at 5): generation stops at "ab".
    assert StopMatcher(["abcde", "cd"]).push("abcdef") == ("ab", True)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Feeds one character at a time and stops at the first completed stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


alphabet = st.sampled_from(list("abcE ND"))


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet, max_size=40),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=5), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_streamed_stop_matching_equals_reference(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    matcher = StopMatcher(stops)
    shown, stopped = "", False
    for start, end in itertools.pairwise(bounds):
        piece, stopped = matcher.push(text[start:end])
        shown += piece
        if stopped:
            break
    if not stopped:
        shown += matcher.flush()
    assert (shown, stopped) == reference_cut(text, stops)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_streamed_detokenization_equals_full_decode(chat_tokenizer: ChatTokenizer, data: st.DataObject) -> None:
    # Any token ids at all, including byte tokens that form broken UTF-8 and special tokens.
    vocab = len(chat_tokenizer.hf)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    context = data.draw(st.lists(st.integers(0, vocab - 1), max_size=4))
    pieces, tail = stream_text(chat_tokenizer, ids, context)
    assert "".join(pieces) + tail == chat_tokenizer.decode(ids)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30), stops=st.lists(st.text(min_size=1, max_size=4), max_size=4))
def test_text_pipeline_on_real_text(chat_tokenizer: ChatTokenizer, text: str, stops: list[str]) -> None:
    """Detokenizer then stop matcher, token by token: equals cutting the full text at the first stop."""
    ids = chat_tokenizer.encode(text)
    full = chat_tokenizer.decode(ids)
    detokenizer = chat_tokenizer.detokenizer([])
    matcher = StopMatcher(stops)
    shown, stopped = "", False
    for i in ids:
        piece, stopped = matcher.push(detokenizer.push(i))
        shown += piece
        if stopped:
            break
    if not stopped:
        piece, stopped = matcher.push(detokenizer.flush())
        shown += piece
        if not stopped:
            shown += matcher.flush()
    assert (shown, stopped) == reference_cut(full, stops)


@functools.cache
def wordpiece_tokenizer() -> PreTrainedTokenizerBase:
    """A BERT-style tokenizer: WordPiece, whose decode cleans up spaces before punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, ".": 3, "##s": 4, ",": 5, "it": 6, "'": 7, "s": 8, "?": 9}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=True, unk_token="[UNK]")
    tokenizer.chat_template = "{{ messages }}"
    return tokenizer


@settings(max_examples=200)
@given(data=st.data())
def test_decoding_equals_transformers_decode(
    hf_tokenizer: PreTrainedTokenizerBase, chat_tokenizer: ChatTokenizer, data: st.DataObject
) -> None:
    # The demo's byte-level BPE decodes through the Rust tokenizer directly; a tokenizer whose decode also
    # cleans up spaces goes through transformers (it must not take the shortcut).
    wordpiece = wordpiece_tokenizer()
    assert _plain_backend(hf_tokenizer) is not None and _plain_backend(wordpiece) is None
    for tokenizer in (chat_tokenizer, ChatTokenizer(wordpiece)):
        ids = data.draw(st.lists(st.integers(0, len(tokenizer.hf) - 1), max_size=12))
        assert tokenizer.decode(ids) == tokenizer.hf.decode(ids, skip_special_tokens=True)
