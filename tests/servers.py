"""A real Hypercorn on loopback (port 0) around a real app, inside the test's trio loop; or the real CLI in a
subprocess (`server_process`), ended and waited for on every path."""

from __future__ import annotations

import functools
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
import torch
import trio
import trustme
from hypercorn.config import Config
from hypercorn.trio import serve

from trioserve.cli import build_app  # also applies the Hypercorn HTTP/2 guard
from trioserve.config import Settings
from trioserve.engine.engine import Engine
from trioserve.model.loading import load_runner
from trioserve.model.runner import TransformersRunner
from trioserve.server.app import TrioserveApp
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


class FaultyRunner(TransformersRunner):
    """The real tiny-model runner, failing the steps that carry a request whose last user message says
    "FAIL-OOM" or "FAIL" (with torch's out-of-memory error or a generic one), raised where a forward pass
    would raise them, so the runner's own error mapping is exercised."""

    def _step(self, plan: StepPlan) -> StepOutput:
        for seq_id in plan.seq_ids():
            prompt = self.tokenizer.decode(self._prompt_of(plan, seq_id))
            if "FAIL-OOM" in prompt:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            if "FAIL" in prompt:
                raise RuntimeError("device-side assert triggered (injected)")
        return super()._step(plan)

    def _prompt_of(self, plan: StepPlan, seq_id: int) -> tuple[int, ...]:
        for chunk in plan.prefill:
            if chunk.seq_id == seq_id:
                return chunk.request.prompt_ids
        return self._sequences[seq_id].request.prompt_ids


def demo_runner(*, slow: bool = False, faulty: bool = False, dtype: str = "auto") -> TransformersRunner:
    runner = load_runner(Settings(torch_dtype=dtype))  # type: ignore[arg-type]
    if slow:
        runner.__class__ = SlowRunner
    if faulty:
        runner.__class__ = FaultyRunner
    return runner


def demo_app(*, slow: bool = False, faulty: bool = False, dtype: str = "auto", **settings: Any) -> TrioserveApp:
    """The app the CLI would build for these settings (hotload on), on the demo model."""
    options = Settings(hotload=True, prefill_chunk=64, **{"max_concurrent": 8, "max_queue": 64} | settings)
    return build_app(options, load=functools.partial(demo_runner, slow=slow, faulty=faulty, dtype=dtype))


@dataclass
class Served:
    url: str
    app: TrioserveApp

    @property
    def engine(self) -> Engine:
        return self.app.engine


@asynccontextmanager
async def serve_on_loopback(
    app: TrioserveApp, *, certfile: str | None = None, keyfile: str | None = None
) -> AsyncIterator[Served]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.certfile = certfile
    config.keyfile = keyfile
    config.accesslog = None
    config.graceful_timeout = 0.5
    config.send_limits = app.send_limits  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
        yield Served(binds[0], app)
        nursery.cancel_scope.cancel()


@dataclass
class ServerProcess:
    """``python -m trioserve`` (or a module wrapping its CLI) running in a subprocess, and where it listens."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path  # its stdout and stderr

    def output(self) -> str:
        return self.log.read_text()


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server_process(
    tmp_path: Path, module: str = "trioserve", *, start_s: float = 120, **env: str
) -> Iterator[ServerProcess]:
    """Starts ``python -m module`` (port 0, hotload on, ``env`` added to the environment) and yields once it
    listens. On the way out, whether the test passed or failed, the process is killed if it still runs and
    always waited for: a `Popen` left to the garbage collector warns (``ResourceWarning``) in whichever later
    test happens to be running, and a leftover server keeps taking CPU from the rest of the suite."""
    log = tmp_path / f"{module}.log"
    environ = os.environ | {"PYTHONUNBUFFERED": "1", "HOTLOAD": "true", "PORT": "0", **env}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module], stdout=out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT
        )
    try:
        deadline = time.monotonic() + start_s  # loading the model on a busy machine: generous
        while "Running on http://" not in (text := log.read_text()):
            assert process.poll() is None, f"the server exited with {process.returncode}:\n{text}"
            assert time.monotonic() < deadline, f"the server did not listen within {start_s}s:\n{text}"
            time.sleep(0.1)
        yield ServerProcess(process, text.split("Running on ", 1)[1].split()[0], log)
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Kills the process unless it has exited, and reaps it (also when it had exited: that sets its status
    and keeps `Popen.__del__` quiet)."""
    if process.poll() is None:
        process.kill()
    process.wait()


T = TypeVar("T")


def sdk(served: Served) -> openai.OpenAI:
    """The official SDK pointed at the server, without retries (a retry would hide the status under test)."""
    return openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0)


async def with_sdk(served: Served, use: Callable[[openai.OpenAI], T]) -> T:
    """Runs ``use(client)`` in a worker thread (the SDK blocks), closing the client afterwards."""

    def run() -> T:
        with sdk(served) as client:
            return use(client)

    return await trio.to_thread.run_sync(run)


async def chat(served: Served, **kwargs: Any) -> Any:
    """``client.chat.completions.create`` (a list of chunks when streaming)."""

    def create(client: openai.OpenAI) -> Any:
        result = client.chat.completions.create(model="m", **kwargs)
        return list(result) if kwargs.get("stream") else result

    return await with_sdk(served, create)


async def legacy(served: Served, **kwargs: Any) -> Any:
    """``client.completions.create`` (a list of chunks when streaming)."""

    def create(client: openai.OpenAI) -> Any:
        result = client.completions.create(model="m", **kwargs)
        return list(result) if kwargs.get("stream") else result

    return await with_sdk(served, create)


def tls_files(tmp_path: Path) -> tuple[tuple[str, str], ssl.SSLContext]:
    """A certificate for 127.0.0.1/localhost signed by a new CA: (certfile, keyfile), and a client context
    trusting that CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return (str(certfile), str(keyfile)), context
