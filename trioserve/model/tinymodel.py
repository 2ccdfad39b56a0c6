"""A tiny random-weight chat model built offline, in-process.

It backs the demo server (no model named), the tests, and the benchmark's larger shape. The tokenizer is
byte-level BPE, so every UTF-8 string round-trips, and it carries a ChatML template, so the serving path is
the same as for a real instruct model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

DEMO_MODEL_ID = "trioserve-tiny-random"

# ChatML, plus tools as Qwen2.5's template renders them (the "hermes" call syntax): a system block listing
# them, and an assistant turn's calls as <tool_call> blocks of {"name", "arguments"}. Without tools or calls
# it renders exactly as plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n# Tools\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    '{{ \'\n</tools>\nFor each call, return {"name": ..., "arguments": ...} within <tool_call></tool_call>'
    " tags.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '\n<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson) + '\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CONSONANTS = "b c d f g h j k l m n p r s t v w z ch sh th br st tr pl".split()  # noqa: SIM905
_VOWELS = "a e i o u ai ea ou ie".split()  # noqa: SIM905


def _synthetic_corpus(words: int, seed: int = 0) -> list[str]:
    """Lines of pseudo-words with a Zipf-like frequency, enough distinct words for a BPE to learn
    thousands of merges, so prompts tokenize to realistic lengths (a few characters per token)."""
    generator = torch.Generator().manual_seed(seed)
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    lexicon = []
    for _ in range(20000):
        count = 1 + int(torch.randint(4, (1,), generator=generator))
        picks = torch.randint(len(syllables), (count,), generator=generator).tolist()
        lexicon.append("".join(syllables[p] for p in picks))
    # Zipf: rank r drawn with probability ~ 1/r.
    weights = 1.0 / torch.arange(1, len(lexicon) + 1, dtype=torch.float64)
    draws = torch.multinomial(weights, words, replacement=True, generator=generator).tolist()
    return [" ".join(lexicon[d] for d in draws[i : i + 20]) for i in range(0, words, 20)]


def build_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerBase:
    """Builds a byte-level BPE tokenizer with a ChatML template.

    Args:
        vocab_size: 0 for the 256 bytes alone (plus special tokens); larger to train merges on a small
            synthetic corpus up to about that size.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, len(alphabet) + len(SPECIAL_TOKENS)),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_synthetic_corpus(400_000) if vocab_size else [], trainer=trainer)
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.5,
    seed: int = 0,
) -> PreTrainedModel:
    """Builds a random-weight Llama sized to the tokenizer. Deterministic for a given seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        # Untied and widely initialised by default: a tiny random model then produces varied tokens rather
        # than echoing its input, which makes batched-vs-solo comparisons meaningful.
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    torch.nn.Module.to(model, dtype=dtype)
    torch.nn.Module.eval(model)
    return model


def save_tiny_model(path: Path, *, vocab_size: int = 0, **shape: Any) -> Path:
    """Builds the tiny model and saves it, tokenizer included, as a local `from_pretrained` directory."""
    tokenizer = build_tokenizer(vocab_size)
    model = build_model(tokenizer, **shape)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
