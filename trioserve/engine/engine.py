"""The trio side of generation: the step loop, per-request token streams, and cancellation bookkeeping.

One task (`Engine.run`, started with ``nursery.start`` by the app's lifespan) owns the runner. Each step it
asks the scheduler for a plan and runs it with ``trio.to_thread.run_sync(runner.step, ...)`` behind the
device's `CapacityLimiter`, so the event loop keeps serving I/O and noticing disconnects while the model
computes. Requests enter through `Engine.generate`, an async context manager: whatever ends the request's
scope (done, stop string, error, disconnect, deadline, drain) runs the same synchronous release.

Invariant: the runner is touched by one party at a time. While a step runs in its thread, releases are
queued and applied the moment it returns, before its results are delivered and before the next step is
planned; otherwise they are applied at once. So a released sequence's KV never reaches another forward pass.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from trioserve.config import ConfigError
from trioserve.engine.scheduler import Entry, Phase, QueueFull, Scheduler
from trioserve.engine.streams import Outbox, RequestRecord, SequenceState, TokenStream
from trioserve.errors import GenerationFailed, Overloaded, TrioserveError, Unavailable
from trioserve.types import FinishReason, GenerationRequest, Runner, SampledToken, StepOutput, StepPlan, TokenEvent

__all__ = ["Engine", "Offload", "RequestRecord", "TokenStream", "run_in_thread"]

logger = logging.getLogger(__name__)

# The event loop is "behind" when a finished step waits, on average, longer than this and a quarter step
# for the step loop to resume. Idle, the hand-back from the worker thread takes ~0.1 ms; a loop saturated by
# 64 streams, milliseconds. Relative to the step, because holding a token back costs a step of latency.
BEHIND_SECONDS = 0.001
# ... or when, as steps end, more than this share of the streams past their first token have not yet taken
# the previous step's token (on average): the loop cannot keep up with the streams, whatever the lag says
# (a step that waits for the GIL inside its thread, as a saturated loop makes it, shows no lag at all).
BEHIND_BACKLOG = 0.25


Offload = Callable[[Callable[[StepPlan], StepOutput], StepPlan, trio.CapacityLimiter], Awaitable[StepOutput]]


async def run_in_thread(
    step: Callable[[StepPlan], StepOutput], plan: StepPlan, limiter: trio.CapacityLimiter
) -> StepOutput:
    """How a step reaches the device: a worker thread holding a token of the device's limiter.

    Not cancellable once started (a forward pass cannot be interrupted); the engine accounts for that.
    """
    return await trio.to_thread.run_sync(step, plan, limiter=limiter)


class Engine:
    """Owns the runner and every sequence in flight.

    Args:
        load_runner: builds the runner (blocking; run in a thread). Called once, at startup with
            ``hotload`` or on the first request otherwise.
        max_concurrent: requests generating at once.
        max_queue: requests waiting for a slot; past it `submit` raises `Overloaded`.
        batch_size: sequences per decode pass (capped by the runner's own limit).
        prefill_chunk: prompt tokens per prefill step.
        hotload: load the runner in `run` before reporting started.
        limiter: the device's limiter; every forward pass holds a token of it.
        offload: how a step is run off the event loop (tests pass one that takes virtual time).
        history: how many finished requests `history` remembers.
        on_record: called with each request's record once its KV is released (metrics).
        max_unread: backpressure: a decoding sequence whose stream holds this many tokens it has not taken
            is skipped by the step loop (keeping its slot and KV) until the stream takes one. None: no bound.
    """

    def __init__(
        self,
        load_runner: Callable[[], Runner],
        *,
        max_concurrent: int,
        max_queue: int,
        batch_size: int,
        prefill_chunk: int = 512,
        hotload: bool = True,
        limiter: trio.CapacityLimiter | None = None,
        offload: Offload = run_in_thread,
        history: int = 1024,
        on_record: Callable[[RequestRecord], None] | None = None,
        max_unread: int | None = None,
    ) -> None:
        self._load_runner = load_runner
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._prefill_chunk = prefill_chunk
        self._hotload = hotload
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._offload = offload
        self.runner: Runner | None = None
        self.load_error: BaseException | None = None
        self._loaded = trio.Event()
        self._loading = False
        self._scheduler: Scheduler | None = None
        self._sequences: dict[int, SequenceState] = {}
        self._ids = itertools.count()
        self._wakeup = trio.Event()
        self._step_in_flight: StepPlan | None = None
        self._deferred_releases: list[SequenceState] = []
        self._step_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.history: deque[RequestRecord] = deque(maxlen=history)
        self._on_record = on_record
        self.failed_steps_in_a_row = 0
        self.loop_lag = 0.0  # seconds from a step's end to the step loop resuming (moving average)
        self.step_seconds = 0.0  # a step's own duration in its thread (moving average)
        self._step_ended = 0.0
        self.backlog = 0.0  # share of streams still holding the previous step's token as a step ends (average)
        self._outbox = Outbox()
        self.max_unread = max_unread

    # -- state for /health and metrics ----------------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether the event loop is late to pick up finished steps: it is saturated (by streams, mostly),
        so streams should take tokens two at a time (see `GenerationService._next`)."""
        return self.loop_lag > max(BEHIND_SECONDS, self.step_seconds / 4) or self.backlog > BEHIND_BACKLOG

    @property
    def loading(self) -> bool:
        return self._loading

    @property
    def running(self) -> int:
        return self._scheduler.running if self._scheduler is not None else 0

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting if self._scheduler is not None else 0

    @property
    def held(self) -> int:
        """Sequences not decoding because their streams' readers are behind (backpressure)."""
        return sum(sequence.held for sequence in self._sequences.values())

    @property
    def active(self) -> int:
        """Requests that hold a place in the engine (running or waiting)."""
        return len(self._sequences)

    def forward_passes(self, request_id: str) -> int | None:
        """Forward passes that carried a request so far, live or recently finished (None: unknown)."""
        for sequence in self._sequences.values():
            if sequence.request.request_id == request_id:
                return sequence.forward_passes
        return next((r.forward_passes for r in reversed(self.history) if r.request_id == request_id), None)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Loads the runner (with ``hotload``), reports started, then runs steps until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._outbox.run)
            if self._hotload:
                await self._load()
                if self.load_error is not None:
                    raise self.load_error
            task_status.started()
            await self._loaded.wait()
            if self.runner is not None:
                await self._step_loop(self.runner)

    async def _load(self) -> None:
        self._loading = True
        try:
            runner = await trio.to_thread.run_sync(self._load_runner, limiter=self.limiter)
        except ConfigError as exc:  # a model or setting this install cannot serve: the message says why
            logger.error("loading the model failed: %s", exc)
            self.load_error = exc
        except Exception as exc:
            logger.exception("loading the model failed")
            self.load_error = exc
        else:
            self.runner = runner
            batch_size = min(self._batch_size, runner.max_batch_size)
            self._scheduler = Scheduler(
                max_running=self._max_concurrent,
                max_waiting=self._max_queue,
                batch_size=batch_size,
                prefill_chunk=self._prefill_chunk,
                prefill_whole=runner.prefill_whole,
            )
            logger.info("model %s ready (batch size %d)", runner.model_id, batch_size)
        finally:
            self._loading = False
            self._loaded.set()

    async def ensure_loaded(self) -> Runner:
        """Returns the runner, loading it first if this is the first request (once, however many ask).

        Raises:
            Unavailable: the model failed to load.
        """
        if self.runner is None and self.load_error is None and not self._loading:
            assert self._nursery is not None, "Engine.run has not started"
            self._loading = True
            self._nursery.start_soon(self._load)
        await self._loaded.wait()
        if self.runner is None:
            raise Unavailable(f"the model failed to load: {self.load_error}")
        return self.runner

    # -- requests -------------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Admits a request (FIFO) and returns its token stream. Synchronous: the caller decides on the
        response status knowing whether there was room.

        Raises:
            Overloaded: every slot and queue place is taken.
            Unavailable: the model is not loaded (call `ensure_loaded` first).
        """
        if self._scheduler is None:
            raise Unavailable("the model is not loaded")
        seq_id = next(self._ids)
        try:
            self._scheduler.submit(seq_id, request)
        except QueueFull:
            raise Overloaded(
                f"the server is at capacity ({self._scheduler.max_running} running, "
                f"{self._scheduler.max_waiting} queued); retry later",
            ) from None
        send, receive = trio.open_memory_channel[TokenEvent | TrioserveError](math.inf)
        sequence = SequenceState(seq_id, request, send, submitted=trio.current_time())
        self._sequences[seq_id] = sequence
        self._wakeup.set()
        return TokenStream(sequence, receive, self)

    @asynccontextmanager
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenStream]:
        """`ensure_loaded`, `submit`, and a close on the way out, whatever the way out."""
        await self.ensure_loaded()
        async with self.submit(request) as stream:
            yield stream

    def leave(self, sequence: SequenceState, outcome: str, *, posted: bool = False) -> bool:
        """The one way out of the engine for a sequence; False if it had already left. Synchronous, so it
        runs to completion even inside a cancelled scope. ``posted``: its stream is closed through the
        outbox, after the events posted there (the step loop's way); otherwise at once, after them."""
        if sequence.outcome is not None:
            return False
        sequence.outcome = outcome
        sequence.left = trio.current_time()
        del self._sequences[sequence.seq_id]
        if posted:
            self._outbox.post(sequence.send, None)
        else:
            self._outbox.flush()
            sequence.send.close()
        assert self._scheduler is not None
        entry = self._scheduler.remove(sequence.seq_id)
        if entry is not None and self._runner_holds(entry):
            self._release(sequence)
        else:
            self._record(sequence)
        self._wakeup.set()  # a slot or a queue place is free
        return True

    def _record(self, sequence: SequenceState) -> None:
        assert sequence.outcome is not None
        record = RequestRecord(
            request_id=sequence.request.request_id,
            forward_passes=sequence.forward_passes,
            prompt_tokens=len(sequence.request.prompt_ids),
            cached_tokens=sequence.cached_tokens,
            generated=sequence.generated,
            outcome=sequence.outcome,
            submitted=sequence.submitted,
            started=sequence.started,
            left=sequence.left,
            released=trio.current_time(),
        )
        self.history.append(record)
        if self._on_record is not None:
            self._on_record(record)

    def _runner_holds(self, entry: Entry) -> bool:
        """Whether the runner has (or, mid-step, may be creating) state for this sequence."""
        in_flight = self._step_in_flight is not None and entry.seq_id in self._step_in_flight.seq_ids()
        return entry.phase is Phase.DECODING or entry.prefilled > 0 or in_flight

    def _release(self, sequence: SequenceState) -> None:
        if self._step_in_flight is not None:
            # The runner belongs to the step's thread until it returns; the step loop applies this then.
            sequence.release_pending = True
            self._deferred_releases.append(sequence)
        else:
            assert self.runner is not None
            self.runner.release(sequence.seq_id)
            self._record(sequence)

    def resume(self, sequence: SequenceState) -> None:
        """`StreamOwner.resume`: the next plan decides whether it is still held."""
        sequence.held = False
        self._wakeup.set()

    def _held(self) -> set[int]:
        """Backpressure: the sequences whose streams hold `max_unread` tokens or more, marked held. A client
        that reads slowly (or never: an HTTP/2 stream its client forgot) then costs a slot, not compute;
        the stream taking a token wakes the step loop (`resume`)."""
        limit = self.max_unread
        if limit is None:
            return set()
        held = set()
        for seq_id, sequence in self._sequences.items():
            sequence.held = sequence.unread >= limit
            if sequence.held:
                held.add(seq_id)
        return held

    async def wait_released(self, sequence: SequenceState) -> None:
        with trio.CancelScope(shield=True):
            while sequence.release_pending:
                await self._step_done.wait()

    # -- the step loop --------------------------------------------------------------------------------

    async def _step_loop(self, runner: Runner) -> None:
        assert self._scheduler is not None
        while True:
            plan = self._scheduler.plan(self._held())
            if not plan:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            now = trio.current_time()
            for seq_id in plan.seq_ids():
                sequence = self._sequences[seq_id]
                sequence.forward_passes += 1
                if sequence.started is None:
                    sequence.started = now
            self._step_in_flight = plan
            try:
                output = await self._offload(functools.partial(self._timed_step, runner), plan, self.limiter)
            except Exception as exc:
                self._apply_deferred_releases(runner)
                self.failed_steps_in_a_row += 1
                self._fail(plan, exc)
                continue
            except BaseException:
                # Cancelled (shutdown): `to_thread.run_sync` raises it only once the step's thread has
                # returned, so the runner is ours again. Apply the releases that waited for it, or their
                # shielded `wait_released` would wait forever.
                self._apply_deferred_releases(runner)
                raise
            self.failed_steps_in_a_row = 0
            self._note_cycle()
            self._apply_deferred_releases(runner)
            self._deliver(plan, output, runner)

    def _note_cycle(self) -> None:
        """Updates `loop_lag` and `backlog` as a finished step is picked up (before its tokens go out)."""
        self.loop_lag += 0.2 * (time.perf_counter() - self._step_ended - self.loop_lag)
        streaming = [s for s in self._sequences.values() if s.generated and not s.held]
        if streaming:
            late = sum(s.generated > s.taken for s in streaming) / len(streaming)
            self.backlog += 0.2 * (late - self.backlog)

    def _timed_step(self, runner: Runner, plan: StepPlan) -> StepOutput:
        """``runner.step``, noting when it returned (in the worker thread) for `loop_lag`."""
        started = time.perf_counter()
        output = runner.step(plan)
        self._step_ended = time.perf_counter()
        self.step_seconds += 0.2 * (self._step_ended - started - self.step_seconds)
        return output

    def _apply_deferred_releases(self, runner: Runner) -> None:
        self._step_in_flight = None
        releases, self._deferred_releases = self._deferred_releases, []
        for sequence in releases:
            runner.release(sequence.seq_id)
            sequence.release_pending = False
            self._record(sequence)
        self._step_done.set()
        self._step_done = trio.Event()

    def _fail(self, plan: StepPlan, exc: Exception) -> None:
        """A step raised: only the sequences it carried fail; the engine goes on with the rest."""
        logger.error("forward pass failed for %d sequence(s): %r", len(plan.seq_ids()), exc)
        error = exc if isinstance(exc, TrioserveError) else GenerationFailed(f"generation failed: {exc}")
        for seq_id in plan.seq_ids():
            sequence = self._sequences.get(seq_id)
            if sequence is not None:
                self._outbox.flush()
                sequence.send.send_nowait(error)
                self.leave(sequence, "error")

    def _deliver(self, plan: StepPlan, output: StepOutput, runner: Runner) -> None:
        assert self._scheduler is not None
        for chunk in plan.prefill:
            self._scheduler.prefilled(chunk, output.prefilled.get(chunk.seq_id))
        for seq_id, cached in output.cached.items():
            if (sequence := self._sequences.get(seq_id)) is not None:
                sequence.cached_tokens = cached
        for seq_id, token in output.tokens.items():
            sequence = self._sequences.get(seq_id)
            if sequence is None:
                continue  # it left while the step ran: the result is discarded, its rows already dropped
            sequence.generated += 1
            finish = self._finish_reason(sequence, token, runner)
            self._outbox.post(sequence.send, TokenEvent(token, finish))
            if finish is not None:
                self.leave(sequence, finish.value, posted=True)

    @staticmethod
    def _finish_reason(sequence: SequenceState, token: SampledToken, runner: Runner) -> FinishReason | None:
        params = sequence.request.params
        if token.token_id in runner.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if sequence.generated >= params.max_tokens:
            return FinishReason.LENGTH
        if len(sequence.request.prompt_ids) + sequence.generated >= runner.max_context:
            return FinishReason.LENGTH
        return None
