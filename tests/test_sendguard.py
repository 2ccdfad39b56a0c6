"""`sendguard` under trio's MockClock, over a real socket pair: when a write gives up, and when it does not.

The guard reads progress from the kernel (what the peer has taken), so the peer here is a real TCP socket
on loopback that reads on a virtual schedule; the clock jumps whenever every task waits.
"""

from __future__ import annotations

import socket as stdlib_socket

import pytest
import trio
import trio.testing

from trioserve.server.sendguard import GuardedSocketStream, SendLimits, SendStalled


async def pair(limits: SendLimits) -> tuple[GuardedSocketStream, trio.SocketStream]:
    """A TCP connection on loopback: (the guarded writer, the peer with a 4 KiB receive buffer)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = trio.socket.socket()
    peer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, 4096)
    await peer.connect(listener.getsockname())
    writer, _ = await listener.accept()
    listener.close()
    writer.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 4096)
    return GuardedSocketStream(trio.SocketStream(writer), limits), trio.SocketStream(peer)


async def test_a_write_nobody_takes_fails_at_the_send_timeout(autojump_clock: trio.testing.MockClock) -> None:
    stalls: list[float] = []
    guarded, peer = await pair(SendLimits(timeout=2.0))
    guarded.on_stall = lambda: stalls.append(trio.current_time())
    started = trio.current_time()
    with pytest.raises(SendStalled):
        await guarded.send_all(b"x" * 1_000_000)
    # Noticed at the first look at the kernel's queue past the timeout (a quarter timeout apart).
    assert 2.0 <= trio.current_time() - started <= 2.5
    assert stalls == [trio.current_time()]
    assert guarded.socket.fileno() == -1  # aborted
    await peer.aclose()


async def test_a_slow_reader_is_never_cut(autojump_clock: trio.testing.MockClock) -> None:
    guarded, peer = await pair(SendLimits(timeout=2.0))
    payload = b"y" * 100_000
    received = bytearray()

    async def read_slowly() -> None:
        while len(received) < len(payload):
            received.extend(await peer.receive_some(65536))
            await trio.sleep(1.5)  # less than the timeout between reads, far slower than the writer

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        await guarded.send_all(payload)
    assert received == payload
    assert trio.current_time() - started > 10  # it did wait on the reader, many timeouts long
    await guarded.aclose()
    await peer.aclose()


async def test_the_drain_deadline_ends_a_write_already_waiting(autojump_clock: trio.testing.MockClock) -> None:
    limits = SendLimits()  # no send timeout: only the drain bounds it
    guarded, peer = await pair(limits)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 5)  # the write below has been waiting 5 s when the drain starts
        started = trio.current_time()

        async def drain_later() -> None:
            await trio.sleep(5)
            limits.end_by(trio.current_time() + 1.0)

        nursery.start_soon(drain_later)
        with pytest.raises(SendStalled):
            await guarded.send_all(b"z" * 1_000_000)
        assert trio.current_time() - started == pytest.approx(6.0)
    await peer.aclose()
