"""The OpenAPI 3.1 document served at ``/openapi.json``, generated from the wire models."""

from __future__ import annotations

from pydantic import BaseModel

from trioserve.api.anthropic.protocol import CountTokensRequest, MessagesRequest
from trioserve.api.protocol import ChatCompletionRequest, CompletionRequest
from trioserve.api.replies import ChatCompletion, ChatCompletionChunk, Completion, ModelList
from trioserve.api.responses.protocol import Response, ResponsesRequest
from trioserve.api.tokens import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizePromptRequest,
    TokenizeResponse,
)

_ERROR = {"description": "an OpenAI error object", "content": {"application/json": {}}}
_ERRORS = {status: _ERROR for status in ("400", "401", "404", "413", "429", "500", "503", "504")}


def _ref(model: type[BaseModel]) -> dict[str, object]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _post(request: dict[str, object], description: str, content: dict[str, object]) -> dict[str, object]:
    return {
        "post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
            "responses": {"200": {"description": description, "content": content}, **_ERRORS},
        }
    }


def openapi_document() -> dict[str, object]:
    """An OpenAPI 3.1 document generated from the wire models (what fuzzers and clients can read)."""
    schemas: dict[str, object] = {}
    models: tuple[type[BaseModel], ...] = (
        ChatCompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
        CompletionRequest,
        Completion,
        ModelList,
        ResponsesRequest,
        Response,
        TokenizePromptRequest,
        TokenizeChatRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        MessagesRequest,
        CountTokensRequest,
    )
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    sse = "text/event-stream"
    paths = {
        "/v1/chat/completions": _post(
            _ref(ChatCompletionRequest),
            "a completion, or with stream=true an SSE stream of chunks",
            {"application/json": {"schema": _ref(ChatCompletion)}, sse: {"schema": _ref(ChatCompletionChunk)}},
        ),
        "/v1/completions": _post(
            _ref(CompletionRequest),
            "a text_completion, or SSE chunks of one",
            {"application/json": {"schema": _ref(Completion)}},
        ),
        "/v1/responses": _post(
            _ref(ResponsesRequest),
            "a response, or with stream=true an SSE stream of Responses events",
            {"application/json": {"schema": _ref(Response)}, sse: {}},
        ),
        "/v1/messages": _post(
            _ref(MessagesRequest),
            "an Anthropic message, or with stream=true an SSE stream of its events (errors in Anthropic's shape)",
            {"application/json": {}, sse: {}},
        ),
        "/v1/messages/count_tokens": _post(
            _ref(CountTokensRequest), "the prompt's input_tokens", {"application/json": {}}
        ),
        "/tokenize": _post(
            {"oneOf": [_ref(TokenizePromptRequest), _ref(TokenizeChatRequest)]},
            "the prompt's token ids",
            {"application/json": {"schema": _ref(TokenizeResponse)}},
        ),
        "/detokenize": _post(
            _ref(DetokenizeRequest), "the tokens' text", {"application/json": {"schema": _ref(DetokenizeResponse)}}
        ),
        "/v1/models": {
            "get": {
                "responses": {
                    "200": {
                        "description": "the served model",
                        "content": {"application/json": {"schema": _ref(ModelList)}},
                    }
                }
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "trioserve", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }
