"""Prompts with images, for vision-language models: a `ChatTokenizer` backed by the model's `AutoProcessor`.

The chat template writes the family's placeholder where an image content part (``{"type": "image"}``)
stands; the processor expands each placeholder into the image's tokens and preprocesses the images. What it
returns besides the token ids (``pixel_values``, ``image_grid_thw``, ``token_type_ids``...) travels to the
runner untouched, with a content hash of each image and where each image's tokens are in the ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from transformers import ProcessorMixin

from trioserve.errors import InvalidRequest
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import ImageInputs

# Processor outputs that are the prompt itself, not the images'.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask"})


def image_digest(image: Any) -> str:
    """A content hash of a decoded image: its mode, its size and its pixels (not the bytes it came in, so the
    same picture sent as PNG or WebP hashes alike)."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_token_ids(processor: ProcessorMixin) -> frozenset[int]:
    """The ids that stand for image features in a prompt: the tokenizer's named image token where it has one
    (Gemma 3's processor calls its begin-of-image marker the image token), else the processor's, plus
    Pixtral's row-break and end tokens, which sit between an image's feature tokens."""
    tokenizer = processor.tokenizer
    ids: set[int] = set()
    for owner, attribute in (
        (tokenizer, "image_token_id"),
        (processor, "image_token_id"),
        (processor, "image_break_token_id"),
        (processor, "image_end_token_id"),
    ):
        value = getattr(owner, attribute, None)
        if isinstance(value, int) and (attribute != "image_token_id" or not ids):
            ids.add(value)
    return frozenset(ids)


def image_spans(ids: Sequence[int], image_ids: frozenset[int], images: int) -> tuple[tuple[int, int], ...]:
    """Where each image's tokens are: the runs of image-token ids, one per image. Processors that write one
    image as several runs (Idefics3 splitting an image into tiles) get one span from the first run's start
    to the last one's end, covering all the images: still never split, and keyed by all their digests."""
    runs: list[tuple[int, int]] = []
    for at, token_id in enumerate(ids):
        if token_id not in image_ids:
            continue
        if runs and runs[-1][1] == at:
            runs[-1] = (runs[-1][0], at + 1)
        else:
            runs.append((at, at + 1))
    if len(runs) == images or not runs:
        return tuple(runs)
    return ((runs[0][0], runs[-1][1]),)


class VisionTokenizer(ChatTokenizer):
    """A chat tokenizer that also takes images: `encode_images` runs the model's processor.

    Args:
        processor: the model's `AutoProcessor` (its tokenizer is the text side; its chat template is used
            when the tokenizer carries none).
    """

    def __init__(self, processor: ProcessorMixin) -> None:
        tokenizer = processor.tokenizer
        if getattr(tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None):
            tokenizer.chat_template = processor.chat_template
        super().__init__(tokenizer)
        self.processor = processor
        self.image_ids = image_token_ids(processor)
        if not self.image_ids:
            raise ValueError(f"{type(processor).__name__} names no image token")

    @property
    def takes_images(self) -> bool:
        return True

    def encode_images(self, prompt: str, images: Sequence[Any]) -> tuple[list[int], ImageInputs]:
        if not images:
            return self.encode(prompt), ImageInputs({}, (), ())
        try:
            out = self.processor(text=[prompt], images=list(images), return_tensors="pt", add_special_tokens=False)
        except Exception as exc:  # the processor's ValueErrors: placeholders and images do not match, etc.
            raise InvalidRequest(f"the images could not be prepared for this model: {exc}", param="messages") from exc
        ids = [int(i) for i in out["input_ids"][0].tolist()]
        spans = image_spans(ids, self.image_ids, len(images))
        if not spans:
            raise InvalidRequest(
                "the prompt has no place for its images (the chat template wrote no image placeholder)",
                param="messages",
            )
        features = {key: value for key, value in out.items() if key not in _TEXT_KEYS}
        digests = tuple(image_digest(image) for image in images)
        return ids, ImageInputs(features, digests, spans)
