"""``trioserve`` / ``python -m trioserve``: settings -> engine -> app -> Hypercorn (HTTP/1.1 and HTTP/2).

The only module that imports Hypercorn. SIGINT and SIGTERM trigger Hypercorn's graceful shutdown: it stops
accepting connections, lets open ones finish within the graceful timeout, then the app's lifespan stops the
engine, whose cancellation releases every remaining sequence's KV.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trioserve.app import create_app
from trioserve.config import ConfigError, Settings, load_settings
from trioserve.engine import Engine
from trioserve.loading import check_settings, load_runner

logger = logging.getLogger("trioserve")


def build_engine(settings: Settings) -> Engine:
    return Engine(
        functools.partial(load_runner, settings),
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        batch_size=settings.batch_size,
        prefill_chunk=settings.prefill_chunk,
        hotload=settings.hotload,
    )


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.graceful_timeout = 30.0
    return config


async def _shutdown_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info("received %s: shutting down gracefully", signal.Signals(signum).name)
            return


async def serve_forever(settings: Settings) -> None:
    engine = build_engine(settings)
    app = create_app(engine)
    config = hypercorn_config(settings)
    scheme = "https" if settings.certfile else "http"
    logger.info("trioserve listening on %s://%s:%d (HTTP/1.1 and HTTP/2)", scheme, settings.host, settings.port)
    await serve(app, config, shutdown_trigger=_shutdown_signal)


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
