"""Bounded sends: a connection whose client takes nothing for the send timeout, or that still cannot take
its last bytes when the drain's deadline comes, is aborted.

Hypercorn writes every response byte inside a shielded cancel scope (so a cancellation never leaves half a
frame), and trio's ``send_all`` waits as long as the kernel's send buffer stays full: a client that stops
reading holds that write, its request, its slot and, at shutdown, the whole process (issues #23, #24).
`GuardedSocketStream` replaces the socket stream under Hypercorn (plain connections) or under trio's
``SSLStream`` (TLS), and bounds each write:

- by progress, like nginx's ``send_timeout``: the write fails once the client has taken nothing for
  `SendLimits.timeout` seconds. Progress is what leaves the kernel's send queue (Linux ``SIOCOUTQ``), not
  only what the kernel accepts from us: Linux reports a socket writable only once a third of its send
  buffer is free, which a slow but live reader may take longer than the timeout to free;
- by the drain: after `SendLimits.hard_deadline` no write waits at all.

A failed write aborts the connection (``SO_LINGER`` 0: a reset, the unsent bytes discarded), so the client
can tell it from a complete response, and the reader task and the app hear of it as a disconnect.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import math
import os
import socket as stdlib_socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

logger = logging.getLogger("trioserve")

STALLED_KEY = "trioserve.stalled"  # set in the ASGI scope of the requests a stalled connection ends
_OUTQ = getattr(termios, "TIOCOUTQ", None)  # == SIOCOUTQ on Linux: bytes the peer has not acknowledged yet
_POLLS_PER_TIMEOUT = 4  # how often a blocked write looks at the kernel's queue within one timeout


@dataclass
class SendLimits:
    """Shared by every connection of a server: the send timeout, and the drain's hard deadline (trio time)."""

    timeout: float = math.inf
    hard_deadline: float = math.inf
    blocked: set[trio.CancelScope] = field(default_factory=set)  # writes waiting for their client now

    def end_by(self, deadline: float) -> None:
        """The drain: no write waits past ``deadline``, those already waiting included."""
        self.hard_deadline = min(self.hard_deadline, deadline)
        for scope in self.blocked:
            scope.deadline = min(scope.deadline, deadline)


class SendStalled(trio.BrokenResourceError):
    """The client took nothing for the send timeout, or the drain's deadline passed: the connection is aborted."""


UNSENT_LOWAT = 16 * 1024  # TCP_NOTSENT_LOWAT: bytes the kernel may hold not yet sent, per connection


def limit_unsent(sock: trio.socket.SocketType) -> None:
    """Keeps at most `UNSENT_LOWAT` unsent bytes in the kernel's queue (Linux, macOS: TCP_NOTSENT_LOWAT).

    By default the kernel takes megabytes a slow client has not asked for yet (the send buffer grows to
    ``tcp_wmem``'s maximum), and whatever it holds goes out before anything written later: a stream's last
    event (the drain's error event) would wait behind all of it. Bounded, what we write waits in our own
    buffers, where a cut can drop it (`TokenStream.close`). Fast clients lose nothing: HTTP/2 servers use
    the same bound for the same reason (prioritization behind a full queue).
    """
    option = getattr(stdlib_socket, "TCP_NOTSENT_LOWAT", None)
    if option is None or sock.family not in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(stdlib_socket.IPPROTO_TCP, option, UNSENT_LOWAT)


def unsent_bytes(sock: trio.socket.SocketType) -> int | None:
    """Bytes written to the socket that the peer has not taken yet (None where the kernel does not say)."""
    if _OUTQ is None:
        return None
    buffer = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), _OUTQ, buffer)
    except OSError:
        return None
    return buffer[0]


def abort(sock: trio.socket.SocketType) -> None:
    """Closes with a reset (unsent data discarded); tasks waiting on the socket get ClosedResourceError."""
    with contextlib.suppress(OSError):
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class GuardedSocketStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` whose `send_all` is bounded by `SendLimits` (see the module docstring)."""

    def __init__(
        self, stream: trio.SocketStream, limits: SendLimits, on_stall: Callable[[], None] | None = None
    ) -> None:
        self.inner = stream
        self.socket = stream.socket
        self.limits = limits
        self.on_stall = on_stall  # told before the abort is reported: the requests it ends were stalled

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Writes everything, or raises `SendStalled` (after aborting) when the client stops taking it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("the connection was closed")
        view = memoryview(data).cast("B")
        limits = self.limits
        last_progress = trio.current_time()
        queued = unsent_bytes(self.socket)
        while view:
            try:
                sent = os.write(self.socket.fileno(), view)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"send failed: {exc}") from exc
            if sent:
                view = view[sent:]
                last_progress = trio.current_time()
                continue
            give_up_at = min(last_progress + limits.timeout, limits.hard_deadline)
            with trio.move_on_at(min(trio.current_time() + limits.timeout / _POLLS_PER_TIMEOUT, give_up_at)) as wait:
                limits.blocked.add(wait)
                try:
                    await trio.lowlevel.wait_writable(self.socket)
                finally:
                    limits.blocked.discard(wait)
                continue
            now_queued = unsent_bytes(self.socket)
            if queued is not None and now_queued is not None and now_queued < queued:
                last_progress = trio.current_time()  # the client is reading, only slower than the buffer shows
            queued = now_queued
            now = trio.current_time()
            if now >= limits.hard_deadline or now - last_progress >= limits.timeout:
                self._stalled(now >= limits.hard_deadline)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _stalled(self, drained: bool) -> None:
        why = "the graceful timeout ran out" if drained else f"it took nothing for {self.limits.timeout:g}s"
        try:
            peer = self.socket.getpeername()
        except OSError:
            peer = "?"
        logger.warning("aborting the connection of %s: stalled, %s with a response unsent", peer, why)
        if self.on_stall is not None:
            self.on_stall()
        abort(self.socket)
        raise SendStalled(f"stalled: {why}")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
