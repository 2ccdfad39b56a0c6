"""Tiny random-weight vision-language models built offline, in-process, processor included.

One builder per family (LLaVA, Gemma 3, Idefics3/SmolVLM, PaddleOCR-VL, and, where torchvision imports,
Qwen2-VL, Qwen2.5-VL and Mistral3). Each reuses the byte-level tokenizer of `trioserve.model.tinymodel`,
adds the family's image tokens, and carries a ChatML template that writes the family's placeholder where
an image content part (``{"type": "image"}``) stands, so the serving path is the one of a real checkpoint.
Images are 32x32 pixels, split into 8x8 patches: a handful of image tokens each.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AddedToken,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from trioserve.model.tinymodel import build_tokenizer

IMAGE_SIZE = 32
_PATCH = 8
# The text model's shape (small enough for float32 on the CPU); heads of 16 dimensions.
_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "initializer_range": 0.5,
    "tie_word_embeddings": False,
}
_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": _PATCH,
}


def vision_template(placeholder: str) -> str:
    """ChatML whose message content is a string or a list of parts: text parts as their text, image parts as
    ``placeholder`` (the token the family's processor expands into the image's tokens)."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + placeholder + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


@dataclass(frozen=True)
class _Family:
    """How to build one family: its image tokens (the first is the placeholder unless ``placeholder`` says
    otherwise), its processor, its config, and whether it needs torchvision."""

    tokens: tuple[str, ...]
    processor: Callable[[PreTrainedTokenizerBase, str], ProcessorMixin]
    config: Callable[[PreTrainedTokenizerBase], Any]
    placeholder: str | None = None
    needs_torchvision: bool = False


def _text(tokenizer: PreTrainedTokenizerBase, **extra: Any) -> dict[str, Any]:
    return {
        **_TEXT,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **extra,
    }


def _id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


# -- LLaVA: CLIP vision tower, every image 16 tokens (4x4 patches, the CLS token dropped) ------------------


def _llava_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
        image_token="<image>",
    )


def _llava_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(**_VISION, projection_dim=32),
        text_config=LlamaConfig(**_text(tokenizer)),
        image_token_index=_id(tokenizer, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


# -- Gemma 3: SigLIP tower, the 4x4 patches pooled to 4 tokens between <start_of_image> and <end_of_image> --


def _gemma3_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=template, image_seq_length=4)


def _gemma3_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = _text(
        tokenizer,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3Config(
        vision_config=SiglipVisionConfig(**_VISION),
        text_config=Gemma3TextConfig(**text),
        mm_tokens_per_image=4,
        initializer_range=0.5,  # the language head too: logits that are not all alike
        boi_token_index=_id(tokenizer, "<start_of_image>"),
        eoi_token_index=_id(tokenizer, "<end_of_image>"),
        image_token_index=_id(tokenizer, "<image_soft_token>"),
        tie_word_embeddings=False,
    )


# -- Idefics3 (SmolVLM): 4x4 patches, pixel-shuffled to 4 tokens, no splitting of the image -----------------


def _idefics3_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    images = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=template)


def _idefics3_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Idefics3Config, Idefics3VisionConfig, LlamaConfig

    return Idefics3Config(
        vision_config=Idefics3VisionConfig(**_VISION),
        text_config=LlamaConfig(**_text(tokenizer)),
        image_token_id=_id(tokenizer, "<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
    )


# -- PaddleOCR-VL: multi-axis rotary positions (like Qwen2-VL), 4x4 patches merged 2x2 to 4 tokens ---------


def _paddle_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import PaddleOCRVLImageProcessorPil, PaddleOCRVLProcessor

    pixels = IMAGE_SIZE * IMAGE_SIZE
    images = PaddleOCRVLImageProcessorPil(
        patch_size=_PATCH, merge_size=2, size={"shortest_edge": pixels, "longest_edge": pixels}
    )
    return PaddleOCRVLProcessor(  # type: ignore[no-untyped-call]
        image_processor=images, tokenizer=tokenizer, chat_template=template
    )


def _paddle_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import PaddleOCRVLConfig

    text = _text(tokenizer, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    return PaddleOCRVLConfig(
        vision_config={**_VISION, "spatial_merge_size": 2},
        text_config=text,
        image_token_id=_id(tokenizer, "<|IMAGE_PLACEHOLDER|>"),
        vision_start_token_id=_id(tokenizer, "<|IMAGE_START|>"),
        vision_end_token_id=_id(tokenizer, "<|IMAGE_END|>"),
        tie_word_embeddings=False,
    )


# -- Qwen2-VL, Qwen2.5-VL: multi-axis rotary positions; 4x4 patches merged 2x2 to 4 tokens --------------


def _qwen_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = IMAGE_SIZE * IMAGE_SIZE
    sizes: dict[str, Any] = {"patch_size": _PATCH, "merge_size": 2, "temporal_patch_size": 2}
    images = Qwen2VLImageProcessorPil(**sizes, size={"shortest_edge": pixels, "longest_edge": pixels})
    videos = Qwen2VLVideoProcessor(**sizes)  # the processor wants one, though we take no video
    return Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=template
    )


def _qwen_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    return {
        "image_token_id": _id(tokenizer, "<|image_pad|>"),
        "video_token_id": _id(tokenizer, "<|video_pad|>"),
        "vision_start_token_id": _id(tokenizer, "<|vision_start|>"),
        "vision_end_token_id": _id(tokenizer, "<|vision_end|>"),
    }


def _qwen2_vl_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Qwen2VLConfig

    text = _text(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": _TEXT["hidden_size"],
        "num_heads": 4,
        "mlp_ratio": 2,
        "patch_size": _PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tokenizer))


def _qwen2_5_vl_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Qwen2_5_VLConfig

    text = _text(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": _TEXT["hidden_size"],
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": _PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tokenizer))


# -- Mistral3: Pixtral tower, 4x4 patches merged 2x2, rows ended by [IMG_BREAK], the image by [IMG_END] -----


def _mistral3_processor(tokenizer: PreTrainedTokenizerBase, template: str) -> ProcessorMixin:
    from transformers import PixtralImageProcessorPil, PixtralProcessor

    images = PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE}, patch_size={"height": _PATCH, "width": _PATCH})
    return PixtralProcessor(
        image_processor=images, tokenizer=tokenizer, patch_size=_PATCH, spatial_merge_size=2, chat_template=template
    )


def _mistral3_config(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    vision = {**_VISION, "head_dim": 8}
    return Mistral3Config(
        vision_config=PixtralVisionConfig(**vision),
        text_config=MistralConfig(**_text(tokenizer, head_dim=16)),
        image_token_index=_id(tokenizer, "[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


_QWEN_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

FAMILIES: dict[str, _Family] = {
    "llava": _Family(("<image>",), _llava_processor, _llava_config),
    "gemma3": _Family(("<start_of_image>", "<image_soft_token>", "<end_of_image>"), _gemma3_processor, _gemma3_config),
    "idefics3": _Family(("<image>",), _idefics3_processor, _idefics3_config),
    "paddleocr_vl": _Family(
        ("<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"),
        _paddle_processor,
        _paddle_config,
        placeholder="<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
    ),
    "qwen2_vl": _Family(
        _QWEN_TOKENS, _qwen_processor, _qwen2_vl_config, placeholder=_QWEN_PLACEHOLDER, needs_torchvision=True
    ),
    "qwen2_5_vl": _Family(
        _QWEN_TOKENS, _qwen_processor, _qwen2_5_vl_config, placeholder=_QWEN_PLACEHOLDER, needs_torchvision=True
    ),
    "mistral3": _Family(
        ("[IMG]", "[IMG_BREAK]", "[IMG_END]"), _mistral3_processor, _mistral3_config, needs_torchvision=True
    ),
}
# Attributes the processors read off the tokenizer (transformers' named extra special tokens).
_NAMED_TOKENS: dict[str, dict[str, str | AddedToken]] = {
    "gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
    "paddleocr_vl": {"image_token": "<|IMAGE_PLACEHOLDER|>"},
}


def torchvision_available() -> bool:
    """Whether torchvision imports (Qwen2-VL's and Pixtral's processors need it)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # a build for another torch fails at import in various ways
        return False
    return True


def available_families() -> tuple[str, ...]:
    """The families this machine can build."""
    return tuple(name for name, family in FAMILIES.items() if not family.needs_torchvision or torchvision_available())


def build_vision(family: str, *, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight vision-language model of ``family`` and its processor, float32, in eval mode.
    Deterministic for a given seed."""
    spec = FAMILIES[family]
    tokenizer = family_tokenizer(family)
    processor = spec.processor(tokenizer, str(tokenizer.chat_template))  # may add tokens of its own (Idefics3)
    return build_vision_model(family, processor.tokenizer, seed=seed), processor


def family_tokenizer(family: str) -> PreTrainedTokenizerBase:
    """The byte-level tokenizer with ``family``'s image tokens and its chat template (no processor: the
    families that need torchvision for one can still be built and served text this way)."""
    spec = FAMILIES[family]
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(spec.tokens)})
    # Named (``tokenizer.image_token``, ``..._id``) and saved in the tokenizer's config, as a real checkpoint's.
    tokenizer._set_model_specific_special_tokens(dict(_NAMED_TOKENS.get(family, {})))
    tokenizer.chat_template = vision_template(spec.placeholder or spec.tokens[0])
    return tokenizer


def build_vision_model(family: str, tokenizer: PreTrainedTokenizerBase, *, seed: int = 0) -> PreTrainedModel:
    """The random-weight model of ``family`` sized to ``tokenizer`` (see `family_tokenizer`)."""
    config = FAMILIES[family].config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForImageTextToText.from_config(config)  # type: ignore[no-untyped-call]
        _redraw_zeros(model)
    model.generation_config.eos_token_id = [_id(tokenizer, "<|im_end|>"), _id(tokenizer, "<|endoftext|>")]
    torch.nn.Module.eval(model)
    return model


@torch.no_grad()
def _redraw_zeros(model: PreTrainedModel) -> None:
    """Weight matrices left at zero by their initialiser (Gemma 3's multimodal projector) redrawn at random,
    so that the image reaches the output and a test can tell."""
    for parameter in model.parameters():
        if parameter.ndim >= 2 and not parameter.any():
            parameter.normal_(std=0.5)


def save_tiny_vision(path: Path, family: str, *, seed: int = 0) -> Path:
    """Builds a tiny ``family`` model and saves it with its processor as a local `from_pretrained` directory."""
    model, processor = build_vision(family, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
