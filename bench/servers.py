"""What every benchmark mode shares: where results go, free ports, a server process's life, levels."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(
    command: Sequence[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    ready_s: float = 300,
    started: list[int] | None = None,
) -> Iterator[str]:
    """Starts a server process, waits for /health, and stops it with SIGTERM afterwards. ``started``, if
    given, receives the process id."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        )
        url = f"http://127.0.0.1:{port}"
        if started is not None:
            started.append(process.pid)
        try:
            deadline = time.monotonic() + ready_s
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited early; see {log}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command} did not become healthy; see {log}")
                time.sleep(0.5)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def parse_levels(text: str) -> list[tuple[int, int]]:
    return [(int(c), int(n)) for c, n in (pair.split(":") for pair in text.split(","))]
