"""The Responses API (``POST /v1/responses``) on top of chat completions.

A request is translated into a chat completions request (`responses_input`), prepared, admitted and run
by `ChatService` like any chat request: the same engine, admission (429), deadlines and cancellation,
and whatever the chat path makes of tools, formats and reasoning. Its results are translated back: a
completion into a response object, a stream of chunks into the Responses event sequence. Finished
responses are kept in a bounded in-memory store (`ResponseStore`) for ``previous_response_id``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from trioserve.api.chat import ChatService
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.replies import AssistantMessage, Usage, now
from trioserve.api.responses.input import (
    ChatMessageDict,
    chat_request,
    image_param,
    input_messages,
    output_messages,
    renamed,
)
from trioserve.api.responses.protocol import (
    FunctionCall,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    Reasoning,
    ReasoningText,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseUsage,
    item_id,
    response_id,
)
from trioserve.api.responses.store import ResponseStore
from trioserve.api.responses.stream import EventWriter
from trioserve.api.serving import Prepared
from trioserve.api.toolcalls import ToolCall
from trioserve.engine.engine import TokenStream
from trioserve.errors import InvalidRequest, TrioserveError


class ResponseNotFound(TrioserveError):
    """``GET``/``DELETE /v1/responses/{id}`` of an id not in the store (never stored, or evicted)."""

    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


@dataclass(frozen=True)
class Turn:
    """A Responses request resolved against its history and translated for the chat path."""

    body: ResponsesRequest
    chat: ChatCompletionRequest
    conversation: tuple[ChatMessageDict, ...]  # history and this turn's input, without the instructions
    # Where each of the chat request's messages came from (``input[2]``, ``instructions``,
    # ``previous_response_id``), to name a refused image part as the Responses API does.
    sources: tuple[str, ...] = ()


@dataclass
class PreparedResponse:
    turn: Turn
    chat: Prepared
    created_at: int = field(default_factory=now)

    @property
    def response_id(self) -> str:
        return self.chat.completion_id


class ResponsesService:
    """``/v1/responses`` through a `ChatService`, with a store of finished responses.

    Args:
        chat: the chat path every response runs on.
        store: where finished responses are kept (``store: false`` ones are not).
    """

    def __init__(self, chat: ChatService, store: ResponseStore) -> None:
        self.chat = chat
        self.store = store

    def translate(self, body: ResponsesRequest) -> Turn:
        """Resolves ``previous_response_id`` and builds the chat request; nothing is started.

        Raises:
            InvalidRequest: the previous response is not stored, or the request cannot be served.
        """
        history: tuple[ChatMessageDict, ...] = ()
        if body.previous_response_id is not None:
            stored = self.store.get(body.previous_response_id)
            if stored is None:
                raise InvalidRequest(
                    f"Previous response with id '{body.previous_response_id}' not found (this server keeps the "
                    f"last {self.store.capacity} stored responses, in memory).",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            history = stored.conversation
        messages, sources = input_messages(body)
        origins = (["instructions"] if body.instructions else []) + ["previous_response_id"] * len(history) + sources
        return Turn(body, chat_request(body, history, messages), (*history, *messages), tuple(origins))

    async def prepare(self, turn: Turn, *, time_limit: float, tenant: str = "") -> PreparedResponse:
        """Prepares the chat request (template, context and grammar checks), as `ChatService.prepare`.

        Raises:
            InvalidRequest: as `ChatService.prepare`, with the Responses API's parameter names.
        """
        try:
            prepared = await self.chat.prepare(
                turn.chat, request_id=response_id(), time_limit=time_limit, tenant=tenant
            )
        except InvalidRequest as error:
            where = image_param(error.param, turn.sources) if error.param is not None else None
            if where is None:
                raise renamed(error) from None
            error.message = error.message.replace(f"{error.param}:", f"{where}:", 1)
            error.param = where
            raise
        return PreparedResponse(turn, prepared)

    def get(self, response_id: str) -> Response | None:
        stored = self.store.get(response_id)
        return stored.response if stored is not None else None

    async def complete(self, prepared: PreparedResponse, streams: Sequence[TokenStream]) -> Response:
        """Runs the request to its end and answers with the whole response object (stored if asked)."""
        completion = await self.chat.complete(prepared.chat, streams)
        choice = completion.choices[0]
        incomplete = choice.finish_reason == "length"
        output = _output_of(choice.message, "incomplete" if incomplete else "completed")
        response = self.response(prepared, "incomplete" if incomplete else "completed", output, completion.usage)
        self._keep(prepared, response)
        return response

    async def stream(self, prepared: PreparedResponse, streams: Sequence[TokenStream]) -> AsyncGenerator[Any, None]:
        """Yields the Responses events (`responses_protocol.StreamEvent`) of a streamed response.

        ``response.created`` and ``response.in_progress`` first; then each output item as it forms (added,
        its deltas, done); then ``response.completed`` (``response.incomplete`` when cut by
        ``max_output_tokens``). An error (deadline, failed step, shutdown) ends the stream with an
        ``error`` event and ``response.failed``. Closing the generator closes the chat stream and with it
        the token streams.
        """
        writer = EventWriter()
        yield writer.lifecycle("response.created", self.response(prepared, "in_progress", [], None))
        yield writer.lifecycle("response.in_progress", self.response(prepared, "in_progress", [], None))
        usage: Usage | None = None
        finish: str | None = None
        async with aclosing(self.chat.stream(prepared.chat, streams)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, TrioserveError):
                    for event in writer.error(chunk):
                        yield event
                    failure = ResponseError(
                        code="rate_limit_exceeded" if chunk.status == 429 else "server_error", message=chunk.message
                    )
                    failed = self.response(prepared, "failed", writer.output(), None, error=failure)
                    yield writer.lifecycle("response.failed", failed)
                    return
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    delta = choice.delta
                    reasoning = getattr(delta, "reasoning_content", None)  # present once the chat path splits it
                    for event in writer.reasoning(reasoning) if isinstance(reasoning, str) and reasoning else ():
                        yield event
                    for event in writer.text(delta.content) if delta.content else ():
                        yield event
                    for call in delta.tool_calls or []:
                        for event in writer.call(call):
                            yield event
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
                        for event in writer.finish("incomplete" if finish == "length" else "completed"):
                            yield event
        status = "incomplete" if finish == "length" else "completed"
        response = self.response(prepared, status, writer.output(), usage)
        self._keep(prepared, response)
        yield writer.lifecycle(f"response.{status}", response)

    def response(
        self,
        prepared: PreparedResponse,
        status: str,
        output: list[OutputItem],
        usage: Usage | None,
        *,
        error: ResponseError | None = None,
    ) -> Response:
        """The response object: ``output`` and ``usage`` so far, and the request's settings echoed."""
        body = prepared.turn.body
        text_format = body.text.format if body.text is not None else None
        reasoning_tokens = sum(
            self._count(part.text) for item in output if item.type == "reasoning" for part in item.content
        )
        return Response(
            id=prepared.response_id,
            created_at=prepared.created_at,
            status=status,
            error=error,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=prepared.chat.model,
            output=output,
            parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning is not None else None,
            store=body.store,
            temperature=body.temperature,
            text={
                "format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}
            },
            tool_choice=body.tool_choice,
            tools=body.tools,
            top_p=body.top_p,
            truncation=body.truncation or "disabled",
            usage=None if usage is None else _usage_of(usage, reasoning_tokens),
            user=body.user,
            metadata=body.metadata or {},
        )

    def _count(self, text: str) -> int:
        runner = self.chat.engine.runner
        return len(runner.tokenizer.encode(text)) if runner is not None and text else 0

    def _keep(self, prepared: PreparedResponse, response: Response) -> None:
        if prepared.turn.body.store:
            self.store.put(response, (*prepared.turn.conversation, *output_messages(response.output)))


def _usage_of(usage: Usage, reasoning_tokens: int) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        # Counted by re-encoding the reasoning text (the chat path does not count tokens per part): text
        # that is not what the tokenizer would write re-encodes longer, so never more than was generated.
        output_tokens_details=OutputTokensDetails(reasoning_tokens=min(reasoning_tokens, usage.completion_tokens)),
        total_tokens=usage.total_tokens,
    )


def _output_of(message: AssistantMessage, status: Any) -> list[OutputItem]:
    """A chat answer as output items: its reasoning, its text (always, unless it only calls), its calls."""
    output: list[OutputItem] = []
    reasoning = getattr(message, "reasoning_content", None)
    if isinstance(reasoning, str) and reasoning:
        output.append(Reasoning(id=item_id("rs"), content=[ReasoningText(text=reasoning)], status="completed"))
    calls: list[ToolCall] = message.tool_calls or []
    if message.content or not calls:
        text = OutputText(text=message.content or "")
        output.append(OutputMessage(id=item_id("msg"), status=status, content=[text]))
    for call in calls:
        output.append(
            FunctionCall(
                id=item_id("fc"),
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
                status="completed",
            )
        )
    return output
