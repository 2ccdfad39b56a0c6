from __future__ import annotations

import gc
import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tests.servers import Served, demo_app, serve_on_loopback
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinymodel import build_model, build_tokenizer
from trioserve.text.tokenization import ChatTokenizer


@pytest.fixture(autouse=True)
def _quiet_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="trioserve")


_popen_init = subprocess.Popen.__init__
_started: list[subprocess.Popen[Any]] = []  # during the current test


def _recording_popen_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _popen_init(self, *args, **kwargs)
    _started.append(self)


@pytest.fixture(autouse=True)
def _no_process_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fails the test that leaves a subprocess running or not waited for (no exit status collected), rather
    than a later one: a `Popen` left to the garbage collector warns in whichever test runs then, and a
    leftover server takes CPU from the rest of the suite. What it finds is killed and reaped."""
    monkeypatch.setattr(subprocess.Popen, "__init__", _recording_popen_init)
    yield
    left = [process for process in _started if process.returncode is None]
    _started.clear()
    for process in left:
        process.kill()
        process.wait()
    assert not left, f"the test left processes running or not waited for: {[p.args for p in left]}"


@pytest.fixture(scope="session")
def hf_tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer(hf_tokenizer: PreTrainedTokenizerBase) -> ChatTokenizer:
    return ChatTokenizer(hf_tokenizer)


@pytest.fixture(scope="session")
def model64(hf_tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    return build_model(hf_tokenizer, dtype=torch.float64)


def make_runner(model: PreTrainedModel, tokenizer: ChatTokenizer, max_batch_size: int = 8) -> TransformersRunner:
    eos = frozenset(int(i) for i in model.generation_config.eos_token_id)
    return TransformersRunner(model, tokenizer, model_id="tiny", max_batch_size=max_batch_size, eos_token_ids=eos)


def live_caches() -> int:
    """DynamicCache objects alive anywhere in this process."""
    gc.collect()
    return sum(type(o) is DynamicCache for o in gc.get_objects())


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """The demo app behind a real Hypercorn on loopback."""
    async with serve_on_loopback(demo_app(max_concurrent=8)) as served:
        yield served
