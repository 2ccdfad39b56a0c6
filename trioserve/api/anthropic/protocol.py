"""Wire models of Anthropic's Messages API, in the field order of its reference, and its error shape.

Requests are strict (`WireModel`): a wrong JSON type is a 400, as everywhere else. Content blocks are a
union discriminated by ``type``. What goes out is built as plain dicts (`stream`, `service`) in the shapes
of the `anthropic` SDK's models (`anthropic.types`); the tests parse every object with the SDK.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from trioserve.api.validation import WireModel
from trioserve.errors import TrioserveError


def is_messages_path(path: str) -> bool:
    """Whether ``path`` is this API's (``/v1/messages`` and below): errors there take its shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class TextBlock(WireModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations: accepted, no effect here
    type: Literal["text"]
    text: str


class ImageBlock(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["image"]
    source: dict[str, Any]


class ToolUseBlock(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool | None = None


class ThinkingBlock(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class MessageParam(WireModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolDefinition(WireModel):
    """A client tool: its name, description and the JSON schema of its ``input``."""

    model_config = ConfigDict(extra="allow")  # cache_control, strict: accepted
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(WireModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["enabled", "disabled"]
    budget_tokens: Annotated[int, Field(ge=1)] | None = None


class Metadata(WireModel):
    model_config = ConfigDict(extra="allow")
    user_id: str | None = None


class CountTokensRequest(WireModel):
    """``POST /v1/messages/count_tokens``: what the prompt of a Messages request would be."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``. Unknown fields are accepted (newer SDKs send more); the sampling extensions of
    chat completions (``seed``, ``logit_bias``, ``ignore_eos``, ...) among them reach the chat request."""

    max_tokens: Annotated[int, Field(ge=1)]
    metadata: Metadata | None = None
    service_tier: str | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None


# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(error: TrioserveError, status: int | None = None) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``, the type from the status as Anthropic's."""
    kind = _ERROR_TYPES.get(status or error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}
