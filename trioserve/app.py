"""The HTTP surface: a Quart-Trio app with OpenAI's routes, SSE framing and OpenAI error objects.

Each HTTP request runs in its own nursery (quart-trio's connection handler), whose cancel scope is cancelled
when the client goes away: an HTTP/1.1 close or an HTTP/2 stream reset both reach the app as
``http.disconnect``. Our connection class records that it was a disconnect (so the log can say why) and owns
every token stream the request opened, closing them when the request's nursery is done, however it ended.
That covers the gap between a handler returning a streaming response and Quart starting to iterate it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from pydantic import BaseModel, ValidationError
from quart import Response, request
from quart.asgi import ASGIHTTPConnection
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from trioserve.engine import Engine, TokenStream
from trioserve.errors import InvalidRequest, PayloadTooLarge, TrioserveError
from trioserve.protocol import ChatCompletionChunk, ChatCompletionRequest, dump
from trioserve.serving import ChatService

logger = logging.getLogger(__name__)

_STATE_KEY = "trioserve.request"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: pass chunks on at once
}


@dataclass(eq=False)
class RequestState:
    """Per-HTTP-request bookkeeping shared by the connection and the handler (through the ASGI scope)."""

    request_id: str
    disconnected: bool = False
    streams: list[TokenStream] = field(default_factory=list)

    def own(self, stream: TokenStream) -> TokenStream:
        self.streams.append(stream)
        return stream

    def note_disconnect(self) -> None:
        self.disconnected = True
        for stream in self.streams:
            if not stream.finished:
                logger.warning("cancelling %s: client disconnected", stream.request_id)

    def close_all(self) -> None:
        """Safety net: every stream this request opened is closed when the request ends, however."""
        for stream in self.streams:
            stream.close()


class _Connection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, plus: who cancelled, and closing the request's token streams."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        state = RequestState(request_id=_incoming_request_id(self.scope))
        self.scope[_STATE_KEY] = state  # type: ignore[literal-required]
        try:
            await super().__call__(receive, send)
        finally:
            state.close_all()

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, receive: ASGIReceiveCallable
    ) -> None:
        # Returns only on http.disconnect: the response finishing cancels this task instead.
        await ASGIHTTPConnection.handle_messages(self, request, receive)
        state: RequestState = self.scope[_STATE_KEY]  # type: ignore[literal-required]
        state.note_disconnect()
        nursery.cancel_scope.cancel()


def _incoming_request_id(scope: Any) -> str:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id" and 0 < len(value) <= 128:
            return str(value.decode("latin-1"))
    return f"chatcmpl-{uuid.uuid4().hex}"


def _state() -> RequestState:
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    state: RequestState = scope[_STATE_KEY]
    return state


def error_response(error: TrioserveError) -> Response:
    return Response(
        json.dumps(error.to_dict()), status=error.status, headers=error.headers(), content_type="application/json"
    )


def json_response(model: BaseModel | dict[str, Any], status: int = 200) -> Response:
    payload = dump(model) if isinstance(model, BaseModel) else model
    return Response(json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json")


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


async def _read_json(max_body_bytes: int) -> Any:
    """The request body as JSON, or an OpenAI error: wrong content type, too large, malformed."""
    content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise InvalidRequest(f"Content-Type must be application/json, got {content_type!r}")
    if request.content_length is not None and request.content_length > max_body_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_body_bytes} bytes")
    body = await request.get_data(cache=False)
    if len(body) > max_body_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_body_bytes} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return InvalidRequest(message, param=param, code="invalid_value" if param else None)


def create_app(engine: Engine, *, strict_model_name: bool = False, max_body_bytes: int = 4 * 1024 * 1024) -> QuartTrio:
    """Builds the app around an engine; the app's lifespan starts and stops the engine's step loop."""
    app = QuartTrio(__name__)
    app.asgi_http_class = _Connection
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does; deadlines are ours
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    service = ChatService(engine, strict_model_name=strict_model_name)
    engine_scope = trio.CancelScope()

    @app.before_serving
    async def start_engine() -> None:
        async def run_engine(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with engine_scope:
                await engine.run(task_status=task_status)

        await app.nursery.start(run_engine)

    @app.after_serving
    async def stop_engine() -> None:
        engine_scope.cancel()

    @app.errorhandler(TrioserveError)
    async def on_trioserve_error(error: TrioserveError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return error_response(PayloadTooLarge(f"request body is larger than {max_body_bytes} bytes"))
        wrapped = InvalidRequest(
            f"{error.name}: {request.method} {request.path}", code=error.name.lower().replace(" ", "_")
        )
        response = error_response(wrapped)
        response.status_code = status
        return response

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(TrioserveError(f"internal server error: {type(error).__name__}"))

    @app.after_request
    async def echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = _state().request_id
        return response

    @app.get("/health")
    async def health() -> Response:
        payload: dict[str, Any] = {
            "status": "ok",
            "model": engine.runner.model_id if engine.runner is not None else None,
            "running": engine.running,
            "waiting": engine.waiting,
            "live_sequences": engine.runner.live_sequences() if engine.runner is not None else 0,
        }
        if engine.load_error is not None:
            payload["status"] = "failed"
            payload["error"] = str(engine.load_error)
        elif engine.loading:
            payload["status"] = "loading"
        return json_response(payload, status=200 if payload["status"] == "ok" else 503)

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> Response:
        return json_response(await service.models())

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions() -> Response:
        state = _state()
        raw = await _read_json(max_body_bytes)
        try:
            body = ChatCompletionRequest.model_validate(raw)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        prepared = await service.prepare(body, request_id=state.request_id)
        stream = state.own(engine.submit(prepared.generation))
        if not body.stream:
            return json_response(await service.complete(prepared, stream))

        async def events() -> AsyncIterator[bytes]:
            # aclosing: when Quart closes this generator (disconnect), the inner one is closed right then.
            async with aclosing(service.stream(prepared, stream)) as items:
                async for item in items:
                    if isinstance(item, ChatCompletionChunk):
                        yield sse_event(dump(item))
                    else:
                        yield sse_event(item.to_dict())
                        return
            yield b"data: [DONE]\n\n"

        response = Response(events(), headers=SSE_HEADERS)
        response.timeout = None
        return response

    return app
