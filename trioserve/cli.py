"""``trioserve`` / ``python -m trioserve``: settings -> engine -> app -> Hypercorn (HTTP/1.1 and HTTP/2).

The only module that imports Hypercorn. SIGINT and SIGTERM trigger Hypercorn's graceful shutdown: it stops
accepting connections, lets open ones finish within the graceful timeout, then the app's lifespan stops the
engine, whose cancellation releases every remaining sequence's KV.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
from collections.abc import Callable, Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trioserve.app import TrioserveApp, create_app
from trioserve.config import ConfigError, Settings, load_settings
from trioserve.engine import Engine
from trioserve.loading import check_settings, load_runner
from trioserve.metrics import Metrics
from trioserve.types import Runner

logger = logging.getLogger("trioserve")


def patch_hypercorn_h2() -> None:
    """Guards Hypercorn's HTTP/2 protocol against frames for streams it has already dropped.

    Hypercorn 0.18 resets a new stream that arrives during graceful shutdown, then looks the stream up for
    its DATA frame and raises KeyError, which ends the whole server with every in-flight request on it
    (upstream issues pgjones/hypercorn#197 and #329; fixes proposed in #312, #334, #365, unreleased).
    This applies the guard those fixes add: such frames are acknowledged for flow control and dropped.
    Idempotent; remove once a fixed Hypercorn is required.
    """
    import h2.events
    import h2.exceptions
    from hypercorn.protocol.h2 import H2Protocol

    original = H2Protocol._handle_events
    if getattr(original, "_trioserve_guarded", False):
        return

    async def handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        for event in events:
            is_stream_frame = isinstance(event, (h2.events.DataReceived, h2.events.StreamEnded))
            if is_stream_frame and getattr(event, "stream_id", None) not in self.streams:
                if isinstance(event, h2.events.DataReceived):
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                continue
            await original(self, [event])

    handle_events._trioserve_guarded = True  # type: ignore[attr-defined]
    H2Protocol._handle_events = handle_events  # type: ignore[method-assign]


patch_hypercorn_h2()


def build_app(settings: Settings, load: Callable[[], Runner] | None = None) -> TrioserveApp:
    """Settings -> runner factory -> engine (feeding the metrics) -> app. ``load`` replaces the factory."""
    metrics = Metrics()
    engine = Engine(
        load or functools.partial(load_runner, settings),
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        batch_size=settings.batch_size,
        prefill_chunk=settings.prefill_chunk,
        hotload=settings.hotload,
        on_record=metrics.record,
    )
    return create_app(engine, settings, metrics=metrics)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.graceful_timeout = settings.graceful_timeout
    return config


async def drain_on_signal(app: TrioserveApp) -> None:
    """Hypercorn's shutdown trigger: returns on SIGINT or SIGTERM, after marking the app as draining."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info(
                "received %s: draining (graceful timeout %gs)",
                signal.Signals(signum).name,
                app.settings.graceful_timeout,
            )
            app.start_draining()
            return


async def serve_forever(settings: Settings) -> None:
    app = build_app(settings)
    config = hypercorn_config(settings)
    scheme = "https" if settings.certfile else "http"
    logger.info("trioserve listening on %s://%s:%d (HTTP/1.1 and HTTP/2)", scheme, settings.host, settings.port)
    await serve(app, config, shutdown_trigger=functools.partial(drain_on_signal, app))
    logger.info("shut down cleanly")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_settings(settings)
    except ConfigError as exc:
        print(f"trioserve: configuration error: {exc}", file=sys.stderr)
        return 2
    trio.run(serve_forever, settings)
    return 0
