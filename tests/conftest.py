from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator

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
