"""The model side: prefill chunks, batched decode steps, and KV cache ownership. Synchronous; no trio.

Each sequence is prefilled on its own `DynamicCache`. When it first appears in a decode plan its cache is
joined into the running batch by left-padding along the sequence axis; every row keeps its own
``position_ids`` and a 2-D attention mask hides the padding, so a row's tokens are the ones it would get
alone. A released row is dropped with ``batch_select_indices`` at the start of the next step, and padding
columns that no row needs any more are trimmed at the same time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from trioserve.sampling import SequenceSampler, sample_rows
from trioserve.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, PrefillChunk, SampledToken, StepOutput, StepPlan


@dataclass(eq=False)
class _Sequence:
    """One request's state in the runner. ``cache`` is its own until it joins the batch."""

    seq_id: int
    request: GenerationRequest
    sampler: SequenceSampler
    cache: DynamicCache | None
    length: int = 0  # tokens in the KV cache
    last_token: int = -1  # sampled but not yet fed back


@dataclass(eq=False)
class _Batch:
    """Sequences decoded together: one cache whose row ``i`` belongs to ``rows[i]``."""

    cache: DynamicCache
    rows: list[_Sequence]
    mask: torch.Tensor  # [rows, columns]: 1 where a row holds a real token
    released: set[int] = field(default_factory=set)  # row indexes to drop before the next pass


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
        self._batch: _Batch | None = None
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

    def live_sequences(self) -> int:
        return len(self._sequences)

    # -- Runner Protocol: lifecycle -------------------------------------------------------------------

    def release(self, seq_id: int) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is None:
            return
        sequence.cache = None
        batch = self._batch
        if batch is None:
            return
        for index, row in enumerate(batch.rows):
            if row is sequence:
                batch.released.add(index)
        if len(batch.released) == len(batch.rows):
            self._batch = None  # nothing left to keep: the whole cache goes now, no copy needed

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        tokens: dict[int, SampledToken] = {}
        self._compact()
        if plan.prefill is not None:
            token = self._prefill(plan.prefill)
            if token is not None:
                tokens[plan.prefill.seq_id] = token
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

    def _prefill(self, chunk: PrefillChunk) -> SampledToken | None:
        if chunk.start == 0:
            request = chunk.request
            sampler = SequenceSampler(request.params, request.prompt_ids, self._vocab_size, self._device)
            cache = DynamicCache(config=self.model.config)
            self._sequences[chunk.seq_id] = _Sequence(chunk.seq_id, request, sampler, cache)
        sequence = self._sequences[chunk.seq_id]
        assert sequence.cache is not None, "a sequence in the batch cannot be prefilled again"
        ids = chunk.request.prompt_ids[chunk.start : chunk.end]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        positions = torch.arange(chunk.start, chunk.end, device=self._device).unsqueeze(0)
        logits = self._forward(sequence.cache, input_ids=input_ids, position_ids=positions)
        sequence.length = chunk.end
        if not chunk.is_last:
            return None
        (token,) = sample_rows(logits, [sequence.sampler], self._eos_token_ids)
        sequence.last_token = token.token_id
        return token

    def _decode(self, seq_ids: tuple[int, ...]) -> dict[int, SampledToken]:
        sequences = [self._sequences[seq_id] for seq_id in seq_ids]
        if self._max_batch_size == 1:
            assert len(sequences) == 1, "one-request-per-pass mode decodes one sequence a step"
            (sequence,) = sequences
            assert sequence.cache is not None
            cache = sequence.cache
            input_ids = torch.tensor([[sequence.last_token]], device=self._device)
            positions = torch.tensor([[sequence.length]], device=self._device)
            logits = self._forward(cache, input_ids=input_ids, position_ids=positions)
        else:
            batch = self._join(sequences)
            batch.mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
            input_ids = torch.tensor([[s.last_token] for s in batch.rows], device=self._device)
            positions = torch.tensor([[s.length] for s in batch.rows], device=self._device)
            logits = self._forward(batch.cache, input_ids=input_ids, attention_mask=batch.mask, position_ids=positions)
            sequences = batch.rows
        tokens = sample_rows(logits, [s.sampler for s in sequences], self._eos_token_ids)
        result = {}
        for sequence, token in zip(sequences, tokens, strict=True):
            sequence.length += 1
            sequence.last_token = token.token_id
            result[sequence.seq_id] = token
        return result

    def _join(self, sequences: list[_Sequence]) -> _Batch:
        """Makes the batch hold exactly ``sequences``: joins the ones that only have their own cache."""
        batch = self._batch
        members = {id(row) for row in batch.rows} if batch is not None else set()
        newcomers = [s for s in sequences if id(s) not in members]
        if batch is not None and len(batch.rows) + len(newcomers) != len(sequences):
            raise RuntimeError("the decode plan does not match the running batch")
        if not newcomers:
            assert batch is not None
            return batch
        parts: list[tuple[DynamicCache, torch.Tensor]] = []
        if batch is not None:
            parts.append((batch.cache, batch.mask))
        for sequence in newcomers:
            assert sequence.cache is not None
            ones = torch.ones((1, sequence.length), dtype=torch.long, device=self._device)
            parts.append((sequence.cache, ones))
        width = max(mask.shape[1] for _, mask in parts)
        cache = DynamicCache(config=self.model.config)
        for index in range(len(cache.layers)):
            kvs = [_kv(c.layers[index]) for c, _ in parts]
            keys = torch.cat([_left_pad(k, width) for k, _ in kvs])
            values = torch.cat([_left_pad(v, width) for _, v in kvs])
            cache.update(keys, values, index)
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for _, m in parts])
        for sequence in newcomers:
            sequence.cache = None  # its KV now lives in the batch's rows
        rows = (batch.rows if batch is not None else []) + newcomers
        self._batch = _Batch(cache, rows, mask)
        return self._batch

    def _compact(self) -> None:
        """Drops released rows and the padding columns no remaining row needs."""
        batch = self._batch
        if batch is None or not batch.released:
            return
        keep = [i for i in range(len(batch.rows)) if i not in batch.released]
        index = torch.tensor(keep, device=self._device)
        batch.cache.batch_select_indices(index)
        batch.mask = batch.mask[index]
        batch.rows = [batch.rows[i] for i in keep]
        batch.released = set()
        trim = batch.mask.shape[1] - max(row.length for row in batch.rows)
        if trim > 0:
            batch.mask = batch.mask[:, trim:]
            for layer in batch.cache.layers:
                keys, values = _kv(layer)
                assert isinstance(layer, DynamicLayer)
                layer.keys, layer.values = keys[:, :, trim:, :], values[:, :, trim:, :]


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of a plain full-attention layer (the only kind `_batchable` lets through)."""
    assert type(layer) is DynamicLayer and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pads [batch, heads, seq, dim] with zeros on the left of the sequence axis up to ``width``."""
    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
