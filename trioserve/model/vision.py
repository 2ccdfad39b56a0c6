"""What the runner does differently for a prompt with images: which features a prefill pass takes, the
positions of models with multi-axis rotary embeddings, and the prefix-cache key of a prompt with images.

The rules that keep every result exact:

- A prompt's images go through the vision encoder in the pass that prefills their tokens, and that pass
  holds all of them: no chunk ends inside or between images (the scheduler plans the first chunk past the
  last image; a prefix-cache hit ends before the first image or after the last, see `usable_hit`).
- Multi-axis rotary positions (Qwen2-VL, Qwen2.5-VL, PaddleOCR-VL: the model has ``get_rope_index``) are
  computed once for the whole prompt, from the token ids and the image grids, and sliced per chunk; after
  the prompt, a sequence's position is its token index plus a per-sequence offset (``rope_delta``), which
  decode passes add.
- The prefix cache keys a prompt by its token ids with each image's tokens replaced by negative values drawn
  from that image's digest: two prompts differing only in an image share nothing past it, and text that
  spells an image placeholder (positive ids) never matches an image's KV.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy
import torch
from transformers import PreTrainedModel

from trioserve.types import ImageInputs

# Features with one value per prompt token: sliced to the pass's tokens, unlike the images' own features.
_PER_TOKEN = frozenset({"token_type_ids", "mm_token_type_ids"})


def rope_indexer(model: PreTrainedModel) -> Any:
    """The model's ``get_rope_index`` where its rotary positions have several axes; None otherwise."""
    inner = getattr(model, "model", None)
    return getattr(inner, "get_rope_index", None)


def rope_positions(indexer: Any, prompt: Sequence[int], images: ImageInputs | None) -> tuple[torch.Tensor, int] | None:
    """The whole prompt's multi-axis positions ([axes, 1, len(prompt)], on the CPU) and the offset of every
    later position from its token index; None for a prompt without images (its positions are the token
    index on every axis)."""
    if images is None or not images.spans:
        return None
    accepted = inspect.signature(indexer).parameters
    kwargs = {key: value for key, value in images.features.items() if key in accepted}
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.inference_mode():
        positions, deltas = indexer(input_ids=ids, **{k: v.cpu() for k, v in kwargs.items()})
    return positions, int(deltas.reshape(-1)[0])


def pass_features(
    images: ImageInputs | None, start: int, end: int, prompt_length: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """The features a prefill pass over ``prompt[start:end]`` takes: all of them if it holds the images (floating
    ones in the model's dtype, per-token ones sliced to the pass), none if the images lie before it.

    Raises:
        AssertionError: the pass holds only part of the images (the scheduler and `usable_hit` prevent it).
    """
    if images is None or not images.spans:
        return {}
    first, last = images.spans[0][0], images.spans[-1][1]
    if last <= start:
        return {}
    assert start <= first and last <= end, f"a pass over [{start}, {end}) splits images at {images.spans}"
    features: dict[str, Any] = {}
    for key, value in images.features.items():
        if not isinstance(value, torch.Tensor):
            features[key] = value
            continue
        if key in _PER_TOKEN and value.shape[-1] == prompt_length:
            value = value[..., start:end]
        target = dtype if value.is_floating_point() else value.dtype
        features[key] = value.to(device=device, dtype=target)
    return features


def usable_hit(length: int, images: ImageInputs | None) -> int:
    """The longest part of a cached prefix of ``length`` tokens a prompt can start from: all of it when it ends
    before the first image or after the last, else up to the first image (whose pass then holds them all)."""
    if images is None or not images.spans:
        return length
    first, last = images.spans[0][0], images.spans[-1][1]
    return length if length <= first or length >= last else first


def cache_key(prompt: Sequence[int], images: ImageInputs | None) -> numpy.ndarray:
    """The prompt as the prefix cache sees it: its ids, each image's tokens replaced by values drawn from the
    image's digest (negative, so no text token ever equals one). A span that covers several images (see
    `trioserve.text.processor.image_spans`) is drawn from all their digests."""
    key = numpy.asarray(prompt, dtype=numpy.int64)
    if images is None or not images.spans:
        return key
    key = key.copy()
    digests = _span_digests(images.digests, len(images.spans))
    for (start, end), digest in zip(images.spans, digests, strict=True):
        key[start:end] = _digest_values(digest, end - start)
    return key


def _span_digests(digests: Sequence[str], spans: int) -> list[str]:
    if spans == len(digests):
        return list(digests)
    return ["+".join(digests)] * spans


def _digest_values(digest: str, count: int) -> numpy.ndarray:
    """``count`` negative int64 values determined by ``digest`` (so a span's key depends on position too)."""
    stream = b""
    block = 0
    while len(stream) < 8 * count:
        stream += hashlib.sha256(f"{digest}:{block}".encode()).digest()
        block += 1
    values = numpy.frombuffer(stream[: 8 * count], dtype=numpy.uint64) >> numpy.uint64(1)
    return -(values.astype(numpy.int64)) - 1


def feature_bytes(features: Mapping[str, Any]) -> int:
    """The bytes a request's image features take (for logs and limits)."""
    return sum(v.numel() * v.element_size() for v in features.values() if isinstance(v, torch.Tensor))
