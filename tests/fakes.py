"""A fake runner for engine tests: no model, deterministic tokens, steps that take virtual time.

What it fakes: the forward pass (tokens come from a hash of the request id and position). What it keeps
real: one `DynamicCache` object per sequence, dropped on `release` (so tests can hold weakrefs to them),
and a check, at the start of every step, that no released sequence reaches a forward pass.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from transformers import DynamicCache

from trioserve.errors import InvalidRequest
from trioserve.types import OutputSchema, SampledToken, StepOutput, StepPlan

PREFILL_SECONDS = 0.010  # virtual time of one prefill chunk
DECODE_SECONDS = 0.005  # virtual time of one decode pass, whatever the batch size


@dataclass
class Pass:
    """One recorded step: when it started and ended (virtual time), and what it carried."""

    started: float
    ended: float
    plan: StepPlan


def fake_token(request_id: str, position: int, vocab: int = 50) -> int:
    digest = hashlib.sha256(f"{request_id}:{position}".encode()).digest()
    return 2 + digest[0] % (vocab - 2)  # 0 and 1 are reserved (1 is EOS)


@dataclass
class FakeRunner:
    max_batch_size: int = 8
    prefill_whole: bool = False
    max_context: int = 4096
    model_id: str = "fake"
    eos_token_ids: frozenset[int] = frozenset({1})
    vocab_size: int = 50
    fail_when: Callable[[StepPlan], BaseException | None] = lambda plan: None
    caches: dict[int, DynamicCache] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    requests: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    passes: list[Pass] = field(default_factory=list)

    tokenizer: object = None  # engine tests never detokenize; serving tests plug in the tiny real one

    def compile_grammar(self, spec: OutputSchema) -> str:
        raise InvalidRequest(
            "grammars are not available for this model: the fake runner samples no logits", param=spec.param
        )

    def live_sequences(self) -> int:
        return len(self.caches)

    def kv_tokens(self) -> int:
        return sum(self.positions.values())

    def prefix_cache_stats(self) -> None:
        return None  # it keeps no cache

    def cache_ref(self, seq_id: int) -> weakref.ref[DynamicCache]:
        return weakref.ref(self.caches[seq_id])

    def release(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)
        self.positions.pop(seq_id, None)
        self.released.append(seq_id)

    def step(self, plan: StepPlan) -> StepOutput:
        for seq_id in plan.seq_ids():
            assert seq_id not in self.released, f"released sequence {seq_id} reached a forward pass"
        error = self.fail_when(plan)
        if error is not None:
            raise error
        tokens: dict[int, SampledToken] = {}
        for chunk in plan.prefill:
            if chunk.start == 0:
                self.caches[chunk.seq_id] = DynamicCache()
                self.requests[chunk.seq_id] = chunk.request.request_id
                self.positions[chunk.seq_id] = 0
            if chunk.is_last:
                tokens[chunk.seq_id] = self._next(chunk.seq_id)
        for seq_id in plan.decode:
            assert seq_id in self.caches, f"sequence {seq_id} decoded before its prefill"
            tokens[seq_id] = self._next(seq_id)
        return StepOutput(tokens)

    def _next(self, seq_id: int) -> SampledToken:
        position = self.positions[seq_id]
        self.positions[seq_id] = position + 1
        return SampledToken(fake_token(self.requests[seq_id], position, self.vocab_size))

    def cost(self, plan: StepPlan) -> float:
        return (PREFILL_SECONDS if plan.prefill else 0.0) + (DECODE_SECONDS if plan.decode else 0.0)

    async def offload(
        self, step: Callable[[StepPlan], StepOutput], plan: StepPlan, limiter: trio.CapacityLimiter
    ) -> StepOutput:
        """Stands in for a worker thread: holds the limiter, takes virtual time, cannot be cancelled."""
        started = trio.current_time()
        with trio.CancelScope(shield=True):
            async with limiter:
                await trio.sleep(self.cost(plan))
                output = step(plan)
        self.passes.append(Pass(started, trio.current_time(), plan))
        # As `trio.to_thread.run_sync`: a cancellation that arrived meanwhile is raised now, result discarded.
        await trio.lowlevel.checkpoint_if_cancelled()
        return output

    def passes_carrying(self, seq_id: int) -> list[Pass]:
        return [p for p in self.passes if seq_id in p.plan.seq_ids()]
