"""Loading vision-language checkpoints: the real from_pretrained path on saved tiny models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import DistilBertConfig

from tests.test_vision_runner import Arrival, drive, picture, reference, request
from trioserve.config import ConfigError, Settings
from trioserve.model.loading import load_runner
from trioserve.model.tinymodel import save_tiny_model
from trioserve.model.tinyvision import available_families, save_tiny_vision
from trioserve.text.processor import VisionTokenizer


@pytest.mark.parametrize("family", ["llava", "paddleocr_vl"])
def test_a_saved_vision_model_loads_and_takes_images(
    family: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert family in available_families()
    model_dir = save_tiny_vision(tmp_path / f"tiny-{family}", family)
    with caplog.at_level(logging.INFO, logger="trioserve.model.loading"):
        runner = load_runner(Settings(model=str(model_dir), torch_dtype="float32", max_batch_size=4))
    assert "vision-language: images in chat and Responses" in caplog.text
    assert isinstance(runner.tokenizer, VisionTokenizer) and runner.tokenizer.takes_images
    assert runner.max_batch_size == 4  # the arena serves its language model
    tokenizer = runner.tokenizer
    arrivals = [
        Arrival(0, request("img", tokenizer, "what is this", [picture(3)])),
        Arrival(0, request("txt", tokenizer, "hello there", tokens=4)),
    ]
    assert drive(runner, arrivals) == {a.request.request_id: reference(runner.model, a.request) for a in arrivals}


def test_text_models_keep_the_causal_lm_path(tmp_path: Path) -> None:
    runner = load_runner(Settings(model=str(save_tiny_model(tmp_path / "llama")), torch_dtype="float32"))
    assert not runner.tokenizer.takes_images
    with pytest.raises(Exception, match="does not take image input"):
        runner.tokenizer.encode_images("hi", [picture(1)])


def test_a_model_neither_class_takes_is_a_clean_startup_error(tmp_path: Path) -> None:
    DistilBertConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="neither a causal language model nor an image-text-to-text model"):
        load_runner(Settings(model=str(tmp_path), torch_dtype="float32"))
