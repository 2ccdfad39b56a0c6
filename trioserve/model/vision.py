"""What the runner does differently for a prompt with images: which features a prefill pass takes, the
positions of models with multi-axis rotary embeddings, and the prefix-cache key of a prompt with images.

The rules that keep every result exact:

- A prompt's images go through the vision encoder in the pass that prefills their tokens, and that pass
  holds all of them that are not cached: no chunk ends inside or between images (the scheduler plans the
  first chunk past the last image). A prefix-cache hit never ends inside an image, and ends between two
  only where the later images' features can be passed alone (`image_subset`; else it stops before the
  first image, see `usable_hit`).
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
    """The features a prefill pass over ``prompt[start:end]`` takes: those of the images in it (floating ones in
    the model's dtype, per-token ones sliced to the pass), none if every image lies before it.

    Raises:
        AssertionError: the pass holds part of an image, or leaves one after it (the scheduler and
            `usable_hit` prevent both).
    """
    if images is None or not images.spans:
        return {}
    kept = [i for i, (_, span_end) in enumerate(images.spans) if span_end > start]
    if not kept:
        return {}
    assert start <= images.spans[kept[0]][0] and images.spans[-1][1] <= end, (
        f"a pass over [{start}, {end}) splits images at {images.spans}"
    )
    selected = images.features
    if len(kept) < len(images.spans):
        subset = image_subset(images.features, len(images.spans), kept)
        assert subset is not None, "a cache hit ended between images whose features cannot be told apart"
        selected = subset
    features: dict[str, Any] = {}
    for key, value in selected.items():
        if not isinstance(value, torch.Tensor):
            features[key] = value
            continue
        if key in _PER_TOKEN and value.shape[-1] == prompt_length:
            value = value[..., start:end]
        target = dtype if value.is_floating_point() else value.dtype
        features[key] = value.to(device=device, dtype=target)
    return features


def image_subset(features: Mapping[str, Any], images: int, kept: Sequence[int]) -> dict[str, Any] | None:
    """The features of the images ``kept`` (indices, in order) alone, for the layouts whose images can be told
    apart; None for any other (the prompt's hits then stop before its first image).

    Layouts: patches of all images in one sequence with a grid per image (``image_grid_thw``: Qwen2-VL,
    PaddleOCR-VL), or one ``pixel_values`` row per image (LLaVA, Gemma 3; Mistral3 with ``image_sizes``).
    Per-token features stay whole (`pass_features` slices them).
    """
    pixels = features.get("pixel_values")
    if not isinstance(pixels, torch.Tensor):
        return None
    index = torch.tensor(list(kept), dtype=torch.long)
    subset = dict(features)
    grid = features.get("image_grid_thw")
    if isinstance(grid, torch.Tensor):
        if grid.shape[0] != images or set(features) - {"pixel_values", "image_grid_thw", *_PER_TOKEN}:
            return None
        sizes = grid.prod(dim=-1).tolist()
        if sum(sizes) != pixels.shape[0]:
            return None
        starts = [sum(sizes[:i]) for i in range(images)]
        subset["pixel_values"] = torch.cat([pixels[starts[i] : starts[i] + sizes[i]] for i in kept])
        subset["image_grid_thw"] = grid[index]
        return subset
    if pixels.ndim != 4 or pixels.shape[0] != images:
        return None
    per_image = {"pixel_values", "image_sizes"}
    if set(features) - per_image - _PER_TOKEN:
        return None
    for key in per_image & set(features):
        value = features[key]
        if not isinstance(value, torch.Tensor) or value.shape[0] != images:
            return None
        subset[key] = value[index]
    return subset


def usable_hit(length: int, images: ImageInputs | None) -> int:
    """The longest part of a cached prefix of ``length`` tokens a prompt can start from: never inside an image;
    between two images only where the features of the images after it can be passed alone (`image_subset`),
    else before the first image."""
    if images is None or not images.spans:
        return length
    first, last = images.spans[0][0], images.spans[-1][1]
    if length <= first or length >= last:
        return length
    splittable = len(images.spans) == len(images.digests) and (
        image_subset(images.features, len(images.spans), [len(images.spans) - 1]) is not None
    )
    if not splittable:
        return first
    for start, end in images.spans:
        if start < length < end:
            return start
    return length


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
