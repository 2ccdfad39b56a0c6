"""Loading: the real from_pretrained path on a local directory, and clear errors for what cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_architectures import FAMILIES, UNSUPPORTED, make_runner, tiny_model, tokenizer
from trioserve.config import ConfigError, Settings
from trioserve.model import arena_setup
from trioserve.model.arena import KVArena
from trioserve.model.attention import DecodeMasks
from trioserve.model.loading import check_settings, load_runner, resolve_attention, resolve_dtype
from trioserve.model.tinymodel import save_tiny_model
from trioserve.types import GenerationRequest, PrefillChunk, SamplingParams, StepPlan


def test_from_pretrained_on_a_local_directory(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "my-tiny-llama")
    runner = load_runner(Settings(model=str(model_dir), torch_dtype="float32"))
    assert runner.model_id == "my-tiny-llama"
    assert runner.eos_token_ids == {
        runner.tokenizer.hf.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    }
    prompt = tuple(runner.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))
    request = GenerationRequest("r", prompt, SamplingParams(temperature=0.0, max_tokens=3))
    output = runner.step(StepPlan(prefill=(PrefillChunk(0, request, 0, len(prompt)),)))
    assert 0 <= output.tokens[0].token_id < runner.vocab_size
    runner.release(0)
    assert runner.live_sequences() == 0


def test_served_model_name_overrides_the_id(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "m")
    assert load_runner(Settings(model=str(model_dir), served_model_name="gpt-4o")).model_id == "gpt-4o"


def test_flash_attention_named_without_the_package_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="flash-attn"):
        resolve_attention("flash_attention_2", torch.device("cpu"), torch.float32)
    assert resolve_attention("auto", torch.device("cpu"), torch.float32) is None  # transformers picks


def test_cuda_asked_for_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="DEVICE=cuda"):
        check_settings(Settings(device="cuda"))


def test_quantization_needs_cuda_and_bitsandbytes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QUANTIZATION"):
        check_settings(Settings(model=str(tmp_path), quantization="bnb-4bit", device="cpu"))


def test_bfloat16_on_an_old_gpu_names_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    # The capability query is the only GPU fact this decision uses; a T4 reports 7.5.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ConfigError, match="TORCH_DTYPE=float16"):
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_cpu_auto_dtype_is_float32() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def _save(family_name: str, path: Path) -> Path:
    """A tiny random-weight model of a matrix family, saved as a hub-style local directory."""
    family = next(f for f in FAMILIES + UNSUPPORTED if f.model_type == family_name)
    tiny_model(family).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("family", "kernel"),
    [
        ("llama", "sdpa"),
        ("gemma2", "eager"),
        ("gpt_oss", "eager"),
        ("bloom", "eager"),
        ("mamba", "eager"),
        ("mamba2", "eager"),
    ],
)
def test_auto_attention_lets_transformers_pick(tmp_path: Path, family: str, kernel: str) -> None:
    # Forcing sdpa, as auto once did, made every family but llama here fail to start.
    runner = load_runner(Settings(model=str(_save(family, tmp_path / family))))
    assert runner.model.config._attn_implementation.removeprefix("trioserve_") == kernel  # the arena wraps it
    request = GenerationRequest("r", (5, 6, 7), SamplingParams(temperature=0.0, max_tokens=2))
    assert 0 <= runner.step(StepPlan(prefill=(PrefillChunk(0, request, 0, 3),))).tokens[0].token_id < runner.vocab_size
    runner.release(0)


def test_named_attention_the_model_lacks_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ATTN_IMPLEMENTATION=sdpa cannot be used with .*ATTN_IMPLEMENTATION=auto"):
        load_runner(Settings(model=str(_save("gemma2", tmp_path / "g")), attn_implementation="sdpa"))
    eager = load_runner(Settings(model=str(_save("llama", tmp_path / "l")), attn_implementation="eager"))
    assert eager.model.config._attn_implementation.removeprefix("trioserve_") == "eager"


def test_unservable_family_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be served: RecurrentGemma keeps its recurrent"):
        load_runner(Settings(model=str(_save("recurrent_gemma", tmp_path / "rg"))))


def test_startup_log_names_a_model_run_one_sequence_per_pass(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_runner(Settings(model=str(_save("mamba", tmp_path / "m"))))
    messages = [r.getMessage() for r in caplog.records if r.name == "trioserve.model.loading"]
    assert any("m runs one sequence per forward pass" in m and "recurrent layers" in m for m in messages)
    assert any("prefills each prompt in one forward pass" in m and "Mamba-1" in m for m in messages)
    caplog.clear()
    load_runner(Settings(model=str(_save("llama", tmp_path / "l"))))
    assert not any("one sequence per forward pass" in r.getMessage() for r in caplog.records)


def test_a_failing_arena_set_up_falls_back_to_one_sequence_per_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong building the arena or probing it, the model still serves, one sequence per pass."""

    class BrokenArena(KVArena):
        def store(self, *args: Any, **kwargs: Any) -> tuple[int, ...]:
            raise RuntimeError("the arena cannot hold this model")

    monkeypatch.setattr(arena_setup, "KVArena", BrokenArena)
    runner = load_runner(Settings(model=str(_save("llama", tmp_path / "l"))))
    assert runner.max_batch_size == 1
    assert runner.arena is None
    assert not runner.model.config._attn_implementation.startswith("trioserve_")  # wrapper taken off again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "l runs one sequence per forward pass" in m and "the arena cannot hold this model" in m for m in warnings
    )
    request = GenerationRequest("r", (5, 6, 7), SamplingParams(temperature=0.0, max_tokens=2))
    first = runner.step(StepPlan(prefill=(PrefillChunk(0, request, 0, 3),))).tokens[0].token_id
    assert runner.step(StepPlan(decode=(0,))).tokens[0].token_id < runner.vocab_size
    assert first < runner.vocab_size
    runner.release(0)


def test_the_probe_catches_masks_that_let_a_row_see_past_its_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time probe decodes two rows of different lengths, with noise in the columns the shorter row must
    not see: a mask that lets it see them keeps the model off the arena."""
    mask = DecodeMasks.mask

    def everything_visible(self: DecodeMasks, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        allowed = mask(self, window, dtype)
        return torch.zeros_like(allowed) if self._additive else torch.ones_like(allowed)

    monkeypatch.setattr(DecodeMasks, "mask", everything_visible)
    family = next(f for f in FAMILIES if f.model_type == "llama")
    runner = make_runner(family)
    assert runner.max_batch_size == 1
    assert "do not decode correctly from the arena" in runner.mode
