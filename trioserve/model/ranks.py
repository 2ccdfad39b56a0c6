"""The ranks of a tensor-parallel server: checks at startup, spawning local ranks, joining the process group.

One model is sharded over N ranks by transformers itself (``from_pretrained(..., tp_plan="auto")`` under an
initialised `torch.distributed` process group); torch.distributed is the only transport. Rank 0 serves
(Hypercorn, the engine, the scheduler); every other rank follows it step by step (`trioserve.model.tprunner`).

Two ways to start the ranks:

* **Spawned** (no ``RANK``/``WORLD_SIZE`` in the environment): rank 0 starts N-1 copies of its own command
  line with the rank variables set, on loopback. Each follower watches a pipe from rank 0 and exits the moment
  it closes, so no follower outlives rank 0 however it ends (SIGKILL included). Followers run in their own
  session: a Ctrl-C at the terminal reaches rank 0 alone, which drains and then ends them.
* **torchrun** (``RANK``/``WORLD_SIZE`` set, one or several machines through its rendezvous): the ranks are
  torchrun's; it ends the others when one exits.

gloo on the CPU, NCCL on CUDA with one GPU per rank (``LOCAL_RANK`` picks it). Collectives time out after
`COLLECTIVE_TIMEOUT`: a rank that hangs fails the group instead of stalling it forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoConfig

from trioserve.config import ConfigError, Settings

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
# Set in the environment of the followers rank 0 spawns: their stdin is the pipe that ties them to rank 0.
SPAWNED_ENV = "TRIOSERVE_SPAWNED_RANK"
STORE_ENV = "TRIOSERVE_RANKS_STORE"  # the rendezvous file of ranks rank 0 spawned (torchrun's ranks use env://)


@dataclass(frozen=True)
class Group:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int
    local_rank: int
    backend: str
    device: torch.device  # this rank's device (its own GPU on CUDA), and where collectives' tensors live

    @property
    def leader(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """Whether the rank variables are already set (torchrun, or a follower rank 0 spawned)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def working_sizes(heads: int, kv_heads: int, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes (up to ``limit``) that divide both the attention heads and the KV heads."""
    common = math.gcd(heads, kv_heads)
    return [n for n in range(1, limit + 1) if common % n == 0]


def check_model(settings: Settings) -> None:
    """The model can be sharded over ``--tensor-parallel-size`` ranks: it has a tensor-parallel plan, and its
    heads and KV heads divide by the size. Reads the model's config only.

    Raises:
        ConfigError: naming the cause and the sizes that work.
    """
    size = settings.tensor_parallel_size
    if settings.model is None:
        raise ConfigError(
            "--tensor-parallel-size needs a real model (--model / HF_MODEL): the built-in demo is built in-process "
            "and has no checkpoint for each rank to load its shard from"
        )
    config = AutoConfig.from_pretrained(settings.model, trust_remote_code=settings.trust_remote_code)
    text = config.get_text_config()
    if not getattr(text, "base_model_tp_plan", None):
        raise ConfigError(
            f"{settings.model} ({config.model_type}) has no tensor-parallel plan in transformers: it cannot be "
            "sharded; use --tensor-parallel-size 1"
        )
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    if heads % size or kv_heads % size:
        sizes = ", ".join(str(n) for n in working_sizes(heads, kv_heads))
        raise ConfigError(
            f"--tensor-parallel-size {size} does not divide {settings.model}'s {heads} attention heads and "
            f"{kv_heads} KV heads; sizes that work: {sizes}"
        )


def check_setup(settings: Settings, device: torch.device) -> None:
    """The backend exists and (on CUDA) this machine has a GPU for each of its local ranks.

    Raises:
        ConfigError: naming what is missing.
    """
    size = settings.tensor_parallel_size
    if not dist.is_available():
        raise ConfigError("--tensor-parallel-size needs torch.distributed, which this torch build lacks")
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise ConfigError("--tensor-parallel-size on CUDA needs NCCL, which this torch build lacks")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        if torch.cuda.device_count() < local:
            raise ConfigError(
                f"--tensor-parallel-size {size} needs {local} GPUs on this machine (one per rank); "
                f"{torch.cuda.device_count()} are visible"
            )
    elif not dist.is_gloo_available():
        raise ConfigError("--tensor-parallel-size on the CPU needs gloo, which this torch build lacks")


class Followers:
    """The follower processes rank 0 spawned; `stop` ends and reaps them (idempotent)."""

    def __init__(self, processes: list[subprocess.Popen[bytes]], folder: str) -> None:
        self.processes = processes
        self.folder = folder  # the rendezvous file's

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def failed(self) -> list[int]:
        """Exit codes of followers that ended with an error."""
        return [code for p in self.processes if (code := p.poll()) is not None and code != 0]

    def stop(self, grace: float) -> None:
        """Waits up to ``grace`` seconds for them to exit (they do once rank 0 has sent its stop message), then
        closes their pipes (which ends a follower still waiting), then kills what is left; every one is reaped."""
        deadline = time.monotonic() + grace
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("follower pid %d did not exit; killing it", process.pid)
                process.kill()
                process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def spawn_followers(size: int, argv: Sequence[str]) -> Followers:
    """Starts ranks 1..size-1 on this machine running ``python -m trioserve *argv``, and sets this process's
    rank variables (rank 0) for `join`."""
    # The rendezvous is a file, not a TCP store (which listens on every interface): spawned ranks meet with no
    # port open to anyone. Rank 0 removes its folder on exit (`Followers.stop`).
    folder = tempfile.mkdtemp(prefix="trioserve-ranks-")
    common = {"WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size), STORE_ENV: os.path.join(folder, "store")}
    # The ranks' traffic is pickled Python objects: ranks on one machine talk over loopback only (gloo and
    # NCCL's sockets otherwise bind the address the host name resolves to, which other machines may reach).
    if os.path.exists("/sys/class/net/lo"):
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            common[variable] = os.environ.get(variable, "lo")
    os.environ.update(common, RANK="0", LOCAL_RANK="0")
    processes = []
    for rank in range(1, size):
        env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank), SPAWNED_ENV: "1"}
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "trioserve", *argv], env=env, stdin=subprocess.PIPE, start_new_session=True
            )
        )
    logger.info("tensor parallel: spawned ranks 1..%d (pids %s)", size - 1, [p.pid for p in processes])
    return Followers(processes, folder)


_stopping = threading.Event()


def stopping() -> None:
    """This follower was stopped by rank 0: its pipe closing from now on is the expected end."""
    _stopping.set()


def watch_leader() -> None:
    """In a follower rank 0 spawned: exits the process the moment rank 0's pipe (our stdin) closes."""
    if os.environ.get(SPAWNED_ENV) != "1":
        return

    def watch() -> None:
        with contextlib.suppress(OSError):
            while sys.stdin.buffer.read(4096):
                pass
        if _stopping.is_set():
            os._exit(0)
        logger.error("rank %s: rank 0 is gone; exiting", os.environ.get("RANK"))
        if store := os.environ.get(STORE_ENV):  # rank 0, killed, could not remove the rendezvous file
            shutil.rmtree(os.path.dirname(store), ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="watch-rank-0", daemon=True).start()


def join(device: torch.device) -> Group:
    """Joins the process group named by the rank variables (`torch.distributed`'s ``env://``)."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    store = os.environ.get(STORE_ENV)
    dist.init_process_group(
        backend,
        init_method=f"file://{store}" if store else "env://",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if backend == "nccl" else None,
    )
    logger.info("rank %d of %d joined (%s, %s)", rank, size, backend, device)
    return Group(rank, size, local_rank, backend, device)


def leave() -> None:
    """Destroys the process group, if any (a group that failed may not tear down cleanly: that is ignored)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
