"""Setting up arena mode at load: allocate the KV arena, check on two probe prompts that a decode pass through
it gives the logits the model's own cache gives, and capture the decode pass as CUDA graphs where there is CUDA.

The probe decodes two prompts of different lengths in one pass, with noise in the columns the shorter row
must not see, so a mask that does not reach attention shows as a disagreement. The masks reach a layer in one
of two ways: as our keyword through transformers' attention interface (per layer, sliding windows included),
or, for models whose decoder layers drop keywords (StableLM, Falcon), as the 4-D ``attention_mask`` of the
pass, each row's causal prefix with no window. The second is accepted only when no layer has a window.

A model that cannot decode from the arena (cache layers that are not plain attention, an attention
implementation that bypasses transformers' interface, a probe that disagrees, any exception on the way)
keeps its own caches and is decoded one sequence per pass; the returned mode says why, for the startup log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

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
    cannot decode from one.

    Any exception while probing the model, building the arena or checking it (a cache layout the arena does not
    expect, a modeling file that rejects its masks...) means the model keeps its own caches: it still serves,
    one sequence per pass, and the mode names the error. Only running out of device memory is raised: an arena
    too large is the settings' fault, and the error names the flags that size it.

    Raises:
        torch.OutOfMemoryError: the arena (or the probe) does not fit.
    """
    try:
        return _set_up(
            model,
            forward,
            slots=slots,
            max_len=max_len,
            cache_slots=cache_slots,
            cache_kwarg=cache_kwarg,
            cuda_graphs=cuda_graphs,
        )
    except torch.OutOfMemoryError:
        use_plain_attention(model)
        raise
    except Exception as exc:
        use_plain_attention(model)
        logger.warning("setting up the KV arena failed; decoding one sequence per pass", exc_info=True)
        return None, None, f"one sequence per pass: setting up the KV arena failed ({type(exc).__name__}: {exc})"


# The probe: two prompts, decoded together in slots 0 and 1 with different lengths, so the shorter row has
# columns it must not see (filled with noise first: a row that attends to them disagrees).
_PROBE: tuple[tuple[int, ...], ...] = ((1, 2, 3, 4, 5), (6, 7, 8))


def _set_up(
    model: PreTrainedModel,
    forward: Forward,
    *,
    slots: int,
    max_len: int,
    cache_slots: int,
    cache_kwarg: str,
    cuda_graphs: bool,
) -> tuple[KVArena | None, DecodeStep | None, str]:
    device = model.device
    caches = []
    for prompt in _PROBE:
        caches.append(DynamicCache(config=model.config))
        forward(caches[-1], input_ids=_ids(prompt[:-1], device), position_ids=_ids(range(len(prompt) - 1), device))
    layers = arena_layers(caches[0])
    if layers is None:
        kinds = sorted({type(layer).__name__ for layer in caches[0].layers})
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
    probe_slots = [arena.acquire() for _ in _PROBE]
    expected = []
    for slot, cache, prompt in zip(probe_slots, caches, _PROBE, strict=True):
        for tensor in (*arena.keys, *arena.values):
            tensor[slot].normal_()
        arena.store(slot, cache, 0, len(prompt) - 1)
        # The model's own next step from its own cache: what own-cache mode would compute.
        position = _ids([len(prompt) - 1], device)
        expected.append(forward(cache, input_ids=_ids(prompt[-1:], device), position_ids=position)[0].float())
    got = decode_step.run(probe_slots, [p[-1] for p in _PROBE], [len(p) - 1 for p in _PROBE]).clone()
    scale = max(float(e.abs().max()) for e in expected)
    agrees = all(torch.allclose(row, e, rtol=2e-2, atol=2e-2 * scale) for row, e in zip(got, expected, strict=True))
    # The masks reach every layer through its attention call, or (a decoder layer that drops the keyword:
    # StableLM, Falcon) through the 4-D mask the decode pass hands the model, which is every row's causal mask
    # without a window: right for such models only when no layer has one.
    windows = any(shape.sliding_window is not None for shape in layers)
    masked = decode_step.masks_seen == len(layers) or (decode_step.masks_seen == 0 and not windows)
    if not masked or not agrees:
        use_plain_attention(model)
        return None, None, "one sequence per pass: its attention layers do not decode correctly from the arena"
    if cuda_graphs and device.type == "cuda":
        try:
            decode_step.capture()
            # The probe again, now replayed: a capture that missed an input buffer shows here.
            replayed = decode_step.run(probe_slots, [p[-1] for p in _PROBE], [len(p) - 1 for p in _PROBE])
            if not torch.allclose(replayed, got, rtol=1e-3, atol=1e-3 * scale):
                raise RuntimeError("a replay of the captured decode pass disagrees with the eager pass")
        except Exception:  # the model still serves, eagerly: slower, never wrong
            logger.exception("capturing the decode pass as CUDA graphs failed; decoding eagerly")
            decode_step.drop_graphs()
    for slot in probe_slots:
        for tensor in (*arena.keys, *arena.values):
            tensor[slot].zero_()  # padding rows attend to column 0 of free slots: keep them plain zeros
        arena.release(slot)
    gib = arena.nbytes / 2**30
    graphs = "CUDA graphs" if decode_step.captured else "eager"
    extra = f" (+{cache_slots} prefix-cache-only)" if cache_slots else ""
    mode = f"up to {slots} sequences per pass ({graphs}); KV arena {slots}{extra} x {max_len} tokens, {gib:.2f} GiB"
    return arena, decode_step, mode


def _ids(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """One row of token ids or positions."""
    return torch.tensor([list(values)], device=device)
