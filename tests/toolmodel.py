"""A tiny random model whose tokenizer has the tool-call and thinking markers as single added tokens, as
Qwen's and Mistral's do, so tests can drive the model's choice between text and a call with ``logit_bias``
on one token."""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trioserve.cli import build_app
from trioserve.config import Settings
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinymodel import CHATML_TEMPLATE, build_model, build_tokenizer
from trioserve.server.app import TrioserveApp
from trioserve.text.tokenization import ChatTokenizer

MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "[ARGS]"]  # Qwen, Mistral
_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# R1-style: the assistant turn opens the thinking block, so the output starts inside it; with
# enable_thinking false it is rendered empty and closed (as Qwen3's template does), so the output is all answer.
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    _PROMPT,
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}",
)
assert THINKING_TEMPLATE != CHATML_TEMPLATE


@functools.cache
def _model_and_tokenizer(thinking: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = THINKING_TEMPLATE if thinking else CHATML_TEMPLATE
    return build_model(tokenizer, dtype=torch.float32), tokenizer


def tool_tokenizer(thinking: bool = False) -> ChatTokenizer:
    return ChatTokenizer(_model_and_tokenizer(thinking)[1])


def token(text: str) -> int:
    """The id of one of the `MARKERS` (the same in both tokenizers)."""
    token_id = tool_tokenizer().token_id(text)
    assert token_id is not None
    return token_id


def tool_runner(thinking: bool = False) -> TransformersRunner:
    model, tokenizer = _model_and_tokenizer(thinking)
    eos = frozenset(int(i) for i in model.generation_config.eos_token_id)
    return TransformersRunner(
        model, ChatTokenizer(tokenizer), model_id="tiny-tools", max_batch_size=8, eos_token_ids=eos
    )


def tool_app(*, thinking: bool = False, **settings: Any) -> TrioserveApp:
    options = Settings(hotload=True, prefill_chunk=64, **{"max_concurrent": 8, "max_queue": 64} | settings)
    return build_app(options, load=functools.partial(tool_runner, thinking))
