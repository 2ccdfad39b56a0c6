"""`python -m bench.tpcost`: the tensor-parallel message's own cost, without a model.

Two gloo ranks on this machine exchange the message rank 0 broadcasts before each step (`tprunner.Message`)
and the live-count all-gather after it, with a barrier before each timed call, so the figure is the
collective's cost and not the wait for a rank still busy with its forward pass (which the server's
`trioserve_tp_*_seconds_total` include). Shapes: a decode step of 16 rows; the same with a prefill chunk of
a 4,096-token prompt (its request, prompt ids included, rides along each chunk).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.servers import free_port
from trioserve.model.ranks import Group
from trioserve.model.tprunner import Message, _Channel
from trioserve.types import GenerationRequest, PrefillChunk, StepPlan

ROUNDS = 300


def messages() -> dict[str, Message]:
    decode = StepPlan(decode=tuple(range(16)))
    sampled = tuple((i, 1000 + i) for i in range(16))
    request = GenerationRequest("cmpl-x", tuple(range(4096)))
    prefill = StepPlan(prefill=(PrefillChunk(99, request, 0, 512),), decode=tuple(range(16)))
    return {
        "decode 16 rows": Message(decode, (17, 18), sampled),
        "decode 16 + 4096-token prompt chunk": Message(prefill, (), sampled),
    }


def rank_main(rank: int, port: int, results: dict[str, float]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    channel = _Channel(Group(rank, 2, rank, "gloo", torch.device("cpu")))
    for name, message in messages().items():
        times = []
        for _ in range(ROUNDS):
            dist.barrier()
            started = time.perf_counter()
            channel.broadcast(message if rank == 0 else None)
            times.append(time.perf_counter() - started)
        gathers = []
        for _ in range(ROUNDS):
            dist.barrier()
            started = time.perf_counter()
            channel.gather_counts(3)
            gathers.append(time.perf_counter() - started)
        if rank == 0:
            results[name] = statistics.median(times) * 1e6
            results[name + " (all-gather)"] = statistics.median(gathers) * 1e6
    dist.destroy_process_group()


def main() -> int:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(free_port(), results), nprocs=2)
        for name, micros in results.items():
            print(f"{name}: {micros:.0f} us (median of {ROUNDS}, rank 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
