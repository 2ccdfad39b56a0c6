"""Setting up arena mode at load: allocate the KV arena, check on a probe prompt that a decode pass through it
gives the logits the model's own cache gives, and capture the decode pass as CUDA graphs where there is CUDA.

A model that cannot decode from the arena (cache layers that are not plain attention, an attention
implementation that bypasses transformers' interface, a probe that disagrees) keeps its own caches and is
decoded one sequence per pass; the returned mode says why, for the startup log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from trioserve.model.arena import KVArena, arena_layers
from trioserve.model.attention import use_arena_attention, use_plain_attention
from trioserve.model.decode import DecodeStep

logger = logging.getLogger(__name__)

Forward = Callable[..., torch.Tensor]  # (cache, **inputs) -> last-position logits, counting the pass


@torch.inference_mode()
def set_up_arena(
    model: PreTrainedModel,
    forward: Forward,
    *,
    slots: int,
    max_len: int,
    cache_slots: int,
    cache_kwarg: str,
    cuda_graphs: bool,
) -> tuple[KVArena | None, DecodeStep | None, str]:
    """The arena, its decode pass, and how sequences are decoded (for the startup log); no arena when the model
    cannot decode from one."""
    device = model.device
    probe = DynamicCache(config=model.config)
    ids = torch.tensor([[1, 2, 3]], device=device)
    forward(probe, input_ids=ids[:, :2], position_ids=torch.tensor([[0, 1]], device=device))
    layers = arena_layers(probe)
    if layers is None:
        kinds = sorted({type(layer).__name__ for layer in probe.layers})
        return None, None, f"one sequence per pass: its cache layers ({', '.join(kinds)}) are not plain attention"
    base = use_arena_attention(model)
    if base is None:
        name = model.config._attn_implementation
        return None, None, f"one sequence per pass: attention implementation {name!r} cannot decode from the arena"
    dtype = next(model.parameters()).dtype
    try:
        arena = KVArena(
            layers,
            slots=slots,
            max_len=max_len,
            dtype=dtype,
            device=device,
            cache_slots=cache_slots,
        )
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(
            f"the KV arena ({slots} slots x {max_len} tokens) does not fit: lower --max-concurrent "
            f"or --max-model-len ({exc})"
        ) from exc
    decode_step = DecodeStep(model, arena, cache_kwarg=cache_kwarg, additive_masks=base == "eager")
    slot = arena.acquire()
    arena.store(slot, probe, 0, 2)
    expected = forward(probe, input_ids=ids[:, 2:], position_ids=torch.tensor([[2]], device=device))
    got = decode_step.run([slot], [3], [2])[0]
    arena.release(slot)
    scale = float(expected.abs().max())
    agrees = bool(torch.allclose(got, expected[0].float(), rtol=2e-2, atol=2e-2 * scale))
    if decode_step.masks_seen != len(layers) or not agrees:
        use_plain_attention(model)
        return None, None, "one sequence per pass: its attention layers do not decode correctly from the arena"
    if cuda_graphs and device.type == "cuda":
        try:
            decode_step.capture()
            # The probe again, now replayed: a capture that missed an input buffer shows here.
            replayed = decode_step.run([slot], [3], [2])[0]
            if not torch.allclose(replayed, got, rtol=1e-3, atol=1e-3 * scale):
                raise RuntimeError("a replay of the captured decode pass disagrees with the eager pass")
        except Exception:  # the model still serves, eagerly: slower, never wrong
            logger.exception("capturing the decode pass as CUDA graphs failed; decoding eagerly")
            decode_step.drop_graphs()
    gib = arena.nbytes / 2**30
    graphs = "CUDA graphs" if decode_step.captured else "eager"
    extra = f" (+{cache_slots} prefix-cache-only)" if cache_slots else ""
    mode = f"up to {slots} sequences per pass ({graphs}); KV arena {slots}{extra} x {max_len} tokens, {gib:.2f} GiB"
    return arena, decode_step, mode
