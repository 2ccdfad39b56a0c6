"""HTTP plumbing under the routes: the per-request connection, its state, auth, CORS, JSON and SSE.

quart-trio runs each HTTP request in its own nursery and cancels it when the client goes away: an HTTP/1.1
close and an HTTP/2 stream reset both reach the app as ``http.disconnect``. `TrioserveConnection` adds what
the routes need on top: it records that the cancellation was a disconnect (so the log says why), owns every
token stream the request opened and closes them when the request ends however it ends (covering the gap
between a handler returning a streaming response and Quart iterating it), and writes the access log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent
from pydantic import BaseModel, ValidationError
from quart import Response, request
from quart.asgi import ASGIHTTPConnection
from quart_trio.asgi import TrioASGIHTTPConnection

from trioserve.api.anthropic.protocol import error_body, is_messages_path
from trioserve.api.replies import dump
from trioserve.api.serving import RequestTiming
from trioserve.api.validation import invalid_request
from trioserve.engine.engine import TokenStream
from trioserve.errors import AuthenticationFailed, InvalidRequest, PayloadTooLarge, TrioserveError
from trioserve.server.sendguard import STALLED_KEY
from trioserve.server.sse import sse_event as sse_event  # SSE framing lives in trioserve.server.sse; re-exported

logger = logging.getLogger("trioserve")
access_logger = logging.getLogger("trioserve.access")

STATE_KEY = "trioserve.request"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: pass chunks on at once
}
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, X-Request-Timeout, x-api-key, anthropic-version, anthropic-beta"
)

Body = TypeVar("Body", bound=BaseModel)


@dataclass(eq=False)
class RequestState:
    """Per-HTTP-request bookkeeping shared by the connection and the handler (through the ASGI scope)."""

    request_id: str  # the client's X-Request-Id, else one made here; a completion's own id once known
    method: str
    path: str
    client_request_id: str | None = None
    disconnected: bool = False
    status: int = 0
    timing: RequestTiming | None = None
    abort_reason: str | None = None  # disconnect, stalled, deadline, drain, error
    cut_short: bool = False  # a stream was still live when the request ended (closed by the safety net)
    streams: list[TokenStream] = field(default_factory=list)

    def own(self, stream: TokenStream) -> TokenStream:
        self.streams.append(stream)
        return stream

    def note_disconnect(self, send_timeout: float = math.inf, *, stalled: bool = False) -> None:
        """The client went away (``stalled``: the server aborted its connection, see `sendguard`)."""
        self.disconnected = True
        if stalled:
            self.note_stall(send_timeout)
            return
        for stream in self.streams:
            if not stream.finished:
                logger.warning("cancelling %s: client disconnected", stream.request_id)
                self.abort_reason = self.abort_reason or "disconnect"

    def note_stall(self, send_timeout: float) -> None:
        """The client took nothing for the send timeout: cancelled like a disconnect, counted as stalled."""
        self.abort_reason = "stalled"
        logger.warning(
            "cancelling %s: stalled: its client took nothing for %gs (send timeout)", self.request_id, send_timeout
        )

    def close_all(self) -> bool:
        """Safety net: closes every stream this request opened; True if one was still live."""
        cut_short = False
        for stream in self.streams:
            cut_short |= stream.close()
        return cut_short


# Called once per request when it is over: (state, end time). The app wires metrics and drain into it.
RequestEnded = Callable[[RequestState, float], None]


class TrioserveConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, plus disconnect bookkeeping, stream ownership, the access log, and the
    send timeout of HTTP/2 streams.

    An HTTP/2 stream whose client stops reading it blocks our writes on its flow-control window while the
    connection lives on (httpx/httpcore forget a stream they close early without resetting it:
    encode/httpcore#943), so the transport sees nothing wrong: each body write of an HTTP/2 response is
    bounded here by ``send_timeout``, after which the request is cancelled and its stream reset
    (`GuardedH2Protocol`). HTTP/1.1 writes are bounded where they block, in the transport (`sendguard`).
    """

    on_request_end: RequestEnded | None = None
    send_timeout: float = math.inf
    _nursery: trio.Nursery | None = None

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        client_id = _incoming_request_id(self.scope)
        state = RequestState(client_id or f"req-{uuid.uuid4().hex}", self.scope["method"], self.scope["path"])
        state.client_request_id = client_id
        self.scope[STATE_KEY] = state  # type: ignore[literal-required]

        bounded = self.scope.get("http_version") == "2"

        async def send_and_note_status(event: ASGISendEvent) -> None:
            if event["type"] == "http.response.start":
                state.status = event["status"]
            elif event["type"] == "http.response.body":
                await self._send_body(state, send, event, bounded)
                return
            await send(event)

        try:
            await super().__call__(receive, send_and_note_status)
        finally:
            state.cut_short = state.close_all()
            ended = trio.current_time()
            _log_access(state, ended)
            if self.on_request_end is not None:
                self.on_request_end(state, ended)

    async def _send_body(
        self, state: RequestState, send: ASGISendCallable, event: ASGISendEvent, bounded: bool
    ) -> None:
        if not bounded:
            await send(event)
            return
        with trio.move_on_after(self.send_timeout) as bound:
            await send(event)
        if bound.cancelled_caught and self._nursery is not None:
            state.note_stall(self.send_timeout)
            self._nursery.cancel_scope.cancel()

    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, receive: ASGIReceiveCallable
    ) -> None:
        self._nursery = nursery
        # Returns only on http.disconnect: the response finishing cancels this task instead.
        await ASGIHTTPConnection.handle_messages(self, request, receive)
        state: RequestState = self.scope[STATE_KEY]  # type: ignore[literal-required]
        state.note_disconnect(self.send_timeout, stalled=bool(self.scope.get(STALLED_KEY)))
        nursery.cancel_scope.cancel()


def _incoming_request_id(scope: Any) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id" and 0 < len(value) <= 128:
            return str(value.decode("latin-1"))
    return None


def _log_access(state: RequestState, ended: float) -> None:
    timing = state.timing
    if timing is None:
        if state.path not in ("/health", "/metrics"):
            access_logger.info("%s %s %s %d", state.request_id, state.method, state.path, state.status)
        return
    ttft = f"{1000 * (timing.first_token - timing.arrived):.0f}ms" if timing.first_token is not None else "-"
    access_logger.info(
        "%s %s %s %d prompt=%s cached=%d completion=%d ttft=%s total=%.0fms finish=%s",
        state.request_id,
        state.method,
        state.path,
        state.status,
        "-" if timing.prompt_tokens is None else timing.prompt_tokens,
        timing.cached_tokens,
        timing.completion_tokens,
        ttft,
        1000 * (ended - timing.arrived),
        timing.finish_reason or state.abort_reason or timing.aborted or "-",
    )


def current_state() -> RequestState:
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    state: RequestState = scope[STATE_KEY]
    return state


def error_response(error: TrioserveError, status: int | None = None) -> Response:
    """The error as OpenAI's error object, or as Anthropic's on the Messages API's paths."""
    status = status or error.status
    body = error_body(error, status) if is_messages_path(request.path) else error.to_dict()
    return Response(json.dumps(body), status=status, headers=error.headers(), content_type="application/json")


def json_response(model: BaseModel | dict[str, Any], status: int = 200) -> Response:
    payload = dump(model) if isinstance(model, BaseModel) else model
    return Response(json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json")


async def read_json(max_body_bytes: int) -> Any:
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


async def parse_body(model: type[Body], max_bytes: int) -> Body:
    """The request body, read as JSON (`read_json`) and validated into ``model``; a 400 naming the field if not."""
    raw = await read_json(max_bytes)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(exc, raw) from None


def validation_error(exc: ValidationError, raw: Any) -> InvalidRequest:
    """The 400 for a body (``raw``) its wire model rejected, naming the field (`api.validation`)."""
    return invalid_request(exc, raw)


def _presented_key() -> bytes:
    """The Bearer token, else the ``x-api-key`` header (what Anthropic's SDKs send)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip().encode()
    return request.headers.get("x-api-key", "").strip().encode()


def tenant() -> str:
    """Who sent the request, for prefix-cache isolation: a digest of the key it presented (Bearer or x-api-key; the same
    key, the same tenant; no key, the tenant ""). Requests of different tenants never share cached KV, which
    would let one time the other's prompts."""
    presented = _presented_key()
    return hashlib.sha256(presented).hexdigest()[:32] if presented else ""


def has_api_key(keys: Sequence[str]) -> bool:
    """Whether the request carries one of ``keys`` as a Bearer token.

    Every key is compared, in constant time, so timing tells nothing about which or how much matched.
    """
    presented = _presented_key()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    return matched


def check_api_key(keys: Sequence[str]) -> None:
    """Raises `AuthenticationFailed` unless the request carries one of ``keys`` as a Bearer token."""
    if not has_api_key(keys):
        raise AuthenticationFailed(
            "Incorrect API key provided."
            if _presented_key()
            else "Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')."
        )


def cors_origin(allowed: Sequence[str]) -> str | None:
    """The value for Access-Control-Allow-Origin, or None when this request's origin is not allowed."""
    origin = request.headers.get("Origin")
    if origin is None or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None
