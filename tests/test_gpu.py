"""The arena's CUDA path: graphs captured and replayed, agreement with eager, memory back after releases.

Skipped without CUDA (this project's CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py -v``.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_runner
from tests.test_runner import Arrival, drive, greedy
from trioserve.model.tinymodel import build_model
from trioserve.text.tokenization import ChatTokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_model(chat_tokenizer: ChatTokenizer) -> torch.nn.Module:
    model = build_model(
        chat_tokenizer.hf, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, dtype=torch.float32
    )
    return torch.nn.Module.to(model, device="cuda")


def _arrivals() -> list[Arrival]:
    return [
        Arrival(0, greedy("a", list(range(10, 70)), 24)),
        Arrival(0, greedy("b", [3, 4, 5], 30)),
        Arrival(3, greedy("c", list(range(100, 140)), 20), leave_after=6),
        Arrival(7, greedy("d", [7, 8, 9, 10], 16)),
    ]


def test_graph_replays_give_the_eager_tokens(cuda_model: torch.nn.Module, chat_tokenizer: ChatTokenizer) -> None:
    graphed = make_runner(cuda_model, chat_tokenizer)
    assert graphed._decode_step is not None and graphed._decode_step.captured, graphed.mode
    eager = make_runner(cuda_model, chat_tokenizer)
    eager._decode_step.captured = False  # type: ignore[union-attr]
    assert drive(graphed, _arrivals()) == drive(eager, _arrivals())


def test_batched_greedy_equals_solo_greedy_in_float32(
    cuda_model: torch.nn.Module, chat_tokenizer: ChatTokenizer
) -> None:
    runner = make_runner(cuda_model, chat_tokenizer)
    batched = drive(runner, _arrivals())
    for arrival in _arrivals():
        name = arrival.request.request_id
        assert batched[name] == drive(runner, [Arrival(0, arrival.request, arrival.leave_after)])[name], name


def test_memory_is_back_after_releases(cuda_model: torch.nn.Module, chat_tokenizer: ChatTokenizer) -> None:
    runner = make_runner(cuda_model, chat_tokenizer)
    drive(runner, _arrivals())  # warm-up: allocator caches, sampler buffers
    torch.cuda.synchronize()
    warm = torch.cuda.memory_allocated()
    for _ in range(5):
        drive(runner, _arrivals())
    torch.cuda.synchronize()
    assert runner.live_sequences() == 0 and runner.arena is not None and runner.arena.free_slots == runner.arena.slots
    assert torch.cuda.memory_allocated() == warm
