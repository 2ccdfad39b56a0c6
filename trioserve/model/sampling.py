"""Choosing the next token of every row of a batch: one batched pass on the logits' device, one copy back.

`sample_rows` takes the logits of a forward pass ([rows, vocab]) and each row's `SequenceSampler`, and
runs, over all rows at once, each row with its own parameters (the order of Hugging Face's `generate` and
vLLM):

1. repetition penalty over prompt and output (HF: a seen token's positive logit is divided, a negative one
   multiplied);
2. OpenAI presence and frequency penalties over the output;
3. logit bias;
4. the grammar's mask (``response_format``; llguidance fills one ``[rows, vocab / 32]`` bitmask), and
   min_tokens holding EOS back (while the grammar allows something else);
5. greedy rows take the argmax here. Sampled rows go on: top-k, then top-p, then min-p (each on the
   distribution at the row's temperature) set what is outside the row's candidates to -inf, and the
   token is ``argmax(scores / temperature + Gumbel noise)`` (`noise.draw`): the exponential race
   ``argmax(p / E)`` in log space, an exact draw from the filtered distribution.

A step runs only on the rows that need it (gathered by index), so a batch of plain greedy rows costs one
argmax. Per-sequence state lives on the device: a ``[vocab]`` seen-mask and counts where penalties ask for
them, stacked into ``[rows, vocab]`` for the step and updated there with the sampled tokens. Parameters go
up as two small tensors (`_Upload`); exactly one device-to-host copy comes back (`_to_host`): the token
ids, plus the chosen and top logprobs of the rows that asked, which are those of the model's raw
distribution (before penalties and masks).

Noise is counter-based: the uniform for vocabulary entry ``v`` of a sequence's ``i``-th token is a
SplitMix64 hash of (seed, i, v), computed on the device in int64 arithmetic. A seeded sequence therefore
draws the same tokens whatever else is in the batch and wherever its row is; an unseeded one gets a
random seed at creation; nothing touches torch's global RNG.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trioserve.model import noise
from trioserve.model.logits import filter_candidates, int32, penalise, take
from trioserve.types import SampledToken, SamplingParams

if TYPE_CHECKING:  # the runner builds guides; sampling only calls them
    from trioserve.text.guided import Guide


class SequenceSampler:
    """Sampling state of one sequence: its parameters, seed, guide, and the device tensors penalties need.

    ``generated`` counts the tokens sampled so far: it is the index of the next token's noise and what
    min_tokens compares against.
    """

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
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.vocab_size = vocab_size
        self.generated = 0
        # Penalty state, [vocab] on the device; `sample_rows` replaces these with rows of its stacked copy.
        self.seen: torch.Tensor | None = None  # prompt and output tokens (repetition penalty)
        self.counts: torch.Tensor | None = None  # output token counts (presence/frequency penalties)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.bias = [(int(i), float(v)) for i, v in params.logit_bias.items() if 0 <= int(i) < vocab_size]
        # Nothing to apply before the argmax or the filters: no penalty, bias, mask or EOS rule.
        self.plain = self.seen is None and self.counts is None and not self.bias and guide is None
        self.plain = self.plain and params.min_tokens == 0


class _Upload:
    """Host values of one call, sent to the device as one int64 and one float32 tensor, then sliced."""

    def __init__(self) -> None:
        self._ints: list[int] = []
        self._floats: list[float] = []

    def ints(self, values: Iterable[int]) -> slice:
        start = len(self._ints)
        self._ints.extend(values)
        return slice(start, len(self._ints))

    def floats(self, values: Iterable[float]) -> slice:
        start = len(self._floats)
        self._floats.extend(values)
        return slice(start, len(self._floats))

    def send(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """At most two host-to-device copies, none for an empty list; from pinned memory to a GPU, so the
        host does not wait for them."""
        pin = device.type == "cuda"
        ints = torch.tensor(self._ints, dtype=torch.long)
        floats = torch.tensor(self._floats, dtype=torch.float32)
        return (
            (ints.pin_memory() if pin else ints).to(device, non_blocking=True) if self._ints else ints,
            (floats.pin_memory() if pin else floats).to(device, non_blocking=True) if self._floats else floats,
        )


@dataclass(frozen=True, slots=True)
class _Cut:
    """Sampled rows whose top-k/top-p threshold comes from one ``width``-wide ranking of their scores."""

    name: str
    rows: list[int]
    width: int
    top_p: bool


class Plan:
    """One call's work, sorted on the host: which rows need which step, and their parameters, uploaded.

    Row lists index the batch, except the cuts' which index the sampled rows. An index tensor is None
    where its list is every row it could hold, so the step works in place without a gather.
    """

    def __init__(
        self, logits: torch.Tensor, samplers: Sequence[SequenceSampler], eos_token_ids: frozenset[int]
    ) -> None:
        vocab = samplers[0].vocab_size
        if any(s.vocab_size != vocab for s in samplers) or logits.shape != (len(samplers), logits.shape[1]):
            raise ValueError("one sampler per row of logits, all for one vocabulary")
        if logits.shape[1] < vocab:
            raise ValueError(f"logits have {logits.shape[1]} columns for a vocabulary of {vocab}")
        self.vocab = vocab
        self.device = logits.device
        self.samplers = samplers
        self.rows = len(samplers)
        params = [s.params for s in samplers]
        self.greedy_only = all(p.greedy and s.plain for p, s in zip(params, samplers, strict=True))
        self.asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.top_logprobs = min(max((params[i].logprobs or 0 for i in self.asked), default=0), vocab)
        self.repeat = [i for i, s in enumerate(samplers) if s.seen is not None]
        self.count = [i for i, s in enumerate(samplers) if s.counts is not None]
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        sampled = [params[i] for i in self.sampled]
        # Top-k and top-p need each row's candidates in order: the k best where a row has a top-k
        # ("ranked"), else the whole row sorted ("sorted", top-p alone).
        ranked = [j for j, p in enumerate(sampled) if 0 < p.top_k < vocab]
        by_top_p = [j for j, p in enumerate(sampled) if p.top_p < 1.0 and not 0 < p.top_k < vocab]
        self.cuts = [
            _Cut(name, rows, width, top_p=any(sampled[j].top_p < 1.0 for j in rows))
            for name, rows, width in (
                ("ranked", ranked, max((sampled[j].top_k for j in ranked), default=0)),
                ("sorted", by_top_p, vocab),
            )
            if rows
        ]
        self.min_p = any(p.min_p > 0.0 for p in sampled)
        bias = [(i, token, value) for i, s in enumerate(samplers) for token, value in s.bias]
        # min_tokens: EOS held back by -inf, or, under a grammar, in the bitmask (`_grammar_mask`).
        holding = [i for i, s in enumerate(samplers) if s.generated < s.params.min_tokens and s.guide is None]
        no_eos = [(i, e) for i in holding for e in sorted(eos_token_ids) if e < vocab]
        self.guided = [i for i, s in enumerate(samplers) if s.guide is not None]
        self.bitmask = self._grammar_mask(eos_token_ids) if self.guided else None

        up = _Upload()
        index = {
            name: up.ints(rows)
            for name, rows, whole in (
                ("asked", self.asked, self.rows),
                ("repeat", self.repeat, self.rows),
                ("count", self.count, self.rows),
                ("sampled", self.sampled, self.rows),
                ("ranked", ranked, len(self.sampled)),
                ("sorted", by_top_p, len(self.sampled)),
                ("guided", self.guided, self.rows),
            )
            if len(rows) != whole
        }
        at = {
            "keys": up.ints(noise.key(samplers[i].seed, samplers[i].generated) for i in self.sampled),
            "top_k": up.ints(sampled[j].top_k for j in ranked),
            "bias_rows": up.ints(i for i, _, _ in bias),
            "bias_ids": up.ints(token for _, token, _ in bias),
            "no_eos_rows": up.ints(i for i, _ in no_eos),
            "no_eos_ids": up.ints(e for _, e in no_eos),
        }
        floats = {
            "repetition": up.floats(params[i].repetition_penalty for i in self.repeat),
            "presence": up.floats(params[i].presence_penalty for i in self.count),
            "frequency": up.floats(params[i].frequency_penalty for i in self.count),
            "bias": up.floats(value for _, _, value in bias),
            "temperature": up.floats(p.temperature for p in sampled),
            # 2.0: a top-p never reached, for ranked rows without one
            "ranked_top_p": up.floats(sampled[j].top_p if sampled[j].top_p < 1.0 else 2.0 for j in ranked),
            "sorted_top_p": up.floats(sampled[j].top_p for j in by_top_p),
            "ranked_temperature": up.floats(sampled[j].temperature for j in ranked),
            "sorted_temperature": up.floats(sampled[j].temperature for j in by_top_p),
            "min_p": up.floats(p.min_p for p in sampled),
        }
        ints, reals = up.send(self.device)
        self.index = {name: ints[where] for name, where in index.items()}
        self.int = {name: ints[where] for name, where in at.items()}
        self.float = {name: reals[where] for name, where in floats.items()}
        self.has_bias, self.has_no_eos = bool(bias), bool(no_eos)
        self.penalises = bool(self.repeat or self.count or bias or no_eos or self.guided)
        self.seen: torch.Tensor | None = None  # the stacked penalty state, updated after the draw
        self.counts: torch.Tensor | None = None

    def _grammar_mask(self, eos_token_ids: frozenset[int]) -> torch.Tensor:
        """The guided rows' bitmask, filled by their guides on the host; min_tokens clears EOS from a row
        only while something else stays allowed."""
        words = (self.vocab + 31) // 32
        bitmask = torch.zeros((len(self.guided), words), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        eos = [(e // 32, int32(~(1 << (e % 32)))) for e in sorted(eos_token_ids) if e < self.vocab]
        for row, i in enumerate(self.guided):
            sampler = self.samplers[i]
            assert sampler.guide is not None
            sampler.guide.fill_bitmask(bitmask, row)
            if sampler.generated < sampler.params.min_tokens and eos:
                without_eos = bitmask[row].clone()
                for word, keep in eos:
                    without_eos[word] &= keep
                if bool(without_eos.any()):  # a host tensor: no device transfer
                    bitmask[row] = without_eos
        return bitmask


def scores(
    logits: torch.Tensor, samplers: Sequence[SequenceSampler], eos_token_ids: frozenset[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `sample_rows` takes its argmax over, before the noise, without recording anything.

    Returns:
        The penalised, masked scores of every row ([rows, vocab]; greedy rows pick their argmax), and the
        sampled rows' filtered scores ([sampled rows, vocab], in batch order; -inf outside each row's
        candidates), not yet divided by the temperature.
    """
    plan = Plan(logits, samplers, eos_token_ids)
    penalised = penalise(logits, plan)
    return penalised, filter_candidates(penalised, plan) if plan.sampled else penalised[:0]


def sample_rows(
    logits: torch.Tensor, samplers: Sequence[SequenceSampler], eos_token_ids: frozenset[int]
) -> list[SampledToken]:
    """Picks one token for each row of ``logits`` ([rows, vocab], any float dtype, on the model's device;
    columns past the samplers' vocabulary are never picked) and records it in the row's sampler."""
    if not samplers:
        return []
    if all(s.plain and s.params.greedy and s.params.logprobs is None for s in samplers):
        # The common plain greedy batch, without the plan's bookkeeping: one argmax, one copy.
        if logits.shape[1] < samplers[0].vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns for a vocabulary of {samplers[0].vocab_size}")
        ids = _to_host(logits[:, : samplers[0].vocab_size].argmax(dim=1))
        for sampler in samplers:
            sampler.generated += 1
        return [SampledToken(int(token)) for token in ids]
    plan = Plan(logits, samplers, eos_token_ids)
    tokens = _choose(logits, plan)
    parts = [tokens.to(torch.float64)]  # token ids are exact in float64; so are float32 logprobs
    if plan.asked:
        index = plan.index.get("asked")
        logprobs = take(logits[:, : plan.vocab], index).float().log_softmax(dim=1)
        parts.append(logprobs.gather(1, take(tokens, index).unsqueeze(1)).flatten().double())
        if plan.top_logprobs:
            top = logprobs.topk(plan.top_logprobs, dim=1)
            parts += [top.values.flatten().double(), top.indices.flatten().double()]
    values = _to_host(torch.cat(parts))
    return _record_on_host(plan, values)


def _choose(logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Steps 1-5: every row's token, on the device; the penalty state records it there."""
    if plan.greedy_only:  # nothing to apply, no noise: one argmax
        return logits[:, : plan.vocab].argmax(dim=1)
    penalised = penalise(logits, plan)
    if not plan.sampled:
        tokens = penalised.argmax(dim=1)
    else:
        drawn = noise.draw(filter_candidates(penalised, plan), plan.float["temperature"], plan.int["keys"])
        sampled = plan.index.get("sampled")
        tokens = drawn if sampled is None else penalised.argmax(dim=1).index_copy_(0, sampled, drawn)
    _record_on_device(plan, tokens)
    return tokens


def _record_on_device(plan: Plan, tokens: torch.Tensor) -> None:
    """Adds the sampled tokens to the stacked penalty state; each sampler keeps its row of the stack."""
    for stack, rows, name in ((plan.seen, plan.repeat, "repeat"), (plan.counts, plan.count, "count")):
        if stack is None:
            continue
        where = (torch.arange(len(rows), device=plan.device), take(tokens, plan.index.get(name)))
        # One token per row: distinct pairs, so a plain put (no accumulating one) does it.
        seen = torch.ones((), dtype=torch.bool, device=plan.device)
        stack.index_put_(where, stack[where] + 1 if stack is plan.counts else seen)
        for i, row in zip(rows, stack.unbind(0), strict=True):
            if stack is plan.seen:
                plan.samplers[i].seen = row
            else:
                plan.samplers[i].counts = row


def _record_on_host(plan: Plan, values: list[float]) -> list[SampledToken]:
    """The results from the copied values; each sampler counts its token and advances its guide."""
    results = [SampledToken(int(token)) for token in values[: plan.rows]]
    chosen, k = plan.rows, plan.top_logprobs
    top_values = chosen + len(plan.asked)  # then [asked, k] values, then [asked, k] ids
    top_ids = top_values + len(plan.asked) * k
    for n, i in enumerate(plan.asked):
        wanted = plan.samplers[i].params.logprobs or 0
        ids = values[top_ids + n * k : top_ids + n * k + wanted]
        logprobs = values[top_values + n * k : top_values + n * k + wanted]
        pairs = tuple((int(t), lp) for t, lp in zip(ids, logprobs, strict=True))
        results[i] = SampledToken(results[i].token_id, values[chosen + n], pairs)
    for sampler, result in zip(plan.samplers, results, strict=True):
        sampler.generated += 1
        if sampler.guide is not None:
            sampler.guide.advance(result.token_id)
    return results


def _to_host(packed: torch.Tensor) -> list[float]:
    """The one device-to-host copy of a call (a seam: tests count the calls)."""
    values: list[float] = packed.tolist()
    return values
