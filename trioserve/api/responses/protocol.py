"""Wire models of the Responses API (``POST /v1/responses``), in the field order of OpenAI's reference.

The request keeps ``input`` items, ``tools`` and ``tool_choice`` as plain JSON here: `responses_input`
checks them one by one, so a 400 names the exact item (``input[2].content[0].type``) rather than the
pydantic union that failed to match. Fields this server does not take (background mode, prompt templates,
conversations) are declared so they can be refused by name. What goes out mirrors the `openai` SDK's
models (`openai.types.responses`); the tests parse every object with them.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trioserve.api.validation import WireModel
from trioserve.errors import InvalidRequest

ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]


def response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def item_id(prefix: str) -> str:
    """An output item's id: ``msg_``, ``fc_`` or ``rs_`` and 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


# -- requests -------------------------------------------------------------------------------------------


class TextFormat(WireModel):
    """``text.format``: free text, any JSON object, or JSON matching a schema (flat, unlike chat's)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(WireModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(WireModel):
    model_config = ConfigDict(extra="allow")
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(WireModel):
    """``POST /v1/responses``. Unknown fields are accepted; the sampling extensions of chat completions
    (``seed``, ``logit_bias``, ``top_k``, ...) are among them and reach the chat request as they are."""

    model_config = ConfigDict(extra="allow")

    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt: dict[str, Any] | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        """Refuses, by name, what this server does not do.

        Raises:
            InvalidRequest: background mode, stored prompts, conversations, or logprobs were asked for.
        """
        if self.background:
            raise InvalidRequest("background mode is not supported by this server", param="background")
        if self.prompt is not None:
            raise InvalidRequest("stored prompt templates are not supported by this server", param="prompt")
        if self.conversation is not None:
            raise InvalidRequest(
                "conversations are not supported by this server; use previous_response_id", param="conversation"
            )
        if self.top_logprobs:
            raise InvalidRequest("top_logprobs is not supported on /v1/responses by this server", param="top_logprobs")


# -- responses ------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionCall(BaseModel):
    """A ``function_call`` output item: ``call_id`` is what the client's ``function_call_output`` answers."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str  # JSON text
    status: ItemStatus


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class Reasoning(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = []
    content: list[ReasoningText]
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall | Reasoning


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseError(BaseModel):
    code: Literal["server_error", "rate_limit_exceeded"] = "server_error"
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(BaseModel):
    """A response object; its fields echo the request's settings, as OpenAI's do."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


# -- stream events (each carries the response's running sequence_number) --------------------------------


class ResponseEvent(BaseModel):
    """``response.created`` / ``.in_progress`` / ``.completed`` / ``.incomplete`` / ``.failed``."""

    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete", "response.failed"
    ]
    sequence_number: int
    response: Response


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta", "response.reasoning_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []  # output_text only: dropped from reasoning_text events by `dump_event`


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done", "response.reasoning_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    ResponseEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)


def dump_event(event: StreamEvent) -> dict[str, Any]:
    """JSON-ready event; reasoning text events carry no ``logprobs`` field (OpenAI sends none)."""
    data = event.model_dump(mode="json")
    if data["type"].startswith("response.reasoning_text."):
        data.pop("logprobs", None)
    return data
