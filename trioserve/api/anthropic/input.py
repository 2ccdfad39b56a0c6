"""A Messages request as a chat completions request, so ``/v1/messages`` runs on the chat path.

``system`` becomes a leading system message; a user turn's ``tool_result`` blocks become ``tool`` messages
(before the turn's text, as Anthropic puts them first); an assistant turn's ``tool_use`` blocks become its
``tool_calls`` and its ``thinking`` blocks its ``reasoning_content``; tools become function tools and
``tool_choice`` chat's (``any`` is ``required``, ``tool`` a named function, ``disable_parallel_tool_use``
``parallel_tool_calls: false``); ``thinking`` reaches the chat template as ``enable_thinking``. So tool
calls keep the chat path's guarantee: every ``tool_use`` input matches its tool's schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from trioserve.api.anthropic.protocol import (
    CountTokensRequest,
    ImageBlock,
    MessageParam,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.responses.input import CHAT_EXTENSIONS
from trioserve.api.validation import invalid_request
from trioserve.errors import InvalidRequest


def chat_request(body: CountTokensRequest) -> ChatCompletionRequest:
    """The chat completions request that answers ``body`` (a `MessagesRequest`, or a count_tokens one).

    Raises:
        InvalidRequest: a block this server cannot take, or anything the chat path refuses.
    """
    messages, _ = _conversation(body)
    fields: dict[str, Any] = {"messages": messages, "model": body.model}
    if body.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {"name": tool.name, "parameters": tool.input_schema}
                | ({"description": tool.description} if tool.description is not None else {}),
            }
            for tool in body.tools
        ]
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if choice.name is None:
                raise InvalidRequest("tool_choice.name is required when tool_choice.type is 'tool'")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    if body.thinking is not None:
        fields["chat_template_kwargs"] = {"enable_thinking": body.thinking.type == "enabled"}
    if isinstance(body, MessagesRequest):
        fields |= {
            "max_completion_tokens": body.max_tokens,
            "temperature": body.temperature,
            "stream": body.stream,
        }
        if body.stream:
            fields["stream_options"] = {"include_usage": True}  # the usage chunk feeds message_delta
        if body.top_p is not None:
            fields["top_p"] = body.top_p
        if body.top_k is not None:
            fields["top_k"] = body.top_k
        if body.stop_sequences:
            fields["stop"] = body.stop_sequences
        if body.metadata is not None and body.metadata.user_id is not None:
            fields["user"] = body.metadata.user_id
        # Chat's sampling extensions (seed, logit_bias, ignore_eos, ...) pass as they are, as on /v1/responses.
        fields |= {name: value for name, value in (body.model_extra or {}).items() if name in CHAT_EXTENSIONS}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except InvalidRequest as error:
        raise renamed(error) from None
    except ValidationError as exc:
        raise renamed(invalid_request(exc, fields)) from None


# Chat's parameter names as this API names them (messages are renumbered: system and tool results move).
_RENAMES = (
    (r"^stop\b", "stop_sequences"),
    (r"^max_completion_tokens\b", "max_tokens"),
    (r"^parallel_tool_calls\b", "tool_choice.disable_parallel_tool_use"),
    (r"^chat_template_kwargs\b", "thinking"),
    (r"^user\b", "metadata.user_id"),
    (r"^tools([.\[])(\d+)(\]?)\.function\.parameters", r"tools\1\2\3.input_schema"),
    (r"^tools([.\[])(\d+)(\]?)\.function\.", r"tools\1\2\3."),
    (r"^messages[.\[]\d+.*", "messages"),
)


def image_places(body: CountTokensRequest) -> dict[str, str]:
    """Where each image block of ``body`` is on the chat path (``messages[3].content[1]``), to its place here
    (``messages.2.content.1``): messages are renumbered on the way (system, tool results)."""
    return _conversation(body)[1]


def _conversation(body: CountTokensRequest) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The chat messages, and `image_places`."""
    messages: list[dict[str, Any]] = []
    places: dict[str, str] = {}
    if body.system is not None:
        system = body.system if isinstance(body.system, str) else "".join(block.text for block in body.system)
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(body.messages):
        where = f"messages.{index}"
        translated, blocks = _chat_messages(message, where)
        messages.extend(translated)
        for part, block in blocks.items():
            places[f"messages[{len(messages) - 1}].content[{part}]"] = f"{where}.content.{block}"
    return messages, places


def renamed(error: InvalidRequest, places: dict[str, str] | None = None) -> InvalidRequest:
    """``error`` with the chat parameter it names (in ``param`` and its message) named as here; ``places``
    (`image_places`) names image blocks."""
    if error.param is None:
        return error
    param = error.param
    if places and param in places:
        param = places[param]
    else:
        for pattern, replacement in _RENAMES:
            param = re.sub(pattern, replacement, param)
    if param != error.param:
        error.message = error.message.replace(error.param, param, 1)
        error.param = param
    return error


def _chat_messages(message: MessageParam, where: str) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The chat messages of one Messages turn, and for a user turn with images, which block each of its
    content parts came from (its last message's content is then text and image parts, in block order)."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}], {}
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    blocks: dict[int, int] = {}
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            if message.role != "user":
                raise InvalidRequest(f"{where}.content.{index}: image blocks belong to user messages")
            blocks[len(parts)] = index
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, f"{where}.content.{index}")}})
        elif isinstance(block, ToolUseBlock):
            if message.role != "assistant":
                raise InvalidRequest(f"{where}.content.{index}: tool_use blocks belong to assistant messages")
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}})
        elif isinstance(block, ToolResultBlock):
            if message.role != "user":
                raise InvalidRequest(f"{where}.content.{index}: tool_result blocks belong to user messages")
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block, where)})
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
        # redacted_thinking: nothing a local template can use
    content: str | list[dict[str, Any]] = parts if blocks else "".join(part["text"] for part in parts)
    chat: dict[str, Any] = {"role": message.role, "content": content}
    if calls:
        chat["tool_calls"] = calls
    if thinking:
        chat["reasoning_content"] = "".join(thinking)
    if message.role == "user" and results and not parts:
        return results, {}  # a turn of tool results only
    return [*results, chat], blocks


def _image_url(block: ImageBlock, where: str) -> str:
    """An image block's source as a URL the chat path takes: ``base64`` as a ``data:`` URL, ``url`` as is."""
    source = block.source
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        return f"data:{source['media_type']};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequest(
        f"{where}.source: image sources of type {kind!r} are not supported by this server (base64 with media_type "
        "and data, or url, are)",
        param=f"{where}.source",
    )


def _result_text(block: ToolResultBlock, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        if any(isinstance(part, ImageBlock) for part in content):
            raise InvalidRequest(f"{where}: images in a tool_result are not supported by this server")
        text = "".join(part.text for part in content if isinstance(part, TextBlock))
    return f"Error: {text}" if block.is_error else text
