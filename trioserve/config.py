"""One settings object, from command-line flags and environment variables.

Every flag has an environment variable; the old FastAPI server's names (``HF_MODEL``, ``HOTLOAD``,
``TORCH_DTYPE``, ``ATTN_IMPLEMENTATION``, ``MAX_CONCURRENT``, ``PORT``) are kept so its users' docker
commands and scripts keep working. A flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DType = Literal["auto", "bfloat16", "float16", "float32", "float64"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Device = Literal["auto", "cpu", "cuda"]
Quantization = Literal["none", "bnb-4bit", "bnb-8bit"]
# The names of `toolparsers.PARSER_NAMES` and `reasoning.PARSER_NAMES` (config imports neither).
ToolCallParser = Literal[
    "auto",
    "none",
    "hermes",
    "llama3_json",
    "mistral",
    "mistral_v11",
    "json",
    "qwen",
    "qwen2_5",
    "qwen3",
    "llama",
    "llama3",
]
ReasoningParser = Literal["auto", "none", "think", "deepseek_r1", "qwen3"]


class Settings(BaseModel):
    """Everything the server is configured with. Field docs are the ``--help`` texts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(None, description="Hub id or local directory; unset serves the built-in demo")
    served_model_name: str | None = Field(None, description="model id reported to clients (default: --model)")
    hotload: bool = Field(False, description="load the model at startup instead of on the first request")
    torch_dtype: DType = Field("auto", description="weights dtype (bnb-4bit: its compute dtype)")
    attn_implementation: AttnImplementation = Field(
        "auto", description="attention kernel (auto: flash-attn where it can run, else what transformers picks)"
    )
    device: Device = Field("auto", description="where the model runs")
    quantization: Quantization = Field("none", description="bitsandbytes quantization (needs the extra)")
    trust_remote_code: bool = Field(False, description="allow model code from the model's repository")
    max_concurrent: int = Field(16, ge=1, description="requests generating at once")
    max_queue: int = Field(256, ge=0, description="requests waiting for a slot; past it: 429")
    max_batch_size: int | None = Field(None, ge=1, description="sequences per decode pass (1: no batching)")
    prefill_chunk: int = Field(512, ge=16, description="prompt tokens per prefill step")
    max_model_len: int | None = Field(
        None, ge=16, description="prompt + output tokens per request; sizes the KV arena (default: model's, <= 4096)"
    )
    cuda_graphs: bool = Field(True, description="replay the decode step as CUDA graphs captured at startup (CUDA)")
    prefix_caching: bool = Field(
        True, description="keep finished requests' KV as evictable cache; prefill only what a prompt does not share"
    )
    prefix_cache_slots: int = Field(
        0, ge=0, description="arena slots beyond --max-concurrent that only hold prefix-cache entries"
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="ranks (GPUs, or CPU processes) one model is sharded over; needs --model"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(7088, ge=0, le=65535, description="port to listen on")
    certfile: str | None = Field(None, description="TLS certificate (enables HTTPS with HTTP/2 via ALPN)")
    keyfile: str | None = Field(None, description="TLS private key")
    request_timeout: float = Field(600.0, gt=0, description="seconds a request may take (per-request override)")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds in-flight requests get on SIGTERM/SIGINT")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    send_timeout: float = Field(
        30.0, gt=0, description="seconds a response may send nothing (its client reads nothing) before it is cancelled"
    )
    max_unread_tokens: int = Field(
        128, ge=1, description="tokens a stream's client may leave unread before its sequence stops decoding"
    )
    max_concurrent_streams: int = Field(
        100, ge=1, le=1000, description="HTTP/2 streams one connection may have open (more are refused)"
    )
    api_key: list[str] = Field([], description="accepted Bearer key (repeatable; env: comma-separated)")
    metrics_public: bool = Field(False, description="serve /metrics without an API key")
    cors_origin: list[str] = Field([], description="allowed CORS origin (repeatable; '*' for any)")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="largest request body accepted")
    max_images_per_request: int = Field(16, ge=0, description="images one request may carry (vision-language models)")
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="bytes of one image (a data: URL's decoded base64, or a fetched body)"
    )
    # At most Pillow's own decompression-bomb limit, which would otherwise refuse first with its own message.
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        le=89_478_485,
        description="width x height of one image, read from its header before decoding",
    )
    remote_images: bool = Field(True, description="fetch http(s) image URLs (off: only data: URLs are taken)")
    image_fetch_timeout: float = Field(
        10.0, gt=0, description="seconds fetching one image URL may take, redirects included"
    )
    allowed_image_domains: list[str] = Field(
        [],
        description="host whose images may be fetched, and its subdomains (repeatable; env: comma-separated; "
        "none: any host)",
    )
    allowed_image_networks: list[str] = Field(
        [],
        description="network (CIDR) image URLs may reach though not public (repeatable; env: comma-separated)",
    )
    allow_private_image_urls: bool = Field(
        False, description="fetch image URLs on loopback, private and link-local addresses (cloud metadata: never)"
    )
    strict_model_name: bool = Field(False, description="404 for requests naming another model")
    responses_store_size: int = Field(
        1000, ge=0, description="finished /v1/responses kept in memory for previous_response_id (LRU; 0: none)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    tool_call_parser: ToolCallParser = Field(
        "auto", description="tool-call syntax: auto (from the chat template), none, or one by name"
    )
    reasoning_parser: ReasoningParser = Field(
        "auto", description="thinking block: auto (from the chat template), none, or think"
    )

    @field_validator("allowed_image_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (CIDR such as 10.0.0.0/8)") from None
        return value

    @model_validator(mode="after")
    def _check_tls_pair(self) -> Settings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("--certfile and --keyfile must be given together")
        return self

    @property
    def batch_size(self) -> int:
        """Sequences per decode pass: ``max_batch_size``, bounded by ``max_concurrent``."""
        return min(self.max_batch_size or self.max_concurrent, self.max_concurrent)


# (field, environment variable, extra flag spellings). The first spelling is --field-name.
_ENV_NAMES: dict[str, tuple[str, ...]] = {
    "model": ("HF_MODEL", "MODEL"),
    "served_model_name": ("SERVED_MODEL_NAME",),
    "hotload": ("HOTLOAD",),
    "torch_dtype": ("TORCH_DTYPE",),
    "attn_implementation": ("ATTN_IMPLEMENTATION",),
    "device": ("DEVICE",),
    "quantization": ("QUANTIZATION",),
    "trust_remote_code": ("TRUST_REMOTE_CODE",),
    "max_concurrent": ("MAX_CONCURRENT",),
    "max_queue": ("MAX_QUEUE",),
    "max_batch_size": ("MAX_BATCH_SIZE",),
    "prefill_chunk": ("PREFILL_CHUNK",),
    "max_model_len": ("MAX_MODEL_LEN",),
    "cuda_graphs": ("CUDA_GRAPHS",),
    "prefix_caching": ("PREFIX_CACHING",),
    "prefix_cache_slots": ("PREFIX_CACHE_SLOTS",),
    "tensor_parallel_size": ("TENSOR_PARALLEL_SIZE",),
    "host": ("HOST",),
    "port": ("PORT",),
    "certfile": ("SSL_CERTFILE",),
    "keyfile": ("SSL_KEYFILE",),
    "request_timeout": ("REQUEST_TIMEOUT",),
    "graceful_timeout": ("GRACEFUL_TIMEOUT",),
    "keep_alive_timeout": ("KEEP_ALIVE_TIMEOUT",),
    "send_timeout": ("SEND_TIMEOUT",),
    "max_unread_tokens": ("MAX_UNREAD_TOKENS",),
    "max_concurrent_streams": ("MAX_CONCURRENT_STREAMS",),
    "api_key": ("API_KEY", "API_KEYS"),
    "metrics_public": ("METRICS_PUBLIC",),
    "cors_origin": ("CORS_ORIGIN", "CORS_ORIGINS"),
    "max_body_bytes": ("MAX_BODY_BYTES",),
    "max_images_per_request": ("MAX_IMAGES_PER_REQUEST",),
    "max_image_bytes": ("MAX_IMAGE_BYTES",),
    "max_image_pixels": ("MAX_IMAGE_PIXELS",),
    "remote_images": ("REMOTE_IMAGES",),
    "image_fetch_timeout": ("IMAGE_FETCH_TIMEOUT",),
    "allowed_image_domains": ("ALLOWED_IMAGE_DOMAINS",),
    "allowed_image_networks": ("ALLOWED_IMAGE_NETWORKS",),
    "allow_private_image_urls": ("ALLOW_PRIVATE_IMAGE_URLS",),
    "strict_model_name": ("STRICT_MODEL_NAME",),
    "responses_store_size": ("RESPONSES_STORE_SIZE",),
    "log_level": ("LOG_LEVEL",),
    "tool_call_parser": ("TOOL_CALL_PARSER",),
    "reasoning_parser": ("REASONING_PARSER",),
}

# Defaults that are not a fixed value, as --help shows them.
_HELP_DEFAULTS = {"max_batch_size": "--max-concurrent"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """Settings that cannot be used; the message names the flag and the environment variable."""


def env_name(field: str) -> str:
    """The primary environment variable of a settings field."""
    return _ENV_NAMES[field][0]


def _parse_bool(text: str, name: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean (use true or false)")


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag's default comes from the environment (see `load_settings`)."""
    parser = argparse.ArgumentParser(
        prog="trioserve",
        description="OpenAI-compatible server for Hugging Face transformers causal LMs.",
        epilog="Every flag can also be set by the environment variable shown in brackets.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = _HELP_DEFAULTS.get(name, info.default)
        help_text = f"{info.description} [{env_name(name)}; default: {default}]"
        if info.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif info.annotation == list[str]:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Reads settings from flags, then environment variables, then defaults.

    Raises:
        ConfigError: a value is malformed or out of range; the message names the flag.
    """
    environ = os.environ if environ is None else environ
    parsed = vars(build_parser().parse_args(argv))
    values: dict[str, object] = {}
    for name, info in Settings.model_fields.items():
        value = parsed.get(name)
        if value is None:
            for env in _ENV_NAMES[name]:
                if env in environ:
                    value = environ[env]
                    break
        if value is None:
            continue
        if info.annotation is bool and isinstance(value, str):
            value = _parse_bool(value, env_name(name))
        if info.annotation == list[str] and isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, str) and value.strip() == "" and info.default is None:
            continue
        values[name] = value
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = f"--{field.replace('_', '-')} / {env_name(field)}" if field in _ENV_NAMES else "settings"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None
    if any(key.strip() != key or not key for key in settings.api_key):
        raise ConfigError("--api-key / API_KEY: keys must be non-empty and have no surrounding spaces")
    return settings
