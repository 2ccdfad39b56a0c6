"""Workarounds for Hypercorn 0.18 bugs, each in a subclass named for what it fixes; `install()` puts them in place.

Every class here is a thin subclass of a Hypercorn class that overrides only the broken step, and every fix
names its upstream issue. ``tests/test_hardening.py`` holds, for each, a canary test that runs the unfixed
Hypercorn class and asserts the bug is still there: when a Hypercorn release fixes it, the canary fails and
the workaround can be deleted.

    ContainedTCPServer (hypercorn.trio.tcp_server.TCPServer)
        - (a shortcut, not a fix) HTTP/1.1 data for a plain socket is written at once when nothing else is
          sending (`ContainedTCPServer._send_now`), without Hypercorn's lock, shield and trio's checkpoints.
        - an exception in one connection's tasks (an HTTP/2 priority-tree overflow, a KeyError on a dropped
          stream) propagates into the server's nursery and ends the process: contained to the connection,
          which is closed (pgjones/hypercorn#197, #329: one connection's error ends the server).
        - (issues #23, #24) Hypercorn's writes are shielded and unbounded: a client that stops reading holds
          its request, and at shutdown the process, forever. Every write is bounded by the send timeout
          and the drain's deadline, and a stalled connection is aborted (`trioserve.server.sendguard`).
        - closing while the client is still sending (an early 413) makes the kernel reset the connection,
          so the client may never read the response: half-close, then discard what still arrives, bounded
          in bytes and time, before closing (RFC 9112 §9.6 "tear-down"; nginx's lingering_close).
    RecyclingH11Protocol (hypercorn.protocol.h11.H11Protocol)
        - the last ``send`` of a response runs the connection's recycle step (re-arm the keep-alive timer,
          or close) inside the app's task; quart-trio cancels that task as soon as it hears the
          ``http.disconnect`` that the recycle itself emits, so the timer is never re-armed and a
          connection that must close never closes. Shielded here (related: pgjones/hypercorn#106, #210;
          no upstream issue for this exact cancellation was found).
        - an answer sent before the request body was read, a request with both Content-Length and
          Transfer-Encoding (RFC 9112 §6.3), and any answer during shutdown get ``Connection: close``.
    GuardedH2Protocol (hypercorn.protocol.h2.H2Protocol)
        - frames for a stream Hypercorn already dropped raise KeyError (pgjones/hypercorn#197, #329;
          fixes proposed in #312, #334, #365): acknowledged for flow control, flushed, and dropped.
        - a client reset leaves the stream in the priority tree until the send task gets to it; a rapid
          reset flood overflows the tree (priority.TooManyStreamsError at 1001 streams; #146 answered
          the CVE-2023-44487 report with keep_alive_max_requests only): the stream is forgotten at once,
          and a per-connection reset budget (as Envoy's premature-reset check) ends an abusive
          connection with GOAWAY(ENHANCE_YOUR_CALM).
        - a stream over SETTINGS_MAX_CONCURRENT_STREAMS ends the whole connection (pgjones/hypercorn#335):
          refused alone with RST_STREAM(REFUSED_STREAM) (RFC 9113 §5.1.2), see `RefusingH2Connection`.
        - after shutdown begins, or after the per-connection request limit, Hypercorn resets new streams
          with NO_ERROR (which no client retries) or sends a GOAWAY while streams still run (which h2-based
          clients such as httpx cannot survive): new streams are refused with REFUSED_STREAM, and
          GOAWAY(NO_ERROR) goes out once the connection is idle, then it closes.
        - a stream whose flow-control window is exhausted is "sent" 0 bytes, and that empty pop releases the
          app's writer (``StreamBuffer.pop``): the response piles up in memory and the app never feels
          backpressure (no upstream issue found). Such a stream is blocked until its window reopens
          (its canary is in ``tests/test_stalls.py``).
        - a response the app ends before its body is complete (a send timeout, the drain's deadline, a
          crash) is dropped by Hypercorn without a frame, so its client waits forever: RST_STREAM(CANCEL).
        - an answer completed before the request body ends is followed by RST_STREAM(NO_ERROR), which
          releases the client's upload (RFC 9113 §8.1), whichever comes first: the app's close or the send
          task's end of the stream (trio may run either first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import h11
import trio
from hypercorn import protocol as hypercorn_protocol
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer

from trioserve.server.h2_fixes import GuardedH2Protocol
from trioserve.server.sendguard import STALLED_KEY, GuardedSocketStream, SendLimits, limit_unsent

logger = logging.getLogger("trioserve")

LINGER_SECONDS = 1.0  # how long a closing connection keeps discarding what the client still sends
LINGER_BYTES = 1 << 20  # and how much of it


class ContainedTCPServer(TCPServer):
    """One connection: its failure stays its own, and its close lets the client read the last response."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Every write bounded by the send timeout and the drain's deadline (see `sendguard`); the server's
        # `SendLimits` ride on Hypercorn's config (`cli.hypercorn_config`), unbounded where none is set.
        limits = getattr(self.config, "send_limits", None) or SendLimits()
        if isinstance(self.stream, trio.SocketStream):
            limit_unsent(self.stream.socket)
            self.stream = GuardedSocketStream(self.stream, limits, self._mark_stalled)
        elif isinstance(self.stream, trio.SSLStream) and isinstance(self.stream.transport_stream, trio.SocketStream):
            limit_unsent(self.stream.transport_stream.socket)
            self.stream.transport_stream = GuardedSocketStream(self.stream.transport_stream, limits, self._mark_stalled)  # type: ignore[assignment]
        self._reading = False
        self._linger_deadline = math.inf  # finite once the protocol asked to close while the reader runs

    def _mark_stalled(self) -> None:
        """Marks the ASGI scope of every request on this connection: the abort that is about to end them is a
        stall (`sendguard`), which the app counts as such (`TrioserveConnection`), not a client's close."""
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        streams = [*getattr(protocol, "streams", {}).values(), getattr(protocol, "stream", None)]
        for stream in streams:
            scope = getattr(stream, "scope", None)
            if isinstance(scope, dict):
                scope[STALLED_KEY] = True

    async def run(self) -> None:
        try:
            await super().run()
        except* Exception:
            # super().run() has closed the stream in its finally clause; trio.Cancelled is not an
            # Exception, so cancellation passes through untouched.
            logger.exception("connection error; closing that connection only")

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            sent = self._send_now(event.data)
            if sent == len(event.data):
                return
            if sent:
                # The rest goes the usual way, shielded: a cancellation now would leave half a frame.
                with trio.CancelScope(shield=True):
                    await super().protocol_send(RawData(event.data[sent:]))
                return
        await super().protocol_send(event)

    def _send_now(self, data: bytes) -> int:
        """Writes what the kernel takes of ``data`` at once, when the connection is HTTP/1.1 on a plain socket
        and no other task is sending; returns how much (0: none, or not tried).

        Not a fix: a shortcut. Hypercorn's send enters a shielded cancel scope and the connection's send lock,
        and trio's ``send_all`` checkpoints twice: ~20 µs of the event loop per SSE event (trio 0.35, CPython
        3.11), of the ~150 µs of server CPU an event costs (`./dev bench --instant`, 2-core machine). Nothing
        here awaits, so the write is atomic for trio's scheduler; a full socket buffer, an error or a TLS
        stream (not a plain socket) leave it to Hypercorn's path, which reports errors as it always does. Not
        HTTP/2 (yet): there the connection's send task writes everything, and without the checkpoints of
        Hypercorn's path it would hold the loop for as long as it has data and window. (Tried: with
        `GuardedH2Protocol` ending early answers from the send task too, the suite passes with it on.)
        """
        if self.send_lock.locked() or not isinstance(self.stream, GuardedSocketStream):
            return 0
        if not isinstance(getattr(self.protocol, "protocol", None), H11Protocol):
            return 0  # HTTP/2: see above
        try:
            return os.write(self.stream.socket.fileno(), data)
        except OSError:  # BlockingIOError (buffer full) included
            return 0

    async def _close(self) -> None:
        if not self._reading or self._linger_deadline < math.inf:
            await super()._close()
            return
        # The client may still be sending (an early answer): half-close and let the reader discard the
        # rest, bounded, then close. Closing at once would make the kernel answer with a reset that can
        # destroy the response still unread in the client's buffer.
        self._linger_deadline = trio.current_time() + LINGER_SECONDS
        with contextlib.suppress(
            trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError, AttributeError
        ):
            await self.stream.send_eof()  # a TLS stream has none: its close_notify comes with aclose

    async def _read_data(self) -> None:
        self._reading = True
        discarded = 0
        try:
            while True:
                timeout = self.config.read_timeout or math.inf
                with trio.move_on_at(min(trio.current_time() + timeout, self._linger_deadline)):
                    try:
                        data = await self.stream.receive_some(MAX_RECV)
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break
                    if self._linger_deadline < math.inf:
                        discarded += len(data)
                        if data and discarded <= LINGER_BYTES:
                            continue
                        break
                    await self.protocol.handle(RawData(bytes(data)))
                    if data == b"":
                        break
                    continue
                break  # read timeout or linger deadline
        finally:
            self._reading = False
        await self.protocol.handle(Closed())


def _with_header(response: Response, name: bytes, value: bytes) -> Response:
    if any(key.lower() == name for key, _ in response.headers):
        return response
    return dataclasses.replace(response, headers=[*response.headers, (name, value)])


class RecyclingH11Protocol(H11Protocol):
    """HTTP/1.1: the recycle step always runs, and connections that cannot be reused say so."""

    _ambiguous_length = False  # this request had both Content-Length and Transfer-Encoding

    async def _create_stream(self, request: Any) -> None:
        names = {name.lower() for name, _ in request.headers}
        self._ambiguous_length = b"content-length" in names and b"transfer-encoding" in names
        await super()._create_stream(request)

    async def stream_send(self, event: StreamEvent) -> None:
        if isinstance(event, Response) and event.status_code >= 200 and self._must_close():
            event = _with_header(event, b"connection", b"close")
        if isinstance(event, StreamClosed):
            with trio.CancelScope(shield=True):  # see the module docstring: runs in the app's task
                await super().stream_send(event)
            return
        await super().stream_send(event)

    def _must_close(self) -> bool:
        body_unread = self.connection.their_state is not h11.DONE
        return body_unread or self._ambiguous_length or self.context.terminated.is_set()


# (module, name, fixed class): where Hypercorn's trio worker looks each class up when it needs one.
_PATCHES: tuple[tuple[object, str, type], ...] = (
    (hypercorn_run, "TCPServer", ContainedTCPServer),
    (hypercorn_protocol, "H11Protocol", RecyclingH11Protocol),
    (hypercorn_protocol, "H2Protocol", GuardedH2Protocol),
)
_ORIGINALS = {name: getattr(module, name) for module, name, _ in _PATCHES}


def install() -> None:
    """Makes Hypercorn's trio worker use the fixed classes (idempotent)."""
    for module, name, fixed in _PATCHES:
        setattr(module, name, fixed)


@contextlib.contextmanager
def uninstalled() -> Iterator[None]:
    """Hypercorn as released, for the canary tests that prove each workaround is still needed."""
    current = {name: getattr(module, name) for module, name, _ in _PATCHES}
    for module, name, _ in _PATCHES:
        setattr(module, name, _ORIGINALS[name])
    try:
        yield
    finally:
        for module, name, _ in _PATCHES:
            setattr(module, name, current[name])
