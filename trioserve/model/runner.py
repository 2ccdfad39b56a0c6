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
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from trioserve.errors import InvalidRequest, OutOfMemory
from trioserve.model.architectures import needs_whole_prefill
from trioserve.model.arena import KVArena, arena_layers
from trioserve.model.attention import use_arena_attention, use_plain_attention
from trioserve.model.decode import DecodeStep
from trioserve.model.sampling import SequenceSampler, sample_rows
from trioserve.text.grammars import output_grammar
from trioserve.text.guided import GuideFactory
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, OutputSchema, PrefillChunk, SampledToken, StepOutput, StepPlan

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 4096


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
        self.guides = GuideFactory(tokenizer.hf, self._vocab_size, eos_token_ids)
        self.forward_passes = 0
        self.arena: KVArena | None = None
        self._decode_step: DecodeStep | None = None
        self.mode = self._set_up_arena(max_batch_size, cuda_graphs) if max_batch_size > 1 else "--max-batch-size 1"
        self._max_batch_size = max_batch_size if self.arena is not None else 1
        self._prefill_whole = needs_whole_prefill(model.config) is not None

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

    # -- Runner Protocol: lifecycle -------------------------------------------------------------------

    def release(self, seq_id: int) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is None:
            return
        if sequence.slot is not None:
            assert self.arena is not None
            self.arena.release(sequence.slot)  # its next owner overwrites it; nothing reads it before
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
        if plan.decode:
            tokens.update(self._decode(plan.decode))
        return StepOutput(tokens)

    # -- set-up ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _set_up_arena(self, slots: int, cuda_graphs: bool) -> str:
        """Allocates the arena and checks, on a probe prompt, that a decode pass through it gives the logits
        the model's own cache gives. Returns how sequences are decoded, for the startup log."""
        probe = DynamicCache(config=self.model.config)
        ids = torch.tensor([[1, 2, 3]], device=self._device)
        self._forward(probe, input_ids=ids[:, :2], position_ids=torch.tensor([[0, 1]], device=self._device))
        layers = arena_layers(probe)
        if layers is None:
            kinds = sorted({type(layer).__name__ for layer in probe.layers})
            return f"one sequence per pass: its cache layers ({', '.join(kinds)}) are not plain attention"
        base = use_arena_attention(self.model)
        if base is None:
            name = self.model.config._attn_implementation
            return f"one sequence per pass: attention implementation {name!r} cannot decode from the arena"
        dtype = next(self.model.parameters()).dtype
        try:
            self.arena = KVArena(layers, slots=slots, max_len=self._max_context, dtype=dtype, device=self._device)
        except torch.OutOfMemoryError as exc:
            raise torch.OutOfMemoryError(
                f"the KV arena ({slots} slots x {self._max_context} tokens) does not fit: lower --max-concurrent "
                f"or --max-model-len ({exc})"
            ) from exc
        self._decode_step = DecodeStep(
            self.model, self.arena, cache_kwarg=self._cache_kwarg, additive_masks=base == "eager"
        )
        slot = self.arena.acquire()
        self.arena.store(slot, probe, 0, 2)
        expected = self._forward(probe, input_ids=ids[:, 2:], position_ids=torch.tensor([[2]], device=self._device))
        got = self._decode_step.run([slot], [3], [2])[0]
        self.arena.release(slot)
        scale = float(expected.abs().max())
        agrees = bool(torch.allclose(got, expected[0].float(), rtol=2e-2, atol=2e-2 * scale))
        if self._decode_step.masks_seen != len(layers) or not agrees:
            use_plain_attention(self.model)
            self.arena, self._decode_step = None, None
            return "one sequence per pass: its attention layers do not decode correctly from the arena"
        if cuda_graphs and self._device.type == "cuda":
            try:
                self._decode_step.capture()
                # The probe again, now replayed: a capture that missed an input buffer shows here.
                replayed = self._decode_step.run([slot], [3], [2])[0]
                if not torch.allclose(replayed, got, rtol=1e-3, atol=1e-3 * scale):
                    raise RuntimeError("a replay of the captured decode pass disagrees with the eager pass")
            except Exception:  # the model still serves, eagerly: slower, never wrong
                logger.exception("capturing the decode pass as CUDA graphs failed; decoding eagerly")
                self._decode_step.drop_graphs()
        gib = self.arena.nbytes / 2**30
        graphs = "CUDA graphs" if self._decode_step.captured else "eager"
        return (
            f"up to {slots} sequences per pass ({graphs}); KV arena {slots} x {self._max_context} tokens, {gib:.2f} GiB"
        )

    # -- passes ---------------------------------------------------------------------------------------

    def _forward(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        self.forward_passes += 1
        out = self.model(**inputs, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _new_sequence(self, chunk: PrefillChunk, cache: DynamicCache | None) -> _Sequence:
        request = chunk.request
        grammar = request.params.grammar
        guide = self.guides.guide(grammar) if grammar is not None else None
        sampler = SequenceSampler(request.params, request.prompt_ids, self._vocab_size, self._device, guide)
        slot = self.arena.acquire() if self.arena is not None else None
        sequence = _Sequence(chunk.seq_id, request, sampler, cache, slot)
        self._sequences[chunk.seq_id] = sequence
        return sequence

    def _prefill_chunk(self, chunk: PrefillChunk) -> SampledToken | None:
        """One chunk of one prompt, into that sequence's own cache (then its slot, after the last chunk)."""
        if chunk.start == 0:
            self._new_sequence(chunk, DynamicCache(config=self.model.config))
        sequence = self._sequences[chunk.seq_id]
        assert sequence.cache is not None, "a decoding sequence cannot be prefilled again"
        ids = chunk.request.prompt_ids[chunk.start : chunk.end]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)
        positions = torch.arange(chunk.start, chunk.end, device=self._device).unsqueeze(0)
        # One unpadded row: no attention mask (recurrent mixers misread one given at decode).
        logits = self._forward(sequence.cache, input_ids=input_ids, position_ids=positions)
        sequence.length = chunk.end
        if not chunk.is_last:
            return None
        if self.arena is not None:
            assert sequence.slot is not None
            self.arena.store(sequence.slot, sequence.cache, 0, sequence.length)
            sequence.cache = None
        (token,) = sample_rows(logits, [sequence.sampler], self._eos_token_ids)
        sequence.last_token = token.token_id
        return token

    def _prefill_together(self, chunks: tuple[PrefillChunk, ...]) -> dict[int, SampledToken]:
        """Whole prompts of several sequences in one left-padded forward pass, each copied into its slot."""
        assert self.arena is not None, "only arena mode prefills prompts together"
        assert all(c.start == 0 and c.is_last for c in chunks), "only whole prompts are prefilled together"
        lengths = [len(c.request.prompt_ids) for c in chunks]
        width = max(lengths)
        padded = [[0] * (width - n) + list(c.request.prompt_ids) for c, n in zip(chunks, lengths, strict=True)]
        mask_rows = [[0] * (width - n) + [1] * n for n in lengths]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self._device)
        mask = torch.tensor(mask_rows, dtype=torch.long, device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(cache, input_ids=input_ids, attention_mask=mask, position_ids=positions)
        sequences = [self._new_sequence(chunk, None) for chunk in chunks]
        for row, (sequence, length) in enumerate(zip(sequences, lengths, strict=True)):
            assert sequence.slot is not None
            self.arena.store(sequence.slot, cache, row, length)
            sequence.length = length
        tokens = sample_rows(logits, [s.sampler for s in sequences], self._eos_token_ids)
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
            positions = torch.tensor([[sequence.length]], device=self._device)
            logits = self._forward(sequence.cache, input_ids=input_ids, position_ids=positions)
        else:
            self.forward_passes += 1
            slots = [s.slot for s in sequences]
            assert None not in slots, "a sequence decodes only once its prompt is in its slot"
            tokens = [s.last_token for s in sequences]
            logits = self._decode_step.run(slots, tokens, [s.length for s in sequences])  # type: ignore[arg-type]
        sampled = sample_rows(logits, [s.sampler for s in sequences], self._eos_token_ids)
        for sequence, token in zip(sequences, sampled, strict=True):
            sequence.length += 1
            sequence.last_token = token.token_id
        return {s.seq_id: t for s, t in zip(sequences, sampled, strict=True)}
