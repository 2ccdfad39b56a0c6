"""``python -m tests.busy [--seconds S] [--workers N] COMMAND...``: runs COMMAND with every core kept busy.

The suite must pass on a shared machine (CI runs on 2 cores other jobs also use), so `./dev test-busy` runs
it beside one spinning process per core (the same priority as the suite's, so they take about half of the
CPU). A test that needs work to be "still running" or "already done" at some moment without making it so
by construction fails there, not later in CI.

The load is bounded in time twice over: each spinner stops by itself after ``--seconds`` (so nothing keeps
spinning even when this process is killed with SIGKILL), and the spinners are ended and waited for as soon
as COMMAND exits. The exit status is COMMAND's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

# Spins until its own deadline: pure Python arithmetic, one core each, nothing allocated or written.
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    sum(range(1000))\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.busy", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="spinning processes (one a core)")
    parser.add_argument("--seconds", type=float, default=1800.0, help="each spinner stops by itself after this")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run under load")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    # SIGTERM unwinds like Ctrl-C: the command and the spinners are killed and waited for on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=args.seconds)]) for _ in range(args.workers)
    ]
    started = time.monotonic()
    print(f"busy: {args.workers} spinning process(es), at most {args.seconds:g}s, beside:", *command, flush=True)
    try:
        status = subprocess.call(command)
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
    took = time.monotonic() - started
    loaded = "the whole time" if took < args.seconds else f"the first {args.seconds:g}s only"
    print(f"busy: the command took {took:.0f}s, exit {status}; the load ran {loaded}")
    return status


if __name__ == "__main__":
    sys.exit(main())
