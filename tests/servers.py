"""A real Hypercorn on loopback (port 0) around a real app, inside the test's trio loop."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

from trioserve.app import create_app
from trioserve.config import Settings
from trioserve.engine import Engine
from trioserve.loading import load_runner
from trioserve.runner import TransformersRunner
from trioserve.types import StepOutput, StepPlan


class SlowRunner(TransformersRunner):
    """The real tiny-model runner with each step stretched to a realistic duration (real time).

    The tiny model steps in about a millisecond, less than it takes a socket close to be noticed; a real
    model takes tens of milliseconds. Stretching the step makes "stops within one step" measurable.
    """

    step_seconds = 0.03

    def step(self, plan: StepPlan) -> StepOutput:
        time.sleep(self.step_seconds)
        return super().step(plan)


def demo_runner(*, slow: bool = False, **settings: object) -> TransformersRunner:
    runner = load_runner(Settings(**settings))  # type: ignore[arg-type]
    if slow:
        runner.__class__ = SlowRunner
    return runner


def demo_engine(*, slow: bool = False, max_concurrent: int = 8, max_queue: int = 64, **settings: object) -> Engine:
    return Engine(
        functools.partial(demo_runner, slow=slow, **settings),
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        batch_size=max_concurrent,
        prefill_chunk=64,
        hotload=True,
    )


@dataclass
class Served:
    url: str
    app: QuartTrio
    engine: Engine


@asynccontextmanager
async def serve_on_loopback(
    engine: Engine, *, certfile: str | None = None, keyfile: str | None = None
) -> AsyncIterator[Served]:
    app = create_app(engine)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = certfile
    config.keyfile = keyfile
    config.accesslog = None
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
        yield Served(binds[0], app, engine)
        nursery.cancel_scope.cancel()
