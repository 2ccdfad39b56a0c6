"""The generation routes: chat and legacy completions, the Responses API and Anthropic's Messages API.

Each parses its body, prepares it with its service (`trioserve.api`), then shares one path (`answer`):
admission, then one JSON body or SSE frames. Every generating request is counted in ``app.generating``
until it ends, so the drain deadline closes any still running with an error event of its API's shape.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from quart import Response, request

from trioserve.api.anthropic.protocol import MessagesRequest
from trioserve.api.anthropic.service import MessagesService
from trioserve.api.chat import ChatService
from trioserve.api.completions import CompletionService
from trioserve.api.protocol import ChatCompletionRequest, CompletionRequest
from trioserve.api.responses.protocol import ResponsesRequest, dump_event
from trioserve.api.responses.service import ResponsesService
from trioserve.api.serving import RequestTiming
from trioserve.config import Settings
from trioserve.engine.engine import TokenStream
from trioserve.errors import InvalidRequest, TrioserveError, Unavailable
from trioserve.server.httpio import SSE_HEADERS, RequestState, current_state, json_response, parse_body, tenant
from trioserve.server.sse import ChunkEncoder, sse_event
from trioserve.types import GenerationRequest

if TYPE_CHECKING:
    from trioserve.server.app import TrioserveApp

RequestBody = ChatCompletionRequest | CompletionRequest
Frames = Callable[[list[TokenStream]], AsyncGenerator[tuple[bytes, bool], None]]


def add_generation_routes(
    app: TrioserveApp,
    chat: ChatService,
    legacy: CompletionService,
    responses: ResponsesService,
    messages: MessagesService,
) -> None:
    """Registers the generation routes on ``app`` (its engine and settings)."""
    engine, settings = app.engine, app.settings
    parse = functools.partial(parse_body, max_bytes=settings.max_body_bytes)

    def generation_state() -> RequestState:
        """The request's state, counted among those generating (until `_request_ended`): the drain deadline
        closes what is left of them with an error event rather than letting Hypercorn cut them mid-body."""
        state = current_state()
        if app.draining:
            raise Unavailable("the server is shutting down; retry on another replica")
        app.generating.add(state)
        return state

    async def answer(
        state: RequestState,
        timing: RequestTiming,
        generations: Sequence[GenerationRequest],
        stream: bool,
        complete: Callable[[list[TokenStream]], Awaitable[Any]],
        frames: Frames,
    ) -> Response:
        """What every generation route shares once its request is prepared: admission (429 here, before any
        response starts; streams admitted before a refusal are closed with the request), then one JSON body,
        or SSE frames (each with whether it reports an error) until the stream ends."""
        state.timing = timing
        streams = [state.own(engine.submit(generation)) for generation in generations]
        if not stream:
            try:
                return json_response(await complete(streams))
            except TrioserveError:
                state.abort_reason = timing.aborted
                raise

        async def events() -> AsyncIterator[bytes]:
            # aclosing: when Quart closes this generator (disconnect), the inner one is closed right then.
            async with aclosing(frames(streams)) as items:
                async for frame, failed in items:
                    if failed:
                        state.abort_reason = timing.aborted or "error"
                    yield frame

        response = Response(events(), headers=SSE_HEADERS)
        response.timeout = None
        return response

    async def generate(service: ChatService | CompletionService, model: type[RequestBody]) -> Response:
        """Chat and legacy completions: parse, prepare, admit, then answer or stream OpenAI's chunks."""
        state = generation_state()
        body = await parse(model)
        prepared = await service.prepare(
            body,  # type: ignore[arg-type]
            request_id=state.client_request_id,
            time_limit=_request_timeout(settings, body),
            tenant=tenant(),
        )
        state.request_id = prepared.completion_id  # logs and X-Request-Id then match the completion's id

        async def frames(streams: list[TokenStream]) -> AsyncGenerator[tuple[bytes, bool], None]:
            encoder = ChunkEncoder()
            async with aclosing(service.stream(prepared, streams)) as items:
                async for item in items:
                    if isinstance(item, TrioserveError):
                        yield sse_event(item.to_dict()), True
                        return
                    yield encoder.encode(item), False
            yield b"data: [DONE]\n\n", False

        return await answer(
            state,
            prepared.timing,
            prepared.generations,
            bool(body.stream),
            lambda streams: service.complete(prepared, streams),
            frames,
        )

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions() -> Response:
        return await generate(chat, ChatCompletionRequest)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions() -> Response:
        return await generate(legacy, CompletionRequest)

    @app.post("/v1/responses")
    @app.post("/responses")
    async def create_response() -> Response:
        """The Responses API on the chat path (`api.responses.service`): same admission, deadlines, cancellation."""
        state = generation_state()
        body = await parse(ResponsesRequest)
        turn = responses.translate(body)
        prepared = await responses.prepare(turn, time_limit=_request_timeout(settings, turn.chat), tenant=tenant())
        state.request_id = state.client_request_id or prepared.response_id

        async def frames(streams: list[TokenStream]) -> AsyncGenerator[tuple[bytes, bool], None]:
            async with aclosing(responses.stream(prepared, streams)) as items:
                async for event in items:
                    frame = f"event: {event.type}\n".encode() + sse_event(dump_event(event))
                    yield frame, event.type == "error"

        return await answer(
            state,
            prepared.chat.timing,
            prepared.chat.generations,
            bool(body.stream),
            lambda streams: responses.complete(prepared, streams),
            frames,
        )

    @app.post("/v1/messages")
    async def create_message() -> Response:
        """Anthropic's Messages API on the chat path (`api.anthropic.service`); errors in its shape."""
        state = generation_state()
        body = await parse(MessagesRequest)
        chat_body = messages.translate(body)
        prepared = await messages.prepare(
            body, chat_body, time_limit=_request_timeout(settings, chat_body), tenant=tenant()
        )
        state.request_id = state.client_request_id or prepared.message_id

        async def frames(streams: list[TokenStream]) -> AsyncGenerator[tuple[bytes, bool], None]:
            async with aclosing(messages.stream(prepared, streams)) as items:
                async for event in items:
                    yield f"event: {event['type']}\n".encode() + sse_event(event), event["type"] == "error"

        return await answer(
            state,
            prepared.chat.timing,
            prepared.chat.generations,
            bool(body.stream),
            lambda streams: messages.complete(prepared, streams),
            frames,
        )


def _request_timeout(settings: Settings, body: ChatCompletionRequest | CompletionRequest) -> float:
    """The request's time limit: its own (header or body) if given, never more than the server's."""
    header = request.headers.get("X-Request-Timeout")
    requested = body.request_timeout
    if header is not None:
        try:
            requested = float(header)
        except ValueError:
            raise InvalidRequest("X-Request-Timeout must be a number of seconds", param="X-Request-Timeout") from None
        if not requested > 0:
            raise InvalidRequest("X-Request-Timeout must be positive", param="X-Request-Timeout")
    return min(requested, settings.request_timeout) if requested is not None else settings.request_timeout
