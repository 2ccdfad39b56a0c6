"""The model side: prefill, batched decode over the KV arena, and who owns which KV. Synchronous; no trio.

Two ways to hold KV, chosen at load:

* **Arena** (models whose layers are all plain or sliding-window attention): a sequence owns one slot of
  the `KVArena` from its first prefill chunk to its release. Its prompt is prefilled into a `DynamicCache`
  of its own (chunk by chunk, or with other whole prompts in one left-padded pass) and copied into the
  slot once; every decode step then runs all decoding sequences in one static-shape pass (`DecodeStep`: a
  replayed CUDA graph on CUDA) that writes each new key and value in place and attends over each row's
  valid prefix. Releasing frees the slot at once; nothing is joined, padded or compacted per step.
* **Own cache** (recurrent and hybrid layers, attention that cannot take our masks): each sequence keeps
  its `DynamicCache` for life and is decoded alone, one sequence per pass, taking turns.

Either way a sequence's tokens are the ones it would get alone (tests/test_runner.py checks it in float64).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import numpy
import torch
from transformers import DynamicCache, PreTrainedModel

from trioserve.errors import InvalidRequest, OutOfMemory
from trioserve.model.architectures import needs_whole_prefill
from trioserve.model.arena import KVArena
from trioserve.model.arena_setup import set_up_arena
from trioserve.model.decode import DecodeStep
from trioserve.model.prefixcache import Hit, PrefixCache
from trioserve.model.sampling import SequenceSampler, sample_rows
from trioserve.model.vision import cache_key, pass_features, rope_indexer, rope_positions, usable_hit
from trioserve.text.grammars import output_grammar
from trioserve.text.guided import GuideFactory
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import (
    GenerationRequest,
    OutputSchema,
    PrefillChunk,
    PrefixCacheStats,
    SampledToken,
    StepOutput,
    StepPlan,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096
# A retained entry is taken in place only if at most this many of its tokens (or an eighth of the hit) lie
# past the hit: the multi-turn case, where the entry is the conversation so far plus its last few tokens.
IN_PLACE_TAIL = 16
# A prompt leaves a group prefill for a pass of its own from the cache when the hit is at least this long and
# half its prompt (a few shared template tokens are not worth a pass), at most this many a step.
MIN_SOLO_HIT = 32
SOLO_PASSES = 4


@dataclass(eq=False)
class _Sequence:
    """One request's state in the runner."""

    seq_id: int
    request: GenerationRequest
    sampler: SequenceSampler
    cache: DynamicCache | None  # its own KV: while prefilling (arena mode), or for life (own-cache mode)
    slot: int | None = None  # its arena slot (arena mode)
    length: int = 0  # tokens whose KV is held
    last_token: int = -1  # sampled but not yet fed back
    fed: list[int] = field(default_factory=list)  # generated tokens whose KV is held (after the prompt's)
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    in_place: int = 0  # of those, the ones already in its own slot (a retained entry taken in place)
    valid_from: tuple[int, ...] = ()  # that entry's valid columns per layer (see `KVArena.store`)
    rope: torch.Tensor | None = None  # the prompt's multi-axis rotary positions (a prompt with images)
    rope_delta: int = 0  # a position's rotary offset from its token index, past the prompt (see `model.vision`)


class TransformersRunner:
    """Runs a transformers causal LM for the engine; see the `trioserve.types.Runner` Protocol.

    Args:
        model: the loaded model, in eval mode, on its device.
        tokenizer: its chat tokenizer.
        model_id: the id reported to clients.
        max_batch_size: sequences per decode pass, and so slots in the arena.
        eos_token_ids: tokens that end a sequence.
        max_model_len: prompt plus output tokens a sequence may hold (default: the model's limit, at most
            4096); sizes the arena.
        cuda_graphs: capture the decode pass as CUDA graphs (on CUDA devices only).
        prefix_caching: keep what finished sequences computed as evictable cache, and prefill only the part
            of a prompt no cache entry of its scope holds (arena mode only; `trioserve.model.prefixcache`).
        prefix_cache_slots: arena slots, beyond one per sequence, that only hold prefix-cache entries.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: ChatTokenizer,
        *,
        model_id: str,
        max_batch_size: int,
        eos_token_ids: frozenset[int],
        max_model_len: int | None = None,
        cuda_graphs: bool = True,
        prefix_caching: bool = True,
        prefix_cache_slots: int = 0,
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._device = model.device
        self._eos_token_ids = eos_token_ids
        config = model.config.get_text_config()
        self._vocab_size = int(config.vocab_size)
        model_limit = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self._max_context = min(max_model_len or min(model_limit, DEFAULT_MAX_MODEL_LEN), model_limit)
        # transformers 5.24 renamed `past_key_values` to `cache`; accept both spellings of the library.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._sequences: dict[int, _Sequence] = {}
        self._rope_indexer = rope_indexer(model)  # models with multi-axis rotary positions (Qwen2-VL...)
        self.guides = GuideFactory(tokenizer.hf, self._vocab_size, eos_token_ids)
        self.forward_passes = 0
        self.arena: KVArena | None = None
        self._decode_step: DecodeStep | None = None
        self.mode = "--max-batch-size 1"
        if max_batch_size > 1:
            self.arena, self._decode_step, self.mode = set_up_arena(
                model,
                self._forward,
                slots=max_batch_size,
                max_len=self._max_context,
                cache_slots=prefix_cache_slots if prefix_caching else 0,
                cache_kwarg=self._cache_kwarg,
                cuda_graphs=cuda_graphs,
            )
        self._max_batch_size = max_batch_size if self.arena is not None else 1
        self._prefill_whole = needs_whole_prefill(model.config) is not None
        self.prefix_cache: PrefixCache | None = None
        if not prefix_caching:
            self.prefix_caching = "off (--no-prefix-caching)"
        elif self.arena is None:
            # Own-cache models (recurrent or hybrid state, attention off the arena) keep state that a token
            # prefix alone does not determine at a boundary we could stop at: no reuse, never inexact.
            self.prefix_caching = f"off: the model is not decoded from the KV arena ({self.mode})"
        else:
            windows = tuple(shape.sliding_window for shape in self.arena.layers)
            self.prefix_cache = PrefixCache(self.arena.slots, self.arena.cache_slots, windows)
            per_slot = self.arena.nbytes / (self.arena.slots + self.arena.cache_slots) / 2**30
            self.prefix_caching = (
                f"on: retained in free arena slots, plus {self.arena.cache_slots} cache-only slots "
                f"({self.arena.cache_slots * per_slot:.2f} GiB, included in the arena's size)"
            )

    # -- Runner Protocol: properties ------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def prefill_whole(self) -> bool:
        return self._prefill_whole

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self._tokenizer

    def compile_grammar(self, spec: OutputSchema) -> str:
        if (reason := self.guides.unavailable) is not None:
            raise InvalidRequest(
                f"JSON response_format and forced tool calls are not available for this model: {reason}",
                param=spec.param,
            )
        return output_grammar(spec)

    def live_sequences(self) -> int:
        return len(self._sequences)

    def kv_tokens(self) -> int:
        return sum(sequence.length for sequence in self._sequences.values())

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.prefix_cache.stats() if self.prefix_cache is not None else None

    # -- Runner Protocol: lifecycle -------------------------------------------------------------------

    def release(self, seq_id: int) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is None:
            return
        if sequence.slot is not None:
            assert self.arena is not None
            if self.prefix_cache is not None:  # what it computed stays behind as evictable cache
                self.prefix_cache.released(sequence.slot, seq_id)
            self.arena.release(sequence.slot)
        sequence.cache = None

    def step(self, plan: StepPlan) -> StepOutput:
        try:
            return self._step(plan)
        except torch.OutOfMemoryError as exc:
            # Its sequences fail with a 503: another replica, or a retry once others finish, may fit.
            raise OutOfMemory(f"out of memory during a forward pass: {exc}") from exc

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> StepOutput:
        tokens: dict[int, SampledToken] = {}
        if len(plan.prefill) == 1:
            token = self._prefill_chunk(plan.prefill[0])
            if token is not None:
                tokens[plan.prefill[0].seq_id] = token
        elif plan.prefill:
            tokens.update(self._prefill_together(plan.prefill))
        held = {c.seq_id: self._sequences[c.seq_id].length for c in plan.prefill if c.seq_id in self._sequences}
        cached = {c.seq_id: self._sequences[c.seq_id].cached for c in plan.prefill if c.start == 0}
        if plan.decode:
            tokens.update(self._decode(plan.decode))
        return StepOutput(tokens, prefilled=held, cached=cached)

    # -- set-up ---------------------------------------------------------------------------------------

    # -- passes ---------------------------------------------------------------------------------------

    def _forward(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        self.forward_passes += 1
        out = self.model(**inputs, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _sample(self, logits: torch.Tensor, samplers: list[SequenceSampler]) -> list[SampledToken]:
        """Each row's next token (a hook: a tensor-parallel follower takes rank 0's tokens instead)."""
        return sample_rows(logits, samplers, self._eos_token_ids)

    def _new_sequence(self, chunk: PrefillChunk, cache: DynamicCache | None, hit: Hit | None = None) -> _Sequence:
        """The sequence's state and its arena slot: with prefix caching, the hit's own slot when it is a retained
        one worth taking in place, else an empty or the least recently used retained slot (see `PrefixCache`)."""
        request = chunk.request
        grammar = request.params.grammar
        guide = self.guides.guide(grammar) if grammar is not None else None
        sampler = SequenceSampler(request.params, request.prompt_ids, self._vocab_size, self._device, guide)
        slot = None
        if self.arena is not None and self.prefix_cache is not None:
            slot, moves = self.prefix_cache.take_slot(sorted(self.arena.free), chunk.seq_id, hit)
            for source, target, length in moves:
                self.arena.copy(source, target, length)
            self.arena.acquire(slot)
        elif self.arena is not None:
            slot = self.arena.acquire()
        sequence = _Sequence(chunk.seq_id, request, sampler, cache, slot)
        if hit is not None:
            sequence.length = sequence.cached = hit.length
            if hit.retained and hit.slot == slot:
                assert self.prefix_cache is not None
                sequence.in_place = hit.length
                sequence.valid_from = self.prefix_cache.entries[slot].valid_from
        self._sequences[chunk.seq_id] = sequence
        return sequence

    def _lookup(self, request: GenerationRequest) -> Hit | None:
        """The prompt's usable cached prefix, if any. A retained hit is offered in place only when it covers its
        entry nearly whole: taking a slot overwrites the rest of its entry (another conversation's history)."""
        if self.prefix_cache is None:
            return None
        images = request.images
        hit = self.prefix_cache.lookup(
            request.cache_scope, cache_key(request.prompt_ids, images), lambda n: usable_hit(n, images)
        )
        if hit is not None and hit.retained:
            left = self.prefix_cache.entries[hit.slot].length - hit.length
            if left > max(IN_PLACE_TAIL, hit.length // 8):
                hit = Hit(hit.slot, hit.length, retained=False)
        return hit

    def _prefill_chunk(self, chunk: PrefillChunk) -> SampledToken | None:
        """One chunk of one prompt, into that sequence's own cache (then its slot, after the last chunk).

        With a prefix-cache hit the first chunk starts where the hit ends (its keys and values seeded into the
        sequence's cache from the arena) and covers as many new tokens as the chunk would have.
        """
        if chunk.start == 0:
            hit = self._lookup(chunk.request)
            cache = DynamicCache(config=self.model.config)
            if hit is not None:
                assert self.arena is not None
                self.arena.seed(cache, hit.slot, hit.length)  # before a slot is taken: that may move entries
            sequence = self._new_sequence(chunk, cache, hit)
            if self._rope_indexer is not None and (
                rope := rope_positions(self._rope_indexer, chunk.request.prompt_ids, chunk.request.images)
            ):
                sequence.rope, sequence.rope_delta = rope[0].to(self._device), rope[1]
        sequence = self._sequences[chunk.seq_id]
        assert sequence.cache is not None, "a decoding sequence cannot be prefilled again"
        prompt = chunk.request.prompt_ids
        start = sequence.length
        end = min(start + chunk.end - chunk.start, len(prompt))
        input_ids = torch.tensor([prompt[start:end]], dtype=torch.long, device=self._device)
        positions = torch.arange(start, end, device=self._device).unsqueeze(0)
        if sequence.rope is not None:
            positions = sequence.rope[..., start:end]
        images = pass_features(chunk.request.images, start, end, len(prompt), self._device, self.model.dtype)
        # One unpadded row: no attention mask (recurrent mixers misread one given at decode).
        logits = self._forward(sequence.cache, input_ids=input_ids, position_ids=positions, **images)
        sequence.length = end
        if end < len(prompt):
            return None
        if self.arena is not None:
            self._store(sequence, sequence.cache, 0)
            sequence.cache = None
        (token,) = self._sample(logits, [sequence.sampler])
        sequence.last_token = token.token_id
        return token

    def _store(self, sequence: _Sequence, cache: DynamicCache, row: int) -> None:
        """A prefilled prompt into its slot, and (with prefix caching) the slot's entry now its."""
        assert self.arena is not None and sequence.slot is not None
        valid = self.arena.store(sequence.slot, cache, row, sequence.length, sequence.in_place, sequence.valid_from)
        if self.prefix_cache is not None:
            request = sequence.request
            prompt = cache_key(request.prompt_ids, request.images)
            self.prefix_cache.stored(sequence.slot, request.cache_scope, prompt, sequence.fed, valid, sequence.seq_id)

    def _prefill_together(self, chunks: tuple[PrefillChunk, ...]) -> dict[int, SampledToken]:
        """Whole prompts of several sequences in one left-padded forward pass, each copied into its slot.

        With prefix caching, the same prompt twice (``n > 1`` choices) is computed once: its row's KV is stored
        into every slot and its logits sampled by each sampler. A prompt with a long cached prefix goes on its
        own after the pass, from the cache (a few a step: each is a pass of its own).
        """
        assert self.arena is not None, "only arena mode prefills prompts together"
        assert all(c.start == 0 and c.is_last for c in chunks), "only whole prompts are prefilled together"
        later: list[PrefillChunk] = []
        leaders: list[PrefillChunk] = []
        members: list[tuple[PrefillChunk, int]] = []  # each chunk and the row of the pass that computes it
        rows: dict[tuple[str, tuple[int, ...]], int] = {}
        for chunk in chunks:
            request = chunk.request
            if request.images is not None:  # its own pass: a padded row would shift its positions and masks
                later.append(chunk)
                continue
            if self.prefix_cache is not None and len(later) < SOLO_PASSES and self._worth_its_own_pass(request):
                later.append(chunk)
                continue
            key = (request.cache_scope, request.prompt_ids) if self.prefix_cache is not None else ("", (chunk.seq_id,))
            if key not in rows:
                rows[key] = len(leaders)
                leaders.append(chunk)
            members.append((chunk, rows[key]))
        tokens: dict[int, SampledToken] = {}
        if len(members) == 1:
            later.insert(0, members[0][0])
        elif members:
            tokens.update(self._prefill_group(leaders, members))
        for chunk in later:
            token = self._prefill_chunk(chunk)
            assert token is not None
            tokens[chunk.seq_id] = token
        return tokens

    def _worth_its_own_pass(self, request: GenerationRequest) -> bool:
        """Whether a prompt's cached prefix saves more than a row of the group pass costs it."""
        assert self.prefix_cache is not None
        prompt = numpy.asarray(request.prompt_ids, dtype=numpy.int64)
        length = self.prefix_cache.peek(request.cache_scope, prompt)
        return length >= max(MIN_SOLO_HIT, len(prompt) // 2)

    def _prefill_group(
        self, leaders: list[PrefillChunk], members: list[tuple[PrefillChunk, int]]
    ) -> dict[int, SampledToken]:
        lengths = [len(c.request.prompt_ids) for c in leaders]
        width = max(lengths)
        padded = [[0] * (width - n) + list(c.request.prompt_ids) for c, n in zip(leaders, lengths, strict=True)]
        mask_rows = [[0] * (width - n) + [1] * n for n in lengths]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self._device)
        mask = torch.tensor(mask_rows, dtype=torch.long, device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        sequences = [self._new_sequence(chunk, None) for chunk, _ in members]
        for sequence, (_, row) in zip(sequences, members, strict=True):
            sequence.length = lengths[row]
            self._store(sequence, cache, row)
        if len(members) > len(leaders):
            logits = logits[torch.tensor([row for _, row in members], device=logits.device)]
        tokens = self._sample(logits, [s.sampler for s in sequences])
        for sequence, token in zip(sequences, tokens, strict=True):
            sequence.last_token = token.token_id
        return {s.seq_id: t for s, t in zip(sequences, tokens, strict=True)}

    def _decode(self, seq_ids: tuple[int, ...]) -> dict[int, SampledToken]:
        sequences = [self._sequences[seq_id] for seq_id in seq_ids]
        if self._decode_step is None:
            assert len(sequences) == 1, "own-cache mode decodes one sequence a pass"
            (sequence,) = sequences
            assert sequence.cache is not None
            input_ids = torch.tensor([[sequence.last_token]], device=self._device)
            positions = torch.tensor([[sequence.length + sequence.rope_delta]], device=self._device)
            logits = self._forward(sequence.cache, input_ids=input_ids, position_ids=positions)
        else:
            self.forward_passes += 1
            slots = [s.slot for s in sequences]
            assert None not in slots, "a sequence decodes only once its prompt is in its slot"
            tokens = [s.last_token for s in sequences]
            lengths = [s.length for s in sequences]
            offsets = [s.rope_delta for s in sequences] if any(s.rope_delta for s in sequences) else None
            logits = self._decode_step.run(slots, tokens, lengths, offsets)  # type: ignore[arg-type]
        sampled = self._sample(logits, [s.sampler for s in sequences])
        for sequence, token in zip(sequences, sampled, strict=True):
            sequence.length += 1
            sequence.fed.append(sequence.last_token)  # its KV is now held (a live prefix-cache entry grows)
            sequence.last_token = token.token_id
        return {s.seq_id: t for s, t in zip(sequences, sampled, strict=True)}
