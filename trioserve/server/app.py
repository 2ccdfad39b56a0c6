"""The HTTP surface: a Quart-Trio app with OpenAI's routes, auth, CORS, metrics and graceful drain.

The app's lifespan owns the engine's step loop (started with ``nursery.start``, stopped by cancelling its
scope after Hypercorn's graceful shutdown). Per-request plumbing lives in `trioserve.server.httpio`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from pydantic import ValidationError
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioserve.api.anthropic.protocol import CountTokensRequest
from trioserve.api.anthropic.service import MessagesService
from trioserve.api.chat import ChatService
from trioserve.api.completions import CompletionService
from trioserve.api.images import ImagePolicy
from trioserve.api.protocol import ChatCompletionRequest, CompletionRequest
from trioserve.api.responses.service import ResponseNotFound, ResponsesService
from trioserve.api.responses.store import ResponseStore
from trioserve.api.tokens import DetokenizeRequest, TokenService, tokenize_request
from trioserve.config import Settings
from trioserve.engine.engine import Engine
from trioserve.errors import InvalidRequest, PayloadTooLarge, TrioserveError, Unavailable
from trioserve.server.generation import add_generation_routes
from trioserve.server.httpio import (
    CORS_ALLOW_HEADERS,
    RequestState,
    TrioserveConnection,
    check_api_key,
    cors_origin,
    current_state,
    error_response,
    has_api_key,
    json_response,
    parse_body,
    read_json,
    validation_error,
)
from trioserve.server.metrics import CONTENT_TYPE, Metrics
from trioserve.server.openapi import openapi_document
from trioserve.server.sendguard import SendLimits

logger = logging.getLogger(__name__)

CHAT_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/responses",
    "/responses",
    "/v1/messages",
)
RequestBody = ChatCompletionRequest | CompletionRequest


class TrioserveApp(QuartTrio):
    """The app, with the engine it serves, its metrics, and whether it is draining."""

    engine: Engine
    metrics: Metrics
    settings: Settings
    draining: bool = False
    engine_scope: trio.CancelScope | None = None  # the engine's step loop, once serving
    send_limits: SendLimits  # every connection's writes; Hypercorn's config carries it (cli.hypercorn_config)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generating: set[RequestState] = set()  # generation requests in flight
        self._drain_deadline_scope = trio.CancelScope()  # the drain's deadline task; cancelled at shutdown

    def start_draining(self) -> None:
        """Graceful shutdown has begun: new requests get 503, /health says so; in-flight ones go on.

        Just before the graceful timeout runs out (when Hypercorn cancels every connection, cutting
        responses mid-body), the requests still generating are closed: each stream then ends with an
        SSE error event (a non-streaming request with a 503), and its connection can close cleanly.
        """
        if self.draining:
            return
        logger.info("draining: %d request(s) in flight", self.engine.active)
        self.draining = True
        # The graceful timeout is a hard bound: from then on no write waits for its client (`sendguard`).
        self.send_limits.end_by(trio.current_time() + self.settings.graceful_timeout)
        nursery: trio.Nursery | None = getattr(self, "nursery", None)
        if nursery is not None:
            timeout = self.settings.graceful_timeout
            nursery.start_soon(self._end_generation_at, trio.current_time() + timeout - min(2.0, timeout / 2))

    async def _end_generation_at(self, deadline: float) -> None:
        with self._drain_deadline_scope:
            await trio.sleep_until(deadline)
        if self._drain_deadline_scope.cancelled_caught:
            return
        for state in list(self.generating):
            if state.close_all():
                state.abort_reason = "drain"
                logger.warning("cancelling %s: graceful timeout", state.request_id)


def create_app(engine: Engine, settings: Settings | None = None, *, metrics: Metrics | None = None) -> TrioserveApp:
    """Builds the app around an engine (whose ``on_record`` should feed ``metrics``, see `cli.build_engine`)."""
    settings = settings or Settings()
    app = TrioserveApp(__name__)
    app.engine = engine
    app.settings = settings
    app.metrics = metrics or Metrics()
    app.metrics.watch(engine)
    app.send_limits = SendLimits(settings.send_timeout)
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does; deadlines are ours
    app.config["BODY_TIMEOUT"] = 60
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes

    send_timeout = settings.send_timeout

    class Connection(TrioserveConnection):
        on_request_end = staticmethod(lambda state, ended: _request_ended(app, state, ended))

    Connection.send_timeout = send_timeout

    app.asgi_http_class = Connection
    chat = ChatService(
        engine,
        strict_model_name=settings.strict_model_name,
        tool_call_parser=settings.tool_call_parser,
        reasoning_parser=settings.reasoning_parser,
        images=ImagePolicy.from_settings(settings),
    )
    legacy = CompletionService(engine, strict_model_name=settings.strict_model_name)
    responses = ResponsesService(chat, ResponseStore(settings.responses_store_size))
    tokens = TokenService(engine, strict_model_name=settings.strict_model_name)
    messages = MessagesService(chat)

    @app.before_serving
    async def start_engine() -> None:
        async def run_engine(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                app.engine_scope = scope
                await engine.run(task_status=task_status)

        await app.nursery.start(run_engine)

    @app.after_serving
    async def stop_engine() -> None:
        app.draining = True
        app._drain_deadline_scope.cancel()  # the lifespan's nursery waits for its tasks
        if app.engine_scope is not None:
            app.engine_scope.cancel()

    @app.before_request
    async def guard() -> Response | None:
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return _preflight(settings)
        path = request.path
        public = path == "/health" or (path == "/metrics" and settings.metrics_public)
        if settings.api_key and not public:
            check_api_key(settings.api_key)
        if app.draining and path not in ("/health", "/metrics"):
            # A request on a connection that was open when the drain began (HTTP/1.1 adds
            # Connection: close to every answer during shutdown, see hypercorn_fixes).
            raise Unavailable("the server is shutting down; retry on another replica")
        return None

    @app.after_request
    async def decorate(response: Response) -> Response:
        response.headers["X-Request-Id"] = current_state().request_id
        origin = cors_origin(settings.cors_origin)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
            response.headers["Vary"] = "Origin"
        return response

    @app.errorhandler(TrioserveError)
    async def on_trioserve_error(error: TrioserveError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return error_response(PayloadTooLarge(f"request body is larger than {settings.max_body_bytes} bytes"))
        code = error.name.lower().replace(" ", "_")
        return error_response(InvalidRequest(f"{error.name}: {request.method} {request.path}", code=code), status)

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(TrioserveError(f"internal server error: {type(error).__name__}"))

    @app.get("/health")
    async def health() -> Response:
        """Readiness: ``{"status": ...}``, 200 only for "ok". Counts and a failed load's error only for a
        caller with the API key (or when none is configured): they tell an outsider about load and setup."""
        status = "ok"
        if app.draining:
            status = "draining"
        elif engine.load_error is not None:
            status = "failed"
        elif engine.loading:
            status = "loading"
        elif engine.failed_steps_in_a_row >= 3:
            status = "failing"
        payload: dict[str, object] = {"status": status}
        if not settings.api_key or has_api_key(settings.api_key):
            runner = engine.runner
            payload.update(
                model=runner.model_id if runner is not None else None,
                running=engine.running,
                waiting=engine.waiting,
                live_sequences=runner.live_sequences() if runner is not None else 0,
            )
            if engine.load_error is not None:
                payload["error"] = str(engine.load_error)
        return json_response(payload, status=200 if status == "ok" else 503)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document())

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(app.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/v1/models")
    @app.get("/models")
    async def models() -> Response:
        return json_response(await chat.models())

    parse = functools.partial(parse_body, max_bytes=settings.max_body_bytes)
    add_generation_routes(app, chat, legacy, responses, messages)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens() -> Response:
        return json_response(await messages.count_tokens(await parse(CountTokensRequest)))

    @app.get("/v1/responses/<response_id>")
    @app.get("/responses/<response_id>")
    async def get_response(response_id: str) -> Response:
        found = responses.get(response_id)
        if found is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        return json_response(found)

    @app.delete("/v1/responses/<response_id>")
    @app.delete("/responses/<response_id>")
    async def delete_response(response_id: str) -> Response:
        if not responses.store.delete(response_id):
            raise ResponseNotFound(f"Response with id '{response_id}' not found.")
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    @app.post("/tokenize")
    async def tokenize() -> Response:
        raw = await read_json(settings.max_body_bytes)
        try:
            body = tokenize_request(raw).model_validate(raw)
        except ValidationError as exc:
            raise validation_error(exc, raw) from None
        return json_response(await tokens.tokenize(body))

    @app.post("/detokenize")
    async def detokenize() -> Response:
        return json_response(await tokens.detokenize(await parse(DetokenizeRequest)))

    return app


def _preflight(settings: Settings) -> Response:
    origin = cors_origin(settings.cors_origin)
    if origin is None:
        return Response("", status=403)
    return Response(
        "",
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        },
    )


def _request_ended(app: TrioserveApp, state: RequestState, ended: float) -> None:
    app.generating.discard(state)
    if state.path not in CHAT_PATHS:
        return
    # 499, as nginx logs it: the client went away before a response started.
    status = state.status or (499 if state.disconnected else 500)
    reason = state.abort_reason
    if reason is None and state.cut_short and app.draining:
        reason = "drain"  # the graceful timeout ran out and the server cancelled it
    app.metrics.finish(status, state.timing, ended, reason)
