"""Admission and step planning: pure, synchronous policy. No trio, no torch.

States of a sequence, and why each exists::

    WAITING     admitted to the bounded FIFO queue; holds no KV and no slot
    PREFILLING  holds a slot; its prompt goes through the model within a token budget per step: whole
                short prompts together in one pass, a long one a chunk per step, so one long prompt never
                holds the running batch (or a cancellation) for more than a chunk (whole, with
                ``prefill_whole``, for models that cannot continue a prompt from cached state); a prompt
                with images alone, its first chunk reaching past its last image
    DECODING    holds a slot and KV; decoded every step with the whole batch (or in turn, one per step,
                when the model cannot be batched)

A sequence leaves from any state through `remove`, which is all the bookkeeping a cancellation needs.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass

from trioserve.types import GenerationRequest, PrefillChunk, StepPlan


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"


@dataclass(eq=False)
class Entry:
    seq_id: int
    request: GenerationRequest
    phase: Phase = Phase.WAITING
    prefilled: int = 0  # prompt tokens already run through the model


class QueueFull(Exception):
    """Raised by `Scheduler.submit` when every slot and every queue place is taken."""


class Scheduler:
    """Decides, at each step boundary, who runs and what the next forward pass does.

    Args:
        max_running: sequences holding a slot (prefilling or decoding) at once.
        max_waiting: sequences queued for a slot; past it `submit` raises `QueueFull`.
        batch_size: sequences per decode pass; 1 decodes the running sequences in turn.
        prefill_chunk: prompt tokens per prefill step (padded tokens, when several prompts go together).
        prefill_whole: every prompt goes through in one step, whatever its length, for models whose
            mixers cannot continue a prompt from cached state (`trioserve.model.architectures.needs_whole_prefill`).
    """

    def __init__(
        self, *, max_running: int, max_waiting: int, batch_size: int, prefill_chunk: int, prefill_whole: bool = False
    ) -> None:
        self.batch_size = batch_size
        # With a shared batch, a slot is a row of it; one-per-pass mode interleaves up to max_running.
        self.max_running = max_running if batch_size == 1 else min(max_running, batch_size)
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.prefill_whole = prefill_whole
        self._waiting: OrderedDict[int, Entry] = OrderedDict()
        self._running: OrderedDict[int, Entry] = OrderedDict()
        self._turn = 0  # one-per-pass mode: index of the next sequence to decode

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def phase(self, seq_id: int) -> Phase | None:
        entry = self._running.get(seq_id) or self._waiting.get(seq_id)
        return entry.phase if entry is not None else None

    def queue_position(self, seq_id: int) -> int | None:
        """0 for the head of the queue; None when not waiting."""
        for position, queued in enumerate(self._waiting):
            if queued == seq_id:
                return position
        return None

    def submit(self, seq_id: int, request: GenerationRequest) -> None:
        """Queues a sequence (FIFO).

        Raises:
            QueueFull: all ``max_running`` slots and ``max_waiting`` places are taken.
        """
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise QueueFull
        self._waiting[seq_id] = Entry(seq_id, request)

    def remove(self, seq_id: int) -> Entry | None:
        """Forgets a sequence wherever it is; returns its entry as it was (None: unknown)."""
        return self._waiting.pop(seq_id, None) or self._running.pop(seq_id, None)

    def plan(self, held: Container[int] = ()) -> StepPlan:
        """Admits waiters into free slots, then plans the next step (empty: nothing to do).

        ``held``: decoding sequences to skip this step (backpressure: their readers are behind); they keep
        their slot and KV and are decoded again once no longer held.
        """
        while self._waiting and self.running < self.max_running:
            _, entry = self._waiting.popitem(last=False)
            entry.phase = Phase.PREFILLING
            self._running[entry.seq_id] = entry
        prefill = self._plan_prefill()
        decoding = tuple(e.seq_id for e in self._running.values() if e.phase is Phase.DECODING and e.seq_id not in held)
        if self.batch_size == 1 and decoding:
            self._turn %= len(decoding)
            decoding = (decoding[self._turn],)
            self._turn += 1
        return StepPlan(prefill=prefill, decode=decoding)

    def _plan_prefill(self) -> tuple[PrefillChunk, ...]:
        """The oldest prefilling sequence's next chunk (its whole prompt with ``prefill_whole``), or, when its
        whole prompt fits the budget, it and the next whole prompts that fit along with it (left-padded to the
        longest, so budget = n * width)."""
        prefilling = [e for e in self._running.values() if e.phase is Phase.PREFILLING]
        if not prefilling:
            return ()
        head = prefilling[0]
        size = len(head.request.prompt_ids)
        images = head.request.images
        if head.prefilled > 0 or size > self.prefill_chunk or self.batch_size == 1 or images is not None:
            end = size if self.prefill_whole else min(head.prefilled + self.prefill_chunk, size)
            if images is not None and images.spans and head.prefilled == 0:
                # The images go through the model in the first chunk, all of them: a chunk that ended inside or
                # between them would hand the vision encoder part of a prompt's images.
                end = max(end, images.spans[-1][1])
            return (PrefillChunk(head.seq_id, head.request, head.prefilled, end),)
        group, width = [head], size
        for entry in prefilling[1:]:
            wider = max(width, len(entry.request.prompt_ids))
            if entry.prefilled > 0 or entry.request.images is not None or wider * (len(group) + 1) > self.prefill_chunk:
                break
            group.append(entry)
            width = wider
        return tuple(PrefillChunk(e.seq_id, e.request, 0, len(e.request.prompt_ids)) for e in group)

    def prefilled(self, chunk: PrefillChunk, held: int | None = None) -> None:
        """Records that ``chunk`` ran and the sequence now holds ``held`` prompt tokens (the chunk's end unless
        the runner said otherwise: a prefix-cache hit); with the whole prompt held, it decodes from the next
        step on."""
        entry = self._running.get(chunk.seq_id)
        if entry is None:
            return
        entry.prefilled = chunk.end if held is None else held
        if entry.prefilled >= len(chunk.request.prompt_ids):
            entry.phase = Phase.DECODING
