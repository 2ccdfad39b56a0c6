"""``trioserve`` / ``python -m trioserve``: settings -> engine -> app -> Hypercorn (HTTP/1.1 and HTTP/2).

The only module that starts Hypercorn (`trioserve.server.hypercorn_fixes` patches its classes, installed on import
here). SIGINT and SIGTERM trigger Hypercorn's graceful shutdown: it stops accepting connections, closes idle
ones at once, lets open ones finish within the graceful timeout (the app ends the streams still running just
before it, each with an SSE error event), then the app's lifespan stops the engine, whose cancellation
releases every remaining sequence's KV.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trioserve.config import ConfigError, Settings, load_settings
from trioserve.engine.engine import Engine
from trioserve.model import ranks
from trioserve.model.loading import check_settings, load_runner, resolve_device
from trioserve.model.tprunner import FollowerRunner, TensorParallelRunner, check_same_setup, follow
from trioserve.server import hypercorn_fixes
from trioserve.server.app import TrioserveApp, create_app
from trioserve.server.metrics import Metrics
from trioserve.server.sendguard import SendLimits
from trioserve.types import Runner

logger = logging.getLogger("trioserve")


hypercorn_fixes.install()


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
        max_unread=settings.max_unread_tokens,
    )
    return create_app(engine, settings, metrics=metrics)


def hypercorn_config(settings: Settings, send_limits: SendLimits | None = None) -> Config:
    """Hypercorn's config for these settings; ``send_limits`` (the app's) bound every write of its connections."""
    config = Config()
    config.send_limits = send_limits or SendLimits(settings.send_timeout)  # type: ignore[attr-defined]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.graceful_timeout = settings.graceful_timeout
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.h2_max_concurrent_streams = settings.max_concurrent_streams
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


async def serve_forever(settings: Settings, sharded: TensorParallelRunner | None = None) -> int:
    """Serves until SIGTERM/SIGINT (exit code 0), or until the tensor-parallel group ``sharded`` fails (1)."""
    if sharded is not None:
        # The shards are loaded already (every rank at once): the engine takes them at startup, so /health
        # names the model from the start rather than after the first request.
        settings = settings.model_copy(update={"hotload": True})
    app = build_app(settings, None if sharded is None else lambda: sharded)
    config = hypercorn_config(settings, app.send_limits)
    scheme = "https" if settings.certfile else "http"
    logger.info("trioserve listening on %s://%s:%d (HTTP/1.1 and HTTP/2)", scheme, settings.host, settings.port)
    broken = trio.Event()
    if sharded is not None:
        token = trio.lowlevel.current_trio_token()

        def on_broken(_: str) -> None:  # from the step's worker thread or the heartbeat's
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(broken.set, trio_token=token)

        sharded.on_broken = on_broken

    async def shutdown_trigger() -> None:
        async with trio.open_nursery() as nursery:

            async def watch_broken() -> None:
                await broken.wait()
                logger.error("the tensor-parallel group failed: draining, then exiting with an error")
                app.start_draining()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_broken)
            await drain_on_signal(app)
            nursery.cancel_scope.cancel()

    await serve(app, config, shutdown_trigger=shutdown_trigger)
    runner = app.engine.runner
    held = runner.live_sequences() if runner is not None else 0
    if broken.is_set():
        logger.error("shut down after the tensor-parallel group failed (%d sequences hold KV)", held)
        return 1
    logger.info("shut down cleanly (%d sequences hold KV)", held)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
        rank = f" [rank {os.environ.get('RANK', '0')}]" if settings.tensor_parallel_size > 1 else ""
        logging.basicConfig(
            level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{rank}: %(message)s"
        )
        check_settings(settings)
    except ConfigError as exc:
        print(f"trioserve: configuration error: {exc}", file=sys.stderr)
        return 2
    if settings.tensor_parallel_size > 1:
        return serve_sharded(settings, sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun with several ranks but no sharding: each rank would serve a whole copy on the same port.
        print(
            "trioserve: configuration error: torchrun started several ranks; pass --tensor-parallel-size",
            file=sys.stderr,
        )
        return 2
    return trio.run(serve_forever, settings)


def serve_sharded(settings: Settings, argv: Sequence[str]) -> int:
    """``--tensor-parallel-size`` N: rank 0 serves, every other rank follows (`trioserve.model.tprunner`).

    Started alone, rank 0 spawns the other N-1 ranks on this machine; under torchrun the ranks are its own.
    Rank 0 stops the followers as it exits, however it exits.
    """
    try:
        ranks.check_model(settings)
        device = resolve_device(settings.device)
        ranks.check_setup(settings, device)
        if ranks.under_launcher() and int(os.environ["WORLD_SIZE"]) != settings.tensor_parallel_size:
            raise ConfigError(
                f"torchrun started {os.environ['WORLD_SIZE']} ranks but --tensor-parallel-size is "
                f"{settings.tensor_parallel_size}; they must be equal"
            )
    except ConfigError as exc:
        print(f"trioserve: configuration error: {exc}", file=sys.stderr)
        return 2
    followers = None if ranks.under_launcher() else ranks.spawn_followers(settings.tensor_parallel_size, argv)
    sharded: TensorParallelRunner | None = None
    try:
        group = ranks.join(device)
        if not group.leader:
            # A follower ends when rank 0 stops it or is gone: torchrun's SIGTERM (or a Ctrl-C) to every rank
            # must not end it while rank 0 still drains the requests in flight.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            ranks.watch_leader()
            follower = load_runner(settings, runner_class=FollowerRunner, device=group.device)
            assert isinstance(follower, FollowerRunner)
            check_same_setup(follower, group)
            return follow(follower, group)
        sharded = TensorParallelRunner(load_runner(settings, device=group.device), group)
        check_same_setup(sharded.inner, group)
        return trio.run(serve_forever, settings, sharded)
    except Exception:
        logger.exception("rank %s failed", os.environ.get("RANK"))
        return 1
    finally:
        stopped = sharded.close() if sharded is not None else False
        if followers is not None:
            followers.stop(grace=10.0 if stopped else 0.0)
        ranks.leave()


def run() -> None:
    """The process entry point (``trioserve``, ``python -m trioserve``): `main`, then exit at once.

    Once the server has shut down, nothing is left to do: the interpreter's own teardown with torch loaded
    (module finalizers, its thread pools) took 0.1-3 s here, counted against the orchestrator's grace
    period after the graceful timeout had already been spent. Logs are flushed, then the process exits.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
