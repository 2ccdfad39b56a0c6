"""A test double of a vision-language model's tokenizer, for the serving glue: it records what serving hands it.

`ImageTokenizer` is the demo model's real tokenizer, saying it takes images: ``render_chat`` writes each
``{"type": "image"}`` part as ``<image>``, and ``encode_images`` expands each into `TOKENS_PER_IMAGE` tokens
(with their spans and a content digest) and records what it was given. It stands in for the processor
only: what it checks is what serving hands a vision tokenizer (decoded RGB images, in order, the rendered
prompt) and what serving does with the answer (the ids, usage). Every refusal under test happens before
a tokenizer is asked anything, so those tests hold for any vision model. The demo runner it sits beside
is text-only: a request that gets through generates from the ids alone.

`python -m tests.vision` runs the real CLI with it (for a server in a subprocess, whose memory a test reads).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from trioserve import cli
from trioserve.config import Settings
from trioserve.model.runner import TransformersRunner
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import ImageInputs

TOKENS_PER_IMAGE = 5
_load_demo_runner = cli.load_runner


class ImageTokenizer(ChatTokenizer):
    """The demo tokenizer as a vision model's would be seen by serving (see the module docstring)."""

    seen: list[list[tuple[tuple[int, int], str, tuple[int, ...]]]]  # per call: (size, mode, first pixel)

    @property
    def takes_images(self) -> bool:
        return True

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        flat = [
            dict(message)
            | {"content": "".join(p["text"] if p["type"] == "text" else "<image>" for p in message["content"])}
            if isinstance(message.get("content"), list)
            else message
            for message in messages
        ]
        return super().render_chat(flat, tools, template_kwargs)

    def encode_images(self, prompt: str, images: Sequence[Any]) -> tuple[list[int], ImageInputs]:
        pieces = prompt.split("<image>")
        assert len(pieces) == len(images) + 1, "one placeholder per image"
        ids: list[int] = []
        spans = []
        for index, piece in enumerate(pieces):
            ids += self.encode(piece)
            if index < len(images):
                spans.append((len(ids), len(ids) + TOKENS_PER_IMAGE))
                ids += self.encode("#") * TOKENS_PER_IMAGE
        pictures: list[Image.Image] = list(images)
        self.seen.append([(image.size, image.mode, tuple(image.getpixel((0, 0)))) for image in pictures])
        digests = tuple(hashlib.sha256(image.tobytes()).hexdigest() for image in pictures)
        return ids, ImageInputs(features={}, digests=digests, spans=tuple(spans))


def with_image_tokenizer(runner: TransformersRunner) -> TransformersRunner:
    """``runner`` (the demo's) with its tokenizer seen as a vision model's (`ImageTokenizer`)."""
    tokenizer = ImageTokenizer(runner.tokenizer.hf)
    tokenizer.seen = []
    runner._tokenizer = tokenizer
    return runner


def _load(settings: Settings) -> TransformersRunner:
    return with_image_tokenizer(_load_demo_runner(settings))


if __name__ == "__main__":
    cli.load_runner = _load  # type: ignore[assignment]  # build_app's default factory looks it up there
    sys.exit(cli.main())
