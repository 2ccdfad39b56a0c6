"""From settings to a ready `TransformersRunner`: device, dtype, attention kernel, quantization, weights.

Every choice the hardware cannot honour fails here, at startup, with a message that names the setting and
the way out, rather than deep inside the first forward pass.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

from trioserve.config import ConfigError, Settings
from trioserve.model.architectures import needs_whole_prefill, one_per_pass_reason, unsupported_reason
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinymodel import DEMO_MODEL_ID, build_model, build_tokenizer
from trioserve.text.processor import VisionTokenizer
from trioserve.text.tokenization import ChatTokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("DEVICE=cuda but no CUDA GPU is visible to torch; use DEVICE=cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on the CPU."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        bf16_ok = major >= 8
        if requested == "bfloat16" and not bf16_ok:
            raise ConfigError(
                f"TORCH_DTYPE=bfloat16 needs a GPU of compute capability 8.0 or newer; this one is "
                f"{major}.{minor}. Use TORCH_DTYPE=float16 (or auto)."
            )
        if requested == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
    elif requested == "auto":
        return torch.float32
    return _DTYPES[requested]


def resolve_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """The ``attn_implementation`` to ask transformers for; None lets it pick for the model.

    ``auto`` takes flash-attn when it can run here (the loader falls back if the model has no flash-attn
    path), else None: transformers then uses SDPA where the model supports it and eager attention where it
    does not (Gemma 2's softcapping, GPT-OSS's sinks, Bloom's ALiBi, Mamba's lack of attention). Naming a
    kernel makes it a must: flash_attention_2 that cannot run here is an error now, and one the model does
    not support is an error at load.
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    flash_ok = has_flash and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "flash_attention_2" and not flash_ok:
        if not has_flash:
            why = "the flash-attn package is not installed (pip install 'trioserve[flash-attn]', CUDA only)"
        elif device.type != "cuda":
            why = "it runs only on a CUDA GPU"
        else:
            why = "it needs TORCH_DTYPE=bfloat16 or float16"
        raise ConfigError(f"ATTN_IMPLEMENTATION=flash_attention_2 cannot be used: {why}. Use sdpa or auto.")
    if requested == "auto":
        return "flash_attention_2" if flash_ok else None
    return requested


def _quantization_config(settings: Settings, device: torch.device, dtype: torch.dtype) -> object | None:
    if settings.quantization == "none":
        return None
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"QUANTIZATION={settings.quantization} needs a CUDA GPU and bitsandbytes (pip install 'trioserve[bnb]')"
        )
    from transformers import BitsAndBytesConfig

    if settings.quantization == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]


def _eos_ids(model: PreTrainedModel, tokenizer: ChatTokenizer) -> frozenset[int]:
    """Every EOS id the generation config names, plus the tokenizer's own."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.hf.eos_token_id is not None:
        ids.add(int(tokenizer.hf.eos_token_id))
    return frozenset(ids)


def _sharding(size: int) -> object | None:
    """The model's own tensor-parallel plan over ``size`` ranks (None: one process holds the whole model)."""
    if size == 1:
        return None
    from transformers import DistributedConfig

    return DistributedConfig(tp_plan="auto", tp_size=size)


def load_runner(
    settings: Settings,
    *,
    runner_class: type[TransformersRunner] = TransformersRunner,
    device: torch.device | None = None,
) -> TransformersRunner:
    """Loads the model named by the settings (or builds the demo) and wraps it in a runner.

    With ``--tensor-parallel-size`` above 1 the process group must be joined first (`trioserve.model.ranks`):
    each rank loads its shard (``tp_plan="auto"``) onto ``device``, its own, and its runner is a ``runner_class``.

    Raises:
        ConfigError: the settings ask for something this machine or install cannot do.
    """
    device = device or resolve_device(settings.device)
    dtype = resolve_dtype(settings.torch_dtype, device)
    attention = resolve_attention(settings.attn_implementation, device, dtype)
    if settings.model is None:
        logger.warning(
            "no model named: serving the built-in demo '%s', a tiny model with RANDOM weights (its output is "
            "noise). Name a real one with --model or HF_MODEL=<hub id or local directory>.",
            DEMO_MODEL_ID,
        )
        demo_tokenizer = build_tokenizer()
        model = build_model(demo_tokenizer, dtype=dtype)
        hf_tokenizer: PreTrainedTokenizerBase | ProcessorMixin = demo_tokenizer
        if attention is not None:
            model.set_attn_implementation(attention)
        torch.nn.Module.to(model, device=device)
        model_id = DEMO_MODEL_ID
    else:
        hf_tokenizer, model = _load_pretrained(settings, device, dtype, attention)
        model_id = settings.model.rstrip("/").split("/")[-1] if Path(settings.model).is_dir() else settings.model
    tokenizer = (
        VisionTokenizer(hf_tokenizer) if isinstance(hf_tokenizer, ProcessorMixin) else ChatTokenizer(hf_tokenizer)
    )
    runner = runner_class(
        model,
        tokenizer,
        model_id=settings.served_model_name or model_id,
        max_batch_size=settings.batch_size,
        eos_token_ids=_eos_ids(model, tokenizer),
        max_model_len=settings.max_model_len,
        cuda_graphs=settings.cuda_graphs,
        prefix_caching=settings.prefix_caching,
        prefix_cache_slots=settings.prefix_cache_slots,
    )
    if runner.max_batch_size == 1 and settings.batch_size > 1:
        reason = one_per_pass_reason(model.config) or runner.mode
        logger.warning("%s runs one sequence per forward pass (taking turns): %s", runner.model_id, reason)
    else:
        logger.info("%s: decoding %s", runner.model_id, runner.mode)
    logger.info("%s: prefix caching %s", runner.model_id, runner.prefix_caching)
    if tokenizer.takes_images:
        logger.info("%s: vision-language: images in chat and Responses", runner.model_id)
    if (whole := needs_whole_prefill(model.config)) is not None:
        logger.info("%s prefills each prompt in one forward pass: %s", runner.model_id, whole)
    # Now, with the model, rather than in the first JSON-mode request's step, where it would stall the batch.
    runner.guides.prepare()
    return runner


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether a config is a vision-language model's: it nests a vision config and transformers maps it to
    an image-text-to-text class (Gemma 3's also maps to a causal LM: its images still need the processor)."""
    model_type = str(config.model_type)
    return (
        getattr(config, "vision_config", None) is not None and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )


def _auto_class(config: PretrainedConfig, name: str) -> type[Any]:
    """The auto class that loads this config.

    Raises:
        ConfigError: neither a causal LM nor an image-text-to-text model (an encoder, a classifier...).
    """
    if is_vision_language(config):
        return AutoModelForImageTextToText
    remote = getattr(config, "auto_map", None) or {}
    model_type = str(config.model_type)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "AutoModelForCausalLM" in remote:
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in remote:
        return AutoModelForImageTextToText
    raise ConfigError(
        f"{name} cannot be served: its config ({type(config).__name__}, model_type {model_type!r}) is neither a "
        "causal language model nor an image-text-to-text model, the two kinds trioserve generates text with"
    )


def _load_pretrained(
    settings: Settings, device: torch.device, dtype: torch.dtype, attention: str | None
) -> tuple[PreTrainedTokenizerBase | ProcessorMixin, PreTrainedModel]:
    """Tokenizer (a processor, for a vision-language model) and model from a hub id or local directory, after
    checking the family can be served."""
    name = settings.model
    assert name is not None
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=settings.trust_remote_code)
    except ValueError as exc:  # a model type this transformers does not know (or remote code not trusted)
        raise ConfigError(f"{name} cannot be served: {exc}") from exc
    if (reason := unsupported_reason(config)) is not None:
        raise ConfigError(f"{settings.model} cannot be served: {reason}")
    auto_class = _auto_class(config, name)
    quantization = _quantization_config(settings, device, dtype)
    hf_tokenizer: PreTrainedTokenizerBase | ProcessorMixin
    if auto_class is AutoModelForImageTextToText:
        try:
            hf_tokenizer = AutoProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                name, trust_remote_code=settings.trust_remote_code
            )
        except (ImportError, OSError, ValueError) as exc:
            raise ConfigError(f"{name} is a vision-language model but its processor cannot be loaded: {exc}") from exc
        if not isinstance(hf_tokenizer, ProcessorMixin):
            raise ConfigError(f"{name} is a vision-language model but ships no image processor")
    else:
        hf_tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=settings.trust_remote_code)

    def load(attn_implementation: str | None) -> PreTrainedModel:
        model: PreTrainedModel = auto_class.from_pretrained(
            name,
            config=config,
            dtype=dtype,
            attn_implementation=attn_implementation,
            quantization_config=quantization,
            device_map=str(device) if quantization is not None else None,
            # Sharded by transformers over the process group's ranks (each onto its LOCAL_RANK's device).
            distributed_config=_sharding(settings.tensor_parallel_size),
            trust_remote_code=settings.trust_remote_code,
        )
        return model

    logger.info("loading %s (%s, %s, attention=%s)", settings.model, device, dtype, attention or "auto")
    try:
        model = load(attention)
    except (ValueError, ImportError) as exc:
        # transformers checks the kernel against the model class before reading any weights, so this is cheap.
        if attention is None or "attention" not in str(exc).lower():
            raise
        if settings.attn_implementation != "auto":
            raise ConfigError(
                f"ATTN_IMPLEMENTATION={attention} cannot be used with {settings.model}: {exc} "
                "Use ATTN_IMPLEMENTATION=auto to let transformers pick one the model supports."
            ) from exc
        logger.info("%s has no %s path; letting transformers pick the attention kernel", settings.model, attention)
        model = load(None)
    if quantization is None:
        torch.nn.Module.to(model, device=device)
    torch.nn.Module.eval(model)
    logger.info("%s uses %s attention", settings.model, model.config._attn_implementation)
    return hf_tokenizer, model


def check_settings(settings: Settings) -> None:
    """Fails fast on settings this machine cannot honour, before the server binds (even without HOTLOAD).

    Raises:
        ConfigError: naming the setting and the alternative.
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.torch_dtype, device)
    resolve_attention(settings.attn_implementation, device, dtype)
    if settings.model is not None:
        _quantization_config(settings, device, dtype)
    elif settings.quantization != "none":
        raise ConfigError("QUANTIZATION needs a real model (--model / HF_MODEL); the demo model is not quantized")
