"""What a batch's logits go through before the draw (`sampling` runs it): steps 1-5 of its pipeline.

Penalties (repetition over prompt and output, presence and frequency over the output), logit bias,
min_tokens' EOS hold and the grammar's bitmask (`penalise`), then the sampled rows' top-k, top-p and
min-p cuts (`filter_candidates`). Every function works on all rows of a `sampling.Plan` at once, on the logits'
device; the plan says which rows need which step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy
import torch

if TYPE_CHECKING:  # the plan is built by `sampling`, which calls these
    from trioserve.model.sampling import Plan


def unpack_bitmask(bitmask: torch.Tensor, size: int) -> torch.Tensor:
    """Booleans ``[rows, size]`` from llguidance's int32 bitmask ``[rows, words]`` (token *i* at bit
    ``i % 32`` of word ``i // 32``); entries past the mask's end are False."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1).bool()
    if bits.shape[1] < size:
        return torch.nn.functional.pad(bits, (0, size - bits.shape[1]))
    return bits[:, :size]


def take(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` of ``tensor`` (a copy), or ``tensor`` itself when ``index`` is None (all rows)."""
    return tensor if index is None else tensor.index_select(0, index)


def put(tensor: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor) -> None:
    """Writes back what `take` gave."""
    if index is not None:
        tensor.index_copy_(0, index, rows)
    elif rows is not tensor:
        tensor.copy_(rows)


def int32(pattern: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    pattern &= 0xFFFFFFFF
    return pattern - (1 << 32) if pattern >= 1 << 31 else pattern


def penalise(logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Steps 1-4 on a float32 copy of the logits: penalties, bias, min_tokens and the grammar's mask. With
    none to apply, the logits as they are (float32): later steps only read what this returns."""
    if not plan.penalises:
        return logits[:, : plan.vocab].float()
    scores = logits[:, : plan.vocab].to(torch.float32, copy=True)
    samplers = plan.samplers
    if plan.repeat:
        plan.seen = torch.stack([s for i in plan.repeat if (s := samplers[i].seen) is not None])
        index, penalty = plan.index.get("repeat"), plan.float["repetition"].unsqueeze(1)
        rows = take(scores, index)
        put(scores, index, torch.where(plan.seen, torch.where(rows < 0, rows * penalty, rows / penalty), rows))
    if plan.count:
        plan.counts = torch.stack([c for i in plan.count if (c := samplers[i].counts) is not None])
        index = plan.index.get("count")
        rows = take(scores, index)
        rows = rows - plan.float["frequency"].unsqueeze(1) * plan.counts
        rows = rows - plan.float["presence"].unsqueeze(1) * (plan.counts > 0).to(rows.dtype)
        put(scores, index, rows)
    if plan.has_bias:
        where = (plan.int["bias_rows"], plan.int["bias_ids"])  # distinct pairs: no accumulating put needed
        scores.index_put_(where, scores[where] + plan.float["bias"])
    if plan.has_no_eos:
        minus_inf = torch.full((), float("-inf"), device=plan.device)
        scores.index_put_((plan.int["no_eos_rows"], plan.int["no_eos_ids"]), minus_inf)
    if plan.bitmask is not None:
        index = plan.index.get("guided")
        allowed = unpack_bitmask(plan.bitmask.to(plan.device, non_blocking=True), plan.vocab)
        put(scores, index, take(scores, index).masked_fill_(~allowed, float("-inf")))
    return scores


def filter_candidates(scores: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Step 5 for the sampled rows: their scores, -inf outside the candidates that top-k, then top-p, then
    min-p leave (ties with the last candidate stay). Not yet divided by the temperature: `noise.draw` does
    that, block by block; here only top-p's softmax and min-p's floor need it."""
    rows = take(scores, plan.index.get("sampled"))  # maybe the caller's logits: replaced, never written
    for cut in plan.cuts:
        index = plan.index.get(cut.name)
        part = take(rows, index)
        if cut.width < plan.vocab:  # ranked: top-k, then top-p among the k best
            best = part.topk(cut.width, dim=1).values
            kth = best.gather(1, plan.int["top_k"].unsqueeze(1) - 1)
            part = part.masked_fill(part < kth, float("-inf"))
            best = best.masked_fill(best < kth, float("-inf"))
        else:
            best = sorted_descending(part)
        if cut.top_p:  # keep a token while the tokens before it hold less than top_p of the mass
            probs = (best / plan.float[f"{cut.name}_temperature"].unsqueeze(1)).softmax(dim=1)
            top_p = plan.float[f"{cut.name}_top_p"].unsqueeze(1)
            keep = (probs.cumsum(dim=1) - probs < top_p) & (best > float("-inf"))
            last = best.gather(1, (keep.sum(dim=1, keepdim=True) - 1).clamp(min=0))
            part = part.masked_fill(part < last, float("-inf"))
        rows = part if index is None else rows.index_copy(0, index, part)
    if plan.min_p:  # p < min_p * p_max  <=>  s / T < max / T + log(min_p); min_p = 0: -inf, a no-op
        floor = rows.amax(dim=1, keepdim=True) + (plan.float["temperature"] * plan.float["min_p"].log()).unsqueeze(1)
        rows = rows.masked_fill(rows < floor, float("-inf"))
    return rows


def sorted_descending(rows: torch.Tensor) -> torch.Tensor:
    """Each row's values, largest first. On the CPU numpy's SIMD sort does it (1 ms for 11 x 32k values
    here, against 60 ms for ``torch.sort``, which also computes the indices)."""
    if rows.device.type == "cpu":
        return torch.from_numpy(-numpy.sort(-rows.numpy(), axis=1))
    return rows.sort(dim=1, descending=True).values
