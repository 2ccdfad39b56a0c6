"""Anthropic's Messages API on top of chat completions.

A request is translated into a chat completions request (`anthropic.input`), prepared, admitted and run by
`ChatService` like any chat request: the same engine, admission (429), deadlines and cancellation, and the
chat path's tool-call grammar and reasoning split. Its results are translated back: a completion into a
message, a stream of chunks into the Messages event sequence (`anthropic.stream`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from trioserve.api.anthropic.input import chat_request, image_places, renamed
from trioserve.api.anthropic.protocol import CountTokensRequest, MessagesRequest, error_body, message_id
from trioserve.api.anthropic.stream import Event, EventWriter
from trioserve.api.chat import ChatService
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.replies import Usage
from trioserve.api.serving import Prepared
from trioserve.engine.engine import TokenStream
from trioserve.errors import InvalidRequest, TrioserveError

# Chat's finish reasons as Anthropic's stop reasons (a matched stop string: "stop_sequence").
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


@dataclass(frozen=True)
class PreparedMessage:
    body: MessagesRequest
    chat: Prepared

    @property
    def message_id(self) -> str:
        return self.chat.completion_id


class MessagesService:
    """``/v1/messages`` and ``/v1/messages/count_tokens`` through a `ChatService`."""

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    def translate(self, body: MessagesRequest) -> ChatCompletionRequest:
        """Raises: InvalidRequest: the request cannot be served (`anthropic.input.chat_request`)."""
        return chat_request(body)

    async def prepare(
        self, body: MessagesRequest, request: ChatCompletionRequest, *, time_limit: float, tenant: str = ""
    ) -> PreparedMessage:
        """Prepares the chat request (template, context and grammar checks), as `ChatService.prepare`."""
        try:
            prepared = await self.chat.prepare(request, request_id=message_id(), time_limit=time_limit, tenant=tenant)
        except InvalidRequest as error:
            raise renamed(error, image_places(body)) from None
        return PreparedMessage(body, prepared)

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, Any]:
        """The prompt's tokens as a Messages request with this body would have it (template and tools)."""
        try:
            prepared = await self.chat.prepare(chat_request(body), time_limit=60.0)
        except InvalidRequest as error:
            raise renamed(error, image_places(body)) from None
        return {"input_tokens": len(prepared.generation.prompt_ids)}

    async def complete(self, prepared: PreparedMessage, streams: Sequence[TokenStream]) -> dict[str, Any]:
        """Runs the request to its end and answers with the whole message."""
        completion = await self.chat.complete(prepared.chat, streams)
        choice = completion.choices[0]
        message = choice.message
        content: list[dict[str, Any]] = []
        reasoning = getattr(message, "reasoning_content", None)
        if isinstance(reasoning, str) and reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if message.content:
            content.append({"type": "text", "text": message.content})
        for call in message.tool_calls or []:
            arguments = json.loads(call.function.arguments or "{}")
            content.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments})
        reason, sequence = self._stop(prepared, choice.finish_reason)
        return self._message(prepared, content, reason, sequence, completion.usage)

    async def stream(self, prepared: PreparedMessage, streams: Sequence[TokenStream]) -> AsyncGenerator[Event, None]:
        """Yields the Messages events of a streamed message (see `EventWriter`). An error (deadline, failed
        step, shutdown) ends the stream with an ``error`` event. Closing the generator closes the chat
        stream and with it the token streams."""
        writer = EventWriter()
        prompt = prepared.chat.timing.prompt_tokens or 0
        for event in writer.start(
            self._message(
                prepared, [], None, None, Usage(prompt_tokens=prompt, completion_tokens=0, total_tokens=prompt)
            )
        ):
            yield event
        finish: str | None = None
        async with aclosing(self.chat.stream(prepared.chat, streams)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, TrioserveError):
                    yield error_body(chunk)
                    return
                for choice in chunk.choices:
                    delta = choice.delta
                    reasoning = getattr(delta, "reasoning_content", None)
                    for event in writer.thinking(reasoning) if isinstance(reasoning, str) and reasoning else ():
                        yield event
                    for event in writer.text(delta.content) if delta.content else ():
                        yield event
                    for call in delta.tool_calls or []:
                        for event in writer.call(call):
                            yield event
                    finish = choice.finish_reason or finish
        reason, sequence = self._stop(prepared, finish)
        timing = prepared.chat.timing
        prompt = timing.prompt_tokens or 0
        for event in writer.finish(reason, sequence, timing.completion_tokens, prompt, timing.cached_tokens):
            yield event

    def _stop(self, prepared: PreparedMessage, finish: str | None) -> tuple[str, str | None]:
        sequence = prepared.chat.matched_stops.get(0)
        if sequence is not None:
            return "stop_sequence", sequence
        return _STOP_REASONS.get(finish or "stop", "end_turn"), None

    def _message(
        self,
        prepared: PreparedMessage,
        content: list[dict[str, Any]],
        stop_reason: str | None,
        stop_sequence: str | None,
        usage: Usage | None,
    ) -> dict[str, Any]:
        return {
            "id": prepared.message_id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": prepared.chat.model,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage_of(usage),
        }


def usage_of(usage: Usage | None) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` are those not read from the prefix cache (its total input is the sum
    of the three), ``cache_read_input_tokens`` those that were. Nothing is billed as a cache write."""
    prompt = usage.prompt_tokens if usage is not None else 0
    cached = usage.prompt_tokens_details.cached_tokens if usage is not None else 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": usage.completion_tokens if usage is not None else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }
