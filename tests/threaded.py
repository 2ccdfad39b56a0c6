"""A real Hypercorn on loopback, served from a thread with its own trio loop.

For tests whose clients block or run their own event loop (the agent frameworks run asyncio): the test
itself is synchronous, and one server can last a whole module (a module-scoped fixture), which trio-mode
async fixtures cannot.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from tests.servers import Served, demo_app, serve_on_loopback
from trioserve.server.app import TrioserveApp


@contextmanager
def served_in_thread(app: Callable[[], TrioserveApp] | None = None, **settings: Any) -> Iterator[Served]:
    """``app()`` (default: the demo app, ``settings`` as for `demo_app`) behind Hypercorn on loopback, until
    the block ends."""
    ready: queue.Queue[tuple[Served, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with serve_on_loopback(app() if app is not None else demo_app(**settings)) as served:
                ready.put((served, trio.lowlevel.current_trio_token(), scope))
                await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the waiting test rather than lost in the thread
            ready.put(exc)

    thread = threading.Thread(target=run, name="trioserve-test-server", daemon=True)
    thread.start()
    started = ready.get(timeout=120)
    if isinstance(started, BaseException):
        raise RuntimeError("the test server did not start") from started
    served, token, scope = started
    try:
        yield served
    finally:
        # Hypercorn's shutdown waits for open connections (graceful timeout 0.5 s) and the engine's last
        # step: seconds at most, even on a busy machine. A server still running after that would serve on
        # beside the rest of the suite, so it fails the test instead of being left behind.
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=60)
        if thread.is_alive():
            raise RuntimeError("the test server's thread did not end within 60 s of its cancellation")
