"""Hypercorn's HTTP/2 protocol, fixed: see `trioserve.server.hypercorn_fixes` for the list of bugs, their
upstream issues and the canary tests that tell when each workaround can go.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.stream import StreamState
from hypercorn.events import Closed, Updated
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from priority import MissingStreamError  # type: ignore[attr-defined]

logger = logging.getLogger("trioserve")

RESET_BUDGET = 100  # client resets (or refused streams) a connection may cause before ENHANCE_YOUR_CALM


class RefusingH2Connection(h2.connection.H2Connection):
    """h2's connection, refusing a stream over the advertised concurrency limit instead of failing all.

    h2 raises TooManyStreamsError (a connection error) before decoding the header block; Hypercorn then
    ends every stream on the connection (pgjones/hypercorn#335). RFC 9113 §5.1.2 allows a stream error:
    the header block is still decoded (HPACK state is shared by the connection), then the stream alone is
    reset with REFUSED_STREAM, which tells the client it may retry it.
    """

    refused = 0

    def _receive_headers_frame(self, frame: Any) -> Any:
        limit = self.local_settings.max_concurrent_streams
        if frame.stream_id in self.streams or self.open_inbound_streams < limit:
            return super()._receive_headers_frame(frame)
        self.refused += 1
        with _raised_limit(self.local_settings):
            super()._receive_headers_frame(frame)  # decodes headers and opens the stream; events dropped
        self.reset_stream(frame.stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
        return [], []


@contextlib.contextmanager
def _raised_limit(settings: h2.settings.Settings) -> Iterator[None]:
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    values = settings._settings[code]
    saved = values[0]
    values[0] = 2**31 - 1
    try:
        yield
    finally:
        values[0] = saved


class GuardedH2Protocol(H2Protocol):
    """HTTP/2: per-connection failures stay per-connection; resets, refusals and GOAWAY as RFC 9113 says."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        local_settings = self.connection.local_settings
        self.connection = RefusingH2Connection(config=self.connection.config)
        self.connection.DEFAULT_MAX_INBOUND_FRAME_SIZE = self.config.h2_max_inbound_frame_size
        self.connection.local_settings = local_settings
        self.premature_resets = 0  # client resets of streams still being answered
        self.refused_late = 0  # streams opened after our GOAWAY
        self.retiring = False  # past the per-connection request limit: no new streams, close when idle
        self._goaway_scope = trio.CancelScope()

    async def initiate(self, headers: Any = None, settings: Any = None) -> None:
        await super().initiate(headers, settings)
        self.task_group.spawn(self._goaway_on_shutdown)

    async def _goaway_on_shutdown(self) -> None:
        with self._goaway_scope:
            await self.context.terminated.wait()
            if self.idle:
                await self._goaway_and_close()

    async def _goaway_and_close(self) -> None:
        """GOAWAY(NO_ERROR), then close: only once no stream is running.

        A GOAWAY while streams run would be RFC-correct, but h2 (and so httpx and httpcore) moves its
        connection to CLOSED on receiving one and then rejects the DATA of the streams still running. So
        while streams run, new ones are refused with REFUSED_STREAM instead (safe to retry elsewhere).
        """
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.close_connection()
        await self._flush()
        await self.send(Closed())

    async def handle(self, event: Any) -> None:
        if isinstance(event, Closed):
            self._goaway_scope.cancel()
        await super().handle(event)

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if self.closed:
                return
            if isinstance(event, h2.events.RequestReceived):
                await self._request_received(event)
            elif isinstance(event, (h2.events.DataReceived, h2.events.StreamEnded)) and (
                event.stream_id not in self.streams
            ):
                # A stream already answered and dropped: acknowledge its data so the window reopens.
                if isinstance(event, h2.events.DataReceived):
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                if event.stream_id in self.streams:
                    self.premature_resets += 1
                await super()._handle_events([event])
                await self._forget(event.stream_id)
            else:
                await super()._handle_events([event])
            if self._over_budget():
                await self._calm_down()
                return
        await self._flush()

    async def _request_received(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None
        if self.retiring or self.context.terminated.is_set():
            self.refused_late += 1
            self.connection.reset_stream(event.stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        await self._create_stream(event)
        await self.send(Updated(idle=False))
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            self.retiring = True  # Hypercorn would send GOAWAY here, breaking h2 clients' running streams

    def _over_budget(self) -> bool:
        refused = self.connection.refused + self.refused_late  # type: ignore[attr-defined]
        resets = self.premature_resets
        # Envoy's rule: a connection whose streams are mostly reset before their answer is an attack.
        return (resets >= RESET_BUDGET and 2 * resets > self.keep_alive_requests) or refused >= RESET_BUDGET

    async def _calm_down(self) -> None:
        logger.warning(
            "HTTP/2 client %s: %d resets, %d refused streams in %d: GOAWAY(ENHANCE_YOUR_CALM)",
            self.client,
            self.premature_resets,
            self.connection.refused + self.refused_late,  # type: ignore[attr-defined]
            self.keep_alive_requests,
        )
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await self._flush()
        await self.send(Closed())

    async def _forget(self, stream_id: int) -> None:
        """Drops a stream's send buffer and priority entry now, not when the send task reaches it."""
        buffer = self.stream_buffers.pop(stream_id, None)
        if buffer is not None:
            await buffer.close()
        with contextlib.suppress(MissingStreamError):
            self.priority.remove_stream(stream_id)

    async def _send_data(self, stream_id: int) -> None:
        if stream_id not in self.stream_buffers:
            with contextlib.suppress(MissingStreamError):
                self.priority.remove_stream(stream_id)
            return
        if self._window_closed(stream_id):
            # Hypercorn pops 0 bytes here, and an empty pop releases the app's writer (`StreamBuffer.pop`
            # sets `_paused`): a stream its client does not read buffered the whole response in memory,
            # and the app never felt backpressure. Blocked instead until a WINDOW_UPDATE unblocks it.
            self.priority.block(stream_id)
            return
        with contextlib.suppress(KeyError):  # forgotten (reset) while this task was flushing
            await super()._send_data(stream_id)
        if stream_id not in self.stream_buffers:
            # This task just ended the stream: if that was an early answer, the client is still sending.
            # (`_end_early_answer` covers the other order, when the app's close comes first.)
            await self._reset_if_still_receiving(stream_id)

    def _window_closed(self, stream_id: int) -> bool:
        """Whether the stream has data waiting and its client's flow-control window has no room for any."""
        if not self.stream_buffers[stream_id].buffer:
            return False
        try:
            return self.connection.local_flow_control_window(stream_id) <= 0
        except (h2.exceptions.ProtocolError, KeyError):
            return False  # the stream is gone: Hypercorn's own path drops its buffer

    async def _reset_if_still_receiving(self, stream_id: int) -> None:
        stream = self.connection.streams.get(stream_id)
        if stream is None or stream.state_machine.state is not StreamState.HALF_CLOSED_LOCAL:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.NO_ERROR)
        await self._flush()

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, StreamClosed):
            with trio.CancelScope(shield=True):  # as in RecyclingH11Protocol: runs in the app's task
                await self._cancel_unfinished(event.stream_id)
                await self._end_early_answer(event.stream_id)
                await super().stream_send(event)
                if self.retiring and self.idle:
                    await self._goaway_and_close()
            return
        await super().stream_send(event)

    async def _cancel_unfinished(self, stream_id: int) -> None:
        """The app ended before its response did (a send timeout, the drain's deadline, a crash): reset the
        stream with CANCEL, so the client knows the answer is cut, and drop what waits in its send buffer.

        Hypercorn forgets such a stream without a frame: the client would wait for the rest forever, and
        the buffer, blocked on the stream's window, would stay for the connection's life.
        """
        stream = self.connection.streams.get(stream_id)
        buffer = self.stream_buffers.get(stream_id)
        if stream is None or buffer is None or buffer._complete or stream.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
        await self._forget(stream_id)
        await self._flush()

    async def _end_early_answer(self, stream_id: int) -> None:
        """After a complete answer, RST_STREAM(NO_ERROR) if the client is still sending its body."""
        stream = self.connection.streams.get(stream_id)
        buffer = self.stream_buffers.get(stream_id)
        if stream is None or buffer is None or not buffer.complete:
            return
        if stream.state_machine.state not in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL):
            return  # the request body has ended: the send task ends the stream normally
        with contextlib.suppress(h2.exceptions.ProtocolError):
            if stream.state_machine.state is StreamState.OPEN:
                self.connection.end_stream(stream_id)
            self.connection.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.NO_ERROR)
        await self._forget(stream_id)
        await self._flush()
