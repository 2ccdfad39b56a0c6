"""Tensor parallelism on the CPU: two gloo ranks of ``python -m trioserve --tensor-parallel-size 2`` serving
over HTTP, against one process; a follower killed mid-stream; SIGTERM; aborted streams; startup errors.

Every server here is a real subprocess tree (rank 0 and the follower it spawns), ended and waited for on
every path; a test that ends a server also checks that no rank survives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import trio
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from tests.servers import ROOT, ServerProcess, serve_on_loopback, server_process, stop_process
from trioserve.cli import build_app
from trioserve.config import Settings
from trioserve.model.tinymodel import build_model, build_tokenizer

PROMPTS = ["the quick brown fox", "hello", "a much longer prompt about servers and tensors and ranks", "zz"]
TP_ENV = {
    "TENSOR_PARALLEL_SIZE": "2",
    "HOTLOAD": "false",  # the default: the shards are loaded at startup whatever it says
    "DEVICE": "cpu",
    "TORCH_DTYPE": "float64",
    "MAX_CONCURRENT": "8",
    "PREFILL_CHUNK": "16",
}
BOUND_S = 60.0  # an upper bound only: how long a rank may take to notice and exit on a busy 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (4 heads, 2 KV heads) saved in float64, as each rank loads its shard of it."""
    path = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_model(tokenizer, dtype=torch.float64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def follower_pids(server: ServerProcess) -> list[int]:
    found = re.search(r"spawned ranks 1\.\.\d+ \(pids \[([\d, ]+)\]\)", server.output())
    assert found is not None, server.output()
    return [int(pid) for pid in found.group(1).split(",")]


def listening_addresses(pid: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + BOUND_S
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks {pids} still run"
        time.sleep(0.1)


@pytest.fixture
def tp_server(tmp_path: Path, model_dir: Path) -> Iterator[ServerProcess]:
    with server_process(tmp_path, HF_MODEL=str(model_dir), **TP_ENV) as server:
        pids = follower_pids(server)
        try:
            yield server
        finally:
            stop_process(server.process)
            wait_gone(pids)  # killed rank 0: its follower sees its pipe close and exits


LONG = " ".join(f"word{i}" for i in range(40))  # longer than PREFILL_CHUNK: prefilled in chunks
REQUESTS: list[tuple[str, dict[str, object]]] = [
    *(("/v1/completions", {"prompt": p, "temperature": 0, "logprobs": 0}) for p in [*PROMPTS, LONG]),
    ("/v1/completions", {"prompt": "sampled once, on rank 0", "temperature": 1.0, "seed": 7, "logprobs": 0}),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "json"}], "response_format": {"type": "json_object"}, "seed": 3},
    ),
]


async def complete_all(url: str) -> list[object]:
    """`REQUESTS`, all at once (greedy, seeded, grammar-constrained): each one's choice as the client sees it."""
    results: dict[int, object] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(index: int) -> None:
            path, body = REQUESTS[index]
            response = await client.post(path, json={"model": "m", "max_tokens": 24, **body})
            assert response.status_code == 200, response.text
            results[index] = response.json()["choices"][0]

        async with trio.open_nursery() as nursery:
            for index in range(len(REQUESTS)):
                nursery.start_soon(one, index)
    return [results[i] for i in range(len(REQUESTS))]


@pytest.mark.socket
@pytest.mark.slow
async def test_two_ranks_give_one_process_greedy_tokens_and_release_aborted_streams(
    tp_server: ServerProcess, model_dir: Path
) -> None:
    async with httpx.AsyncClient(base_url=tp_server.url) as client:  # the shards are ready before any request
        assert (await client.get("/health")).json()["model"] == model_dir.name
    expected = await reference(model_dir)
    got = await complete_all(tp_server.url)
    assert got == expected  # float64: summation order across the shards cannot hide a wrong token
    # The ranks' traffic is pickles: no rank listens beyond loopback (HTTP here binds 127.0.0.1 too).
    for pid in [tp_server.process.pid, *follower_pids(tp_server)]:
        assert listening_addresses(pid) <= LOOPBACK, (pid, listening_addresses(pid))

    # 200 streams cut after their first chunk: every rank releases them all.
    async with httpx.AsyncClient(base_url=tp_server.url, timeout=120) as client:

        async def abort(index: int) -> None:
            body = {"model": "m", "prompt": f"abort {index}", "max_tokens": 500, "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for _ in response.aiter_lines():
                    break  # leaving the block closes the connection mid-stream

        async with trio.open_nursery() as nursery:
            limit = trio.CapacityLimiter(20)

            async def limited(index: int) -> None:
                async with limit:
                    await abort(index)

            for index in range(200):
                nursery.start_soon(limited, index)

        # The releases reach the follower with the next message (a step, or the heartbeat when idle).
        deadline = trio.current_time() + BOUND_S
        while True:
            metrics = (await client.get("/metrics")).text
            counts = re.findall(r'^trioserve_rank_live_sequences\{rank="(\d)"\} (\S+)$', metrics, re.M)
            if counts == [("0", "0.0"), ("1", "0.0")]:
                break
            assert trio.current_time() < deadline, counts
            await trio.sleep(0.2)
        health = (await client.get("/health")).json()
        assert health["status"] == "ok" and health["live_sequences"] == 0


@pytest.mark.socket
@pytest.mark.slow
async def test_a_sliding_window_model_gives_one_process_tokens(tmp_path: Path) -> None:
    # Mistral: every layer slides over 6 positions, fewer than the prompts and outputs hold.
    tokenizer = build_tokenizer()
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "initializer_range": 0.5}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    config = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), sliding_window=6, **shape, **heads)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float64).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    expected = await reference(tmp_path / "m")
    with server_process(tmp_path, HF_MODEL=str(tmp_path / "m"), **TP_ENV) as server:
        pids = follower_pids(server)
        assert await complete_all(server.url) == expected
    wait_gone(pids)


@pytest.mark.socket
@pytest.mark.slow
async def test_a_follower_killed_mid_stream_fails_the_stream_and_the_server_exits(tp_server: ServerProcess) -> None:
    (follower,) = follower_pids(tp_server)
    body = {"model": "m", "prompt": "long", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=tp_server.url, timeout=BOUND_S) as client:
        lines = []
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not lines:
                    os.kill(follower, signal.SIGKILL)
                lines.append(line)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "error" in events[-1], lines[-3:]
        assert "tensor-parallel group failed" in events[-1]["error"]["message"]
        assert len(events) < 2000
        try:
            health = await client.get("/health")
        except httpx.TransportError:
            pass  # already gone
        else:
            assert health.status_code == 503
    code = await trio.to_thread.run_sync(lambda: tp_server.process.wait(BOUND_S))
    assert code == 1
    assert "the tensor-parallel group failed: draining, then exiting with an error" in tp_server.output()


@pytest.mark.socket
@pytest.mark.slow
async def test_sigterm_drains_rank_0_then_ends_every_rank(tp_server: ServerProcess) -> None:
    followers = follower_pids(tp_server)
    body = {"model": "m", "prompt": "drain me", "max_tokens": 40, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=tp_server.url, timeout=BOUND_S) as client:
        chunks = 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if chunks == 0:
                    tp_server.process.send_signal(signal.SIGTERM)
                chunks += line.startswith("data: {")
                assert "error" not in line
        assert chunks >= 40 / 16  # the stream in flight finished: tokens come up to 16 a chunk
    code = await trio.to_thread.run_sync(lambda: tp_server.process.wait(BOUND_S))
    assert code == 0
    wait_gone(followers)
    assert "rank 1: stopped by rank 0" in tp_server.output()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def torchruns(tmp_path: Path, model_dir: Path, *launcher_args: list[str]) -> Iterator[str]:
    """One ``torchrun ... -m trioserve`` per argument list (the "nodes"), each in a session of its own; yields
    rank 0's URL. On the way out each is SIGTERMed (torchrun forwards it to its ranks), and whatever still
    runs after the bound is killed with its whole session; every rank must be gone."""
    processes, logs, ranks = [], [], []
    env = os.environ | {"PYTHONUNBUFFERED": "1", "PORT": "0", "HF_MODEL": str(model_dir), **TP_ENV}
    try:
        for index, args in enumerate(launcher_args):
            logs.append(tmp_path / f"torchrun{index}.log")
            with logs[-1].open("w") as out:
                command = [sys.executable, "-m", "torch.distributed.run", *args, "-m", "trioserve"]
                processes.append(
                    subprocess.Popen(
                        command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + 120
        while not any("Running on http://" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.1)
        ranks = [pid for process in processes for pid in descendants(process.pid)]
        text = next(text for log in logs if "Running on http://" in (text := log.read_text()))
        yield text.split("Running on ", 1)[1].split()[0]
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(BOUND_S)
        wait_gone(ranks)
        assert any("rank 1: stopped by rank 0" in log.read_text() for log in logs)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


_answers: dict[Path, list[object]] = {}


async def reference(model_dir: Path) -> list[object]:
    """What one process answers to `REQUESTS` (once per model: the answers are deterministic)."""
    if model_dir in _answers:
        return _answers[model_dir]
    settings = Settings(
        model=str(model_dir), device="cpu", torch_dtype="float64", hotload=True, max_concurrent=8, prefill_chunk=16
    )
    async with serve_on_loopback(build_app(settings)) as served:
        _answers[model_dir] = await complete_all(served.url)
    return _answers[model_dir]


@pytest.mark.socket
@pytest.mark.slow
async def test_torchrun_on_one_machine(tmp_path: Path, model_dir: Path) -> None:
    expected = await reference(model_dir)
    with torchruns(tmp_path, model_dir, ["--nproc-per-node", "2"]) as url:
        assert await complete_all(url) == expected


@pytest.mark.socket
@pytest.mark.slow
async def test_two_nodes_of_one_rank_each_through_torchruns_rendezvous(tmp_path: Path, model_dir: Path) -> None:
    expected = await reference(model_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "tp-test"]
    node += ["--rdzv-endpoint", f"127.0.0.1:{port}"]
    with torchruns(tmp_path, model_dir, node, node) as url:
        assert await complete_all(url) == expected


@pytest.mark.slow
def test_heads_that_do_not_divide_are_a_startup_error(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    build_model(tokenizer, num_heads=6, num_kv_heads=3, hidden_size=48).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    env = os.environ | {"HF_MODEL": str(tmp_path / "m"), **TP_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "trioserve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--tensor-parallel-size 2 does not divide" in done.stderr
    assert "6 attention heads and 3 KV heads; sizes that work: 1, 3" in done.stderr
    assert "spawned" not in done.stderr  # refused before any rank started


@pytest.mark.slow
def test_the_demo_model_cannot_be_sharded() -> None:
    env = os.environ | TP_ENV
    done = subprocess.run(
        [sys.executable, "-m", "trioserve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "--tensor-parallel-size needs a real model" in done.stderr


def test_compose_has_a_profile_for_one_replica_over_several_gpus() -> None:
    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    sharded = spec["services"]["sharded"]
    assert sharded["profiles"] == ["sharded"]
    assert sharded["environment"]["TENSOR_PARALLEL_SIZE"] == "${TENSOR_PARALLEL_SIZE:-2}"
    (devices,) = sharded["deploy"]["resources"]["reservations"]["devices"]
    assert devices["count"] == sharded["environment"]["TENSOR_PARALLEL_SIZE"]  # one GPU per rank
    assert sharded["shm_size"]  # NCCL between the ranks' processes needs more than Docker's 64 MB
    published = {port.split(":")[0] for service in spec["services"].values() for port in service.get("ports", [])}
    assert len(published) == sum(len(s.get("ports", [])) for s in spec["services"].values())  # no clash
