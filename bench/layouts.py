"""The GPU benchmark's models: random-weight Llama layouts of real shapes, built in place (no download).

``8b`` is Llama-3.1-8B's layout, ``1b`` Llama-3.2-1B's, both with a 32k byte-level BPE trained on the
Python standard library and a ChatML template (as ``../shared/gpu/make_model.py`` builds them, so figures
compare with the issue's). ``tiny`` is the demo model's shape, so the whole GPU procedure can be exercised
on a CPU in seconds. Random weights are fine for speed: what is measured is forward passes, scheduling and
streaming, not what the tokens say.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHAPES: dict[str, dict[str, int | bool]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
    },
    "8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
}
LAYOUTS = ("tiny", *SHAPES)


def _stdlib_corpus(limit: int = 30_000_000) -> Iterator[str]:
    total = 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        total += len(text)
        yield text
        if total > limit:
            return


def _bpe_tokenizer(vocab: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


def build_layout(layout: str, out: Path, device: str) -> Path:
    """Builds ``layout`` into ``out`` (a `from_pretrained` directory) unless it is already there."""
    if (out / "config.json").exists():
        return out
    if layout == "tiny":
        from trioserve.model.tinymodel import save_tiny_model

        return save_tiny_model(out)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer(32000)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")  # type: ignore[attr-defined]
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # type: ignore[attr-defined]
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        max_position_embeddings=8192,
        rope_theta=500000.0,
        **SHAPES[layout],
    )
    config.eos_token_id, config.pad_token_id, config.bos_token_id = eos, pad, None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.random.fork_rng(), torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


if __name__ == "__main__":
    import sys

    print(build_layout(sys.argv[1], Path(sys.argv[2]), sys.argv[3]), flush=True)
