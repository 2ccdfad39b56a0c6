"""What a request holds while it generates: its `TokenStream`, the engine's state for its sequence, and the
`RequestRecord` kept once it has finished. The engine (`trioserve.engine`) owns every sequence; a stream
only asks its owner to let go of one (`StreamOwner`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from trioserve.errors import TrioserveError
from trioserve.types import GenerationRequest, TokenEvent


class StreamOwner(Protocol):
    """What a `TokenStream` needs of the engine that owns its sequence."""

    def leave(self, sequence: SequenceState, outcome: str) -> bool:
        """Takes the sequence out (synchronously); True if it was still live."""
        ...

    async def wait_released(self, sequence: SequenceState) -> None:
        """Returns once the runner has dropped the sequence's KV (at most the rest of one step)."""
        ...

    def resume(self, sequence: SequenceState) -> None:
        """The stream of a sequence held back (too many unread tokens) has taken some: decode it again."""
        ...


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the engine remembers of a finished request (a bounded history, and the metrics observer).

    Times are ``trio.current_time()`` values; ``started`` is None if it never reached a forward pass.
    """

    request_id: str
    forward_passes: int
    prompt_tokens: int
    generated: int
    outcome: str  # a FinishReason value; "error"; or "closed": the request left before the sequence ended
    submitted: float
    started: float | None
    left: float  # when it left the engine (finished, failed, or closed)
    released: float  # when the runner dropped its KV (== left unless a step was in flight)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def queue_seconds(self) -> float:
        return (self.started if self.started is not None else self.left) - self.submitted

    @property
    def release_seconds(self) -> float:
        """From leaving to the KV being gone: at most the rest of the step in flight."""
        return self.released - self.left


@dataclass(eq=False)
class SequenceState:
    """The engine's bookkeeping for one sequence (one choice of one request)."""

    seq_id: int
    request: GenerationRequest
    send: trio.MemorySendChannel[TokenEvent | TrioserveError]
    submitted: float = 0.0
    started: float | None = None
    left: float = 0.0
    generated: int = 0
    taken: int = 0  # token events its stream has taken (fewer than generated: the stream is behind)
    forward_passes: int = 0
    cached_tokens: int = 0  # prompt tokens the runner took from the prefix cache (known after its first chunk)
    outcome: str | None = None  # set once the sequence has left the engine
    release_pending: bool = False  # left during a step; the runner forgets it when that step returns
    held: bool = False  # skipped by the step loop: its stream holds too many unread tokens (backpressure)

    @property
    def unread(self) -> int:
        """Tokens generated that its stream has not taken yet (waiting in the channel or the outbox)."""
        return self.generated - self.taken


class Outbox:
    """Token events the step loop posts, handed to their streams by a task of their own (`run`).

    Sending to a stream wakes its task; woken by the step loop itself, every stream would run before the
    step loop gets to start the next step (trio's thread hand-off passes through a scheduling round first),
    so the streams' work and the step would follow each other instead of overlapping. Posted here, the
    events reach the streams one scheduling round later, by which time the next step is on its way. Events
    posted for one stream keep their order, and its close (``None``) comes after them.
    """

    def __init__(self) -> None:
        self._posted: list[tuple[trio.MemorySendChannel[TokenEvent | TrioserveError], TokenEvent | None]] = []
        self._lot = trio.lowlevel.ParkingLot()

    def post(self, send: trio.MemorySendChannel[TokenEvent | TrioserveError], event: TokenEvent | None) -> None:
        """Queues ``event`` for the stream behind ``send`` (``None``: close it)."""
        if not self._posted:
            self._lot.unpark_all()
        self._posted.append((send, event))

    def flush(self) -> None:
        """Hands every posted event over now (before anything else reaches the same streams)."""
        posted, self._posted = self._posted, []
        for send, event in posted:
            try:
                if event is None:
                    send.close()
                else:
                    send.send_nowait(event)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the stream was closed (its request left) after the event was posted

    async def run(self) -> None:
        try:
            while True:
                if not self._posted:
                    await self._lot.park()
                self.flush()
        finally:  # cancelled (shutdown): what was posted still goes out
            self.flush()


class TokenStream:
    """A request's handle on its sequence: async-iterate it for `TokenEvent`s; close it to release.

    Closing is synchronous and idempotent, and it is the whole of cancellation: the sequence leaves the
    queue or the batch, its KV is dropped (after the step in flight, if any), its slot goes to the next
    waiter. Use it as a context manager so every exit path closes it.

    Raises from iteration:
        GenerationFailed: the forward pass carrying this sequence failed.
    """

    def __init__(
        self,
        sequence: SequenceState,
        receive: trio.MemoryReceiveChannel[TokenEvent | TrioserveError],
        owner: StreamOwner,
    ) -> None:
        self._sequence = sequence
        self._receive = receive
        self._owner = owner
        self._taken: list[TokenEvent] = []  # received, not yet handed out
        self._failure: TrioserveError | None = None  # received behind `_taken`; raised once they are out
        self._ended = False

    @property
    def request_id(self) -> str:
        return self._sequence.request.request_id

    @property
    def finished(self) -> bool:
        return self._sequence.outcome is not None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache (set before the sequence's first token arrives)."""
        return self._sequence.cached_tokens

    def close(self) -> bool:
        """Releases the sequence; True if it was still live (i.e. this call cut it short). Iteration then
        ends (without a finish reason, if the sequence had not finished).

        A stream cut short drops the tokens it had not handed out yet: whoever cut it (the drain, a
        deadline) wants its end out now, not after a backlog a slow client would take long to read.

        If a step carrying the sequence is running, its KV is dropped the moment that step returns; use
        ``async with`` (or `aclose`) to also wait for that.
        """
        cut = self._owner.leave(self._sequence, "closed")
        if cut:
            self._drop_unread()
        return cut

    def _drop_unread(self) -> None:
        self._taken.clear()
        while True:
            try:
                item = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(item, TrioserveError):
                self._failure = item

    async def aclose(self) -> None:
        """`close`, then wait until the KV is actually gone (at most the rest of one step; shielded)."""
        self.close()
        await self._owner.wait_released(self._sequence)

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._taken:
            return self._taken.pop(0)
        self._raise_held_failure()
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        if isinstance(item, TrioserveError):
            raise item
        self._note_taken()
        return item

    async def receive_ready(self, at_least: int = 1, at_most: int | None = None) -> list[TokenEvent]:
        """Waits for events, then takes every event already waiting too, in order; an empty list at the
        end of the stream. Returns once it holds ``at_least`` events, or the sequence has finished, ended
        or failed.

        A consumer that fell behind (a slow client, a busy event loop) thus catches up in one go and can
        send what it took as one chunk; ``at_most`` bounds that chunk (the rest stays for the next call).
        Events taken before a cancellation (a deadline) are not lost: the next call, or `take_received`,
        returns them.

        Raises:
            GenerationFailed: the forward pass carrying this sequence failed (once the events before the
                failure have been returned).
        """
        # A cancellation point even when events are waiting: a passed deadline is noticed at every call.
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._holds(at_least):
            try:
                item = await self._receive.receive()
            except trio.EndOfChannel:
                self._ended = True
                break
            self._take(item)
        if not self._taken:
            self._raise_held_failure()
        if at_most is not None and len(self._taken) > at_most:
            events, self._taken = self._taken[:at_most], self._taken[at_most:]
            return events
        return self.take_received()

    def take_received(self) -> list[TokenEvent]:
        """The events a cancelled `receive_ready` had already taken from the channel (often none)."""
        events, self._taken = self._taken, []
        return events

    def _holds(self, at_least: int) -> bool:
        self._drain()
        taken = self._taken
        finished = bool(taken) and taken[-1].finish_reason is not None
        return self._ended or self._failure is not None or finished or len(taken) >= at_least

    def _take(self, item: TokenEvent | TrioserveError) -> None:
        if isinstance(item, TrioserveError):
            self._failure = item  # raised once the events before it have been handed out
        else:
            self._taken.append(item)
            self._note_taken()

    def _note_taken(self) -> None:
        sequence = self._sequence
        sequence.taken += 1
        if sequence.held:
            self._owner.resume(sequence)

    def _drain(self) -> None:
        receive_nowait = self._receive.receive_nowait
        while self._failure is None:
            try:
                item = receive_nowait()
            except trio.WouldBlock:
                return
            except trio.EndOfChannel:
                self._ended = True
                return
            self._take(item)

    def _raise_held_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
