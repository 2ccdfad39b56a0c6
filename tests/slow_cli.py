"""``python -m tests.slow_cli``: the real CLI (`trioserve.cli.main`: settings, signals, drain, Hypercorn) on
the demo model, with every forward step first sleeping ``STEP_SECONDS`` (default 0.1).

The sleep sets a floor under how long generation takes, whatever the machine: ``n`` tokens take at least
``n * STEP_SECONDS``. A test can then have a request still generating at a given moment by construction
(the drain test sends SIGTERM with 1,200 tokens to go), where the plain server, stepping in a millisecond on
a quiet machine and in tens on a busy one, would leave it to the machine's speed.
"""

from __future__ import annotations

import os
import sys

from tests.servers import SlowRunner
from trioserve import cli
from trioserve.config import Settings
from trioserve.model.runner import TransformersRunner

load_runner = cli.load_runner


def load_slow_runner(settings: Settings) -> TransformersRunner:
    runner = load_runner(settings)
    runner.__class__ = SlowRunner
    return runner


if __name__ == "__main__":
    SlowRunner.step_seconds = float(os.environ.get("STEP_SECONDS", "0.1"))
    cli.load_runner = load_slow_runner  # type: ignore[assignment]  # build_app's default factory looks it up there
    sys.exit(cli.main())
