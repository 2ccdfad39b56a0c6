"""Choosing the next token for each row of a batch, each row with its own parameters and generator.

Order of processing (as in Hugging Face's `generate` and vLLM): repetition penalty over prompt and output,
OpenAI presence/frequency penalties over the output, logit bias, the grammar's mask (``response_format``),
then temperature, top-k, top-p and min-p.
Randomness comes only from each sequence's own `torch.Generator`, so a seeded request gives the same tokens
whatever else is in its batch, and nothing touches the global RNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from trioserve.types import SampledToken, SamplingParams

if TYPE_CHECKING:  # the runner builds guides; sampling only calls them
    from trioserve.guided import Guide

_BITS = torch.arange(8, dtype=torch.uint8)


def unpack_mask(mask: bytes, size: int) -> torch.Tensor:
    """A boolean tensor of ``size`` entries from a little-endian bitmask (token *i* at bit ``i % 8`` of byte
    ``i // 8``); entries past the mask's end are False."""
    packed = torch.frombuffer(bytearray(mask) or bytearray(1), dtype=torch.uint8)  # frombuffer refuses b""
    bits = ((packed.unsqueeze(1) >> _BITS) & 1).flatten().bool()
    if bits.numel() < size:
        return torch.nn.functional.pad(bits, (0, size - bits.numel()))
    return bits[:size]


class SequenceSampler:
    """Sampling state of one sequence: its parameters, generator and the token counts penalties need."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        guide: Guide | None = None,
    ):
        self.params = params
        self.guide = guide
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # Generators live on the CPU: sampling draws one uniform vector per row, a cost too small to move.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self._vocab_size = vocab_size
        self._device = device
        self.generated = 0
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
            values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
            self._bias = ids, values
        # Nothing to apply: `process` can hand back the row as it is, without a copy.
        self._plain = (
            self._seen is None and self._counts is None and self._bias is None and params.min_tokens == 0
        ) and guide is None

    def record(self, token_id: int) -> None:
        self.generated += 1
        if self._seen is not None:
            self._seen[token_id] = True
        if self._counts is not None:
            self._counts[token_id] += 1
        if self.guide is not None:
            self.guide.advance(token_id)

    def process(self, logits: torch.Tensor, eos_token_ids: frozenset[int]) -> torch.Tensor:
        """Applies penalties and biases to one row of float32 logits (a copy; the row itself if none apply)."""
        params = self.params
        logits = logits[: self._vocab_size]
        if self._plain:
            return logits
        logits = logits.clone()
        if self._seen is not None:
            penalty = params.repetition_penalty
            seen = logits[self._seen]
            logits[self._seen] = torch.where(seen < 0, seen * penalty, seen / penalty)
        if self._counts is not None:
            logits -= params.frequency_penalty * self._counts
            logits -= params.presence_penalty * (self._counts > 0).to(logits.dtype)
        if self._bias is not None:
            ids, values = self._bias
            logits.index_add_(0, ids, values.to(logits.dtype))
        allowed = None if self.guide is None else unpack_mask(self.guide.allowed(), logits.numel())
        if self.generated < params.min_tokens and eos_token_ids:
            eos = list(eos_token_ids)
            if allowed is None:
                logits[eos] = float("-inf")
            else:
                # min_tokens holds EOS back only while the grammar allows something else.
                without_eos = allowed.clone()
                without_eos[eos] = False
                allowed = without_eos if bool(without_eos.any()) else allowed
        if allowed is not None:
            logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
        return logits


def _truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of one row (already penalised)."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def sample_rows(
    logits: torch.Tensor, samplers: Sequence[SequenceSampler], eos_token_ids: frozenset[int]
) -> list[SampledToken]:
    """Picks one token for each row of ``logits`` ([rows, vocab]) and records it in its sampler."""
    logits = logits.float()
    results = []
    for row, sampler in enumerate(samplers):
        params = sampler.params
        processed = sampler.process(logits[row], eos_token_ids)
        if params.greedy:
            token_id = int(torch.argmax(processed))
        else:
            probs = torch.softmax(_truncate(processed, params), dim=-1).cpu()
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one generator call per row.
            noise = torch.empty_like(probs).exponential_(generator=sampler.generator)
            token_id = int(torch.argmax(probs / noise))
        sampler.record(token_id)
        if params.logprobs is None:  # the common case: no full-vocabulary log-softmax per token
            results.append(SampledToken(token_id))
            continue
        row_logprobs = torch.log_softmax(logits[row], dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if params.logprobs:
            values, ids = torch.topk(row_logprobs, params.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        results.append(SampledToken(token_id, float(row_logprobs[token_id]), top))
    return results
