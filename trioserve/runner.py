"""The model side: prefill, batched decode steps, and KV cache ownership. Synchronous; no trio.

KV lives in groups (`_KVGroup`): a `DynamicCache` whose row ``i`` belongs to one sequence, with a 2-D mask
marking which columns of that row hold real tokens (rows are left-padded to a common width). A sequence's
KV starts in its own group (a long prompt, prefilled chunk by chunk) or in a group of whole prompts
prefilled together in one forward pass. When its sequences first appear in a decode plan, the group is
joined into the running batch by left-padding along the sequence axis; every row keeps its own
``position_ids``, so a row's tokens are the ones it would get alone. A released row is dropped with
``batch_select_indices`` at the start of the next step, and padding columns no row needs are trimmed then.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from trioserve.errors import InvalidRequest, OutOfMemory
from trioserve.grammars import output_grammar
from trioserve.guided import GuideFactory
from trioserve.sampling import SequenceSampler, sample_rows
from trioserve.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, OutputSchema, PrefillChunk, SampledToken, StepOutput, StepPlan


@dataclass(eq=False)
class _Sequence:
    """One request's state in the runner."""

    seq_id: int
    request: GenerationRequest
    sampler: SequenceSampler
    group: _KVGroup
    length: int = 0  # tokens in the KV cache
    last_token: int = -1  # sampled but not yet fed back


@dataclass(eq=False)
class _KVGroup:
    """Rows of one cache: row ``i`` belongs to ``rows[i]``; ``mask`` is 1 where a row holds a real token."""

    cache: DynamicCache
    rows: list[_Sequence]
    mask: torch.Tensor  # [rows, columns], long
    released: set[int] = field(default_factory=set)  # row indexes to drop before the next forward pass

    @property
    def live(self) -> bool:
        return len(self.released) < len(self.rows)

    def compact(self) -> None:
        """Drops released rows, then the leading padding columns that no remaining row needs."""
        if not self.released or not self.live:
            return
        keep = [i for i in range(len(self.rows)) if i not in self.released]
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        self.released = set()
        trim = self.mask.shape[1] - max(row.length for row in self.rows)
        if trim > 0:
            self.mask = self.mask[:, trim:]
            for layer in self.cache.layers:
                keys, values = _kv(layer)
                assert isinstance(layer, DynamicLayer)
                layer.keys, layer.values = keys[:, :, trim:, :], values[:, :, trim:, :]


class TransformersRunner:
    """Runs a transformers causal LM for the engine; see the `trioserve.types.Runner` Protocol."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: ChatTokenizer,
        *,
        model_id: str,
        max_batch_size: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self._model_id = model_id
        self._device = model.device
        self._eos_token_ids = eos_token_ids
        config = model.config.get_text_config()
        self._vocab_size = int(config.vocab_size)
        self._max_context = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self._max_batch_size = max_batch_size if self._batchable() else 1
        # transformers 5.24 renamed `past_key_values` to `cache`; accept both spellings of the library.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._sequences: dict[int, _Sequence] = {}
        self._batch: _KVGroup | None = None  # the running batch (batched mode)
        self.guides = GuideFactory(tokenizer.hf, self._vocab_size, eos_token_ids)
        self.forward_passes = 0

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
        groups = {id(s.group): s.group for s in self._sequences.values()}
        return sum(int(group.mask.numel()) for group in groups.values())

    # -- Runner Protocol: lifecycle -------------------------------------------------------------------

    def release(self, seq_id: int) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is None:
            return
        group = sequence.group
        group.released.add(group.rows.index(sequence))
        if not group.live and group is self._batch:
            self._batch = None  # nothing left to keep: the whole cache goes now, no copy needed

    def step(self, plan: StepPlan) -> StepOutput:
        try:
            return self._step(plan)
        except torch.OutOfMemoryError as exc:
            # Its sequences fail with a 503: another replica, or a retry once others finish, may fit.
            raise OutOfMemory(f"out of memory during a forward pass: {exc}") from exc

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> StepOutput:
        tokens: dict[int, SampledToken] = {}
        # Every live group, the running batch included, is some live sequence's group.
        for group in {id(s.group): s.group for s in self._sequences.values()}.values():
            group.compact()
        if len(plan.prefill) == 1:
            token = self._prefill_chunk(plan.prefill[0])
            if token is not None:
                tokens[plan.prefill[0].seq_id] = token
        elif plan.prefill:
            tokens.update(self._prefill_together(plan.prefill))
        if plan.decode:
            tokens.update(self._decode(plan.decode))
        return StepOutput(tokens)

    # -- internals ------------------------------------------------------------------------------------

    def _batchable(self) -> bool:
        """Batching joins caches by padding plain full-attention layers; other layer kinds run one by one."""
        probe = DynamicCache(config=self.model.config)
        return all(type(layer) is DynamicLayer for layer in probe.layers)

    def _forward(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        self.forward_passes += 1
        out = self.model(**inputs, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _new_sequence(self, chunk: PrefillChunk, group: _KVGroup) -> _Sequence:
        request = chunk.request
        grammar = request.params.grammar
        guide = self.guides.guide(grammar) if grammar is not None else None
        sampler = SequenceSampler(request.params, request.prompt_ids, self._vocab_size, self._device, guide)
        sequence = _Sequence(chunk.seq_id, request, sampler, group)
        self._sequences[chunk.seq_id] = sequence
        return sequence

    def _prefill_chunk(self, chunk: PrefillChunk) -> SampledToken | None:
        """One chunk of one prompt, on that sequence's own cache."""
        if chunk.start == 0:
            empty = torch.zeros((1, 0), dtype=torch.long, device=self._device)
            group = _KVGroup(DynamicCache(config=self.model.config), [], empty)
            group.rows.append(self._new_sequence(chunk, group))
        sequence = self._sequences[chunk.seq_id]
        group = sequence.group
        assert group is not self._batch, "a sequence in the batch cannot be prefilled again"
        ids = chunk.request.prompt_ids[chunk.start : chunk.end]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        positions = torch.arange(chunk.start, chunk.end, device=self._device).unsqueeze(0)
        logits = self._forward(group.cache, input_ids=input_ids, position_ids=positions)
        group.mask = torch.nn.functional.pad(group.mask, (0, len(ids)), value=1)
        sequence.length = chunk.end
        if not chunk.is_last:
            return None
        (token,) = sample_rows(logits, [sequence.sampler], self._eos_token_ids)
        sequence.last_token = token.token_id
        return token

    def _prefill_together(self, chunks: tuple[PrefillChunk, ...]) -> dict[int, SampledToken]:
        """Whole prompts of several sequences in one left-padded forward pass, into one new group."""
        assert all(c.start == 0 and c.is_last for c in chunks), "only whole prompts are prefilled together"
        width = max(len(c.request.prompt_ids) for c in chunks)
        padded = [[0] * (width - len(c.request.prompt_ids)) + list(c.request.prompt_ids) for c in chunks]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self._device)
        mask = torch.tensor(
            [[0] * (width - len(c.request.prompt_ids)) + [1] * len(c.request.prompt_ids) for c in chunks],
            dtype=torch.long,
            device=self._device,
        )
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        group = _KVGroup(DynamicCache(config=self.model.config), [], mask)
        for chunk in chunks:
            sequence = self._new_sequence(chunk, group)
            sequence.length = len(chunk.request.prompt_ids)
            group.rows.append(sequence)
        logits = self._forward(group.cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        tokens = sample_rows(logits, [s.sampler for s in group.rows], self._eos_token_ids)
        for sequence, token in zip(group.rows, tokens, strict=True):
            sequence.last_token = token.token_id
        return {s.seq_id: t for s, t in zip(group.rows, tokens, strict=True)}

    def _decode(self, seq_ids: tuple[int, ...]) -> dict[int, SampledToken]:
        sequences = [self._sequences[seq_id] for seq_id in seq_ids]
        if self._max_batch_size == 1:
            assert len(sequences) == 1, "one-request-per-pass mode decodes one sequence a step"
            group = sequences[0].group
        else:
            group = self._join(sequences)
        group.mask = torch.nn.functional.pad(group.mask, (0, 1), value=1)
        input_ids = torch.tensor([[s.last_token] for s in group.rows], device=self._device)
        positions = torch.tensor([[s.length] for s in group.rows], device=self._device)
        logits = self._forward(group.cache, input_ids=input_ids, attention_mask=group.mask, position_ids=positions)
        tokens = sample_rows(logits, [s.sampler for s in group.rows], self._eos_token_ids)
        result = {}
        for sequence, token in zip(group.rows, tokens, strict=True):
            sequence.length += 1
            sequence.last_token = token.token_id
            result[sequence.seq_id] = token
        return result

    def _join(self, sequences: list[_Sequence]) -> _KVGroup:
        """Makes the running batch hold exactly ``sequences``, joining the groups it does not have yet."""
        batch = self._batch
        newcomers = {id(s.group): s.group for s in sequences if s.group is not batch}
        expected = (len(batch.rows) if batch is not None else 0) + sum(len(g.rows) for g in newcomers.values())
        if expected != len(sequences):
            raise RuntimeError("the decode plan does not match the running batch")
        if not newcomers:
            assert batch is not None
            return batch
        parts = ([batch] if batch is not None else []) + list(newcomers.values())
        width = max(part.mask.shape[1] for part in parts)
        cache = DynamicCache(config=self.model.config)
        for index in range(len(cache.layers)):
            kvs = [_kv(part.cache.layers[index]) for part in parts]
            keys = torch.cat([_left_pad(k, width) for k, _ in kvs])
            values = torch.cat([_left_pad(v, width) for _, v in kvs])
            cache.update(keys, values, index)
        mask = torch.cat([torch.nn.functional.pad(p.mask, (width - p.mask.shape[1], 0)) for p in parts])
        joined = _KVGroup(cache, [row for part in parts for row in part.rows], mask)
        for row in joined.rows:
            row.group = joined  # the old groups' caches are now unreferenced and freed
        self._batch = joined
        return joined


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a plain full-attention layer (the only kind `_batchable` lets through)."""
    assert type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pads [batch, heads, seq, dim] with zeros on the left of the sequence axis up to ``width``."""
    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
