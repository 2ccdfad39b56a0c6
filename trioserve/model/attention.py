"""How a transformers model attends over the KV arena during decode, through its own attention interface.

`use_arena_attention` registers ``trioserve_<base>`` (base: the model's attention: ``sdpa``, ``eager`` or
flash-attention) with transformers' `AttentionInterface` and switches the model to it. Prefill passes are
untouched: without our keyword the wrapper hands every call to the base implementation, with the mask
transformers built. A decode pass passes `DecodeMasks` as the keyword ``trioserve_masks``; transformers
hands unknown keywords down to each attention call, and the wrapper then swaps in the mask of each row's
valid prefix, sliding windows included, built on the device from per-row positions, and runs SDPA (eager
attention for eager models: their softcapping and sinks live there; flash-attention takes no arbitrary
mask, so its models decode with SDPA). A model that does not hand the keyword down gets, in every layer, the
4-D mask the decode pass gave the model (no sliding window): the load-time probe counts the calls that
received the keyword, accepts none only where no layer has a window, and checks the logits either way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

MASKS_KWARG = "trioserve_masks"
PREFIX = "trioserve_"
BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


class DecodeMasks:
    """The attention masks of one decode pass: row ``b`` sees columns ``[0, positions[b]]`` (its tokens so far
    and the one written this pass), within the layer's sliding window if it has one.

    Built lazily, once per window size per pass, from tensors whose addresses do not change, so the
    construction is captured with the rest of the pass in a CUDA graph. Boolean masks for SDPA (True: attend),
    additive ones for eager attention.
    """

    def __init__(self, positions: torch.Tensor, columns: int, windows: list[int | None], *, additive: bool) -> None:
        self._positions = positions[:, None]  # [rows, 1]
        self._columns = torch.arange(columns, device=positions.device)[None, :]
        self._windows = windows  # per layer
        self._additive = additive
        self._built: dict[tuple[int | None, torch.dtype], torch.Tensor] = {}
        self.calls = 0  # attention calls that used these masks (the runner's probe checks every layer did)

    def for_layer(self, layer_idx: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The mask of layer ``layer_idx`` (None: no window), for queries of ``dtype``."""
        self.calls += 1
        window = self._windows[layer_idx] if layer_idx is not None else None
        return self.mask(window, dtype)

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        key = (window, dtype)
        if key not in self._built:
            allowed = self._columns <= self._positions
            if window is not None:
                allowed = allowed & (self._columns > self._positions - window)
            mask = allowed[:, None, None, :]  # [rows, 1, 1, columns]
            if self._additive:
                zero = torch.zeros((), dtype=dtype, device=mask.device)
                mask = torch.where(mask, zero, torch.finfo(dtype).min)
            self._built[key] = mask
        return self._built[key]


AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _eager_of(module: torch.nn.Module) -> AttentionFunction:
    """The model's own eager attention (transformers keeps one per modeling file: softcapping and sinks live
    there), found next to the attention module's class."""
    function: AttentionFunction = sys.modules[type(module).__module__].eager_attention_forward
    return function


def _wrapper(base: str) -> AttentionFunction:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        masks: DecodeMasks | None = kwargs.pop(MASKS_KWARG, None)
        if masks is not None:
            attention_mask = masks.for_layer(getattr(module, "layer_idx", None), query.dtype)
            function = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            function = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return function(module, query, key, value, attention_mask, **kwargs)

    return attention


def use_arena_attention(model: Any) -> str | None:
    """Switches ``model`` to the arena-aware wrapper of the attention it uses now, and returns that base
    attention (``sdpa``, ``eager``...); None, model unchanged, when it is something else (flex attention, a
    hub kernel): such models keep their own caches. Idempotent (several runners may share one model)."""
    current = model.config._attn_implementation
    base = current.removeprefix(PREFIX)
    if base not in BASES:
        return None
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    if not model._can_set_attn_implementation():
        return None  # its modeling code does not go through the attention interface (Bloom, Falcon...)
    _set_attention(model, name)
    return str(base)


def use_plain_attention(model: Any) -> None:
    """Undoes `use_arena_attention`."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        _set_attention(model, current.removeprefix(PREFIX))


def _set_attention(model: Any, name: str) -> None:
    """Names the attention implementation on the configs the attention layers read (the model's, and its text
    model's when nested). Not `model.set_attn_implementation`: besides validating, it re-dispatches the
    model, after which its prefill passes ran ~15% slower on the CPU (2-thread torch, transformers 5.24;
    measured on a grouped prefill of 10 prompts), for no reason we could see."""
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config._attn_implementation = name
