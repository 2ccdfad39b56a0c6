"""A Responses request as a chat completions request, so ``/v1/responses`` runs on the chat path.

Input items become chat messages (``function_call`` items an assistant turn's ``tool_calls``,
``function_call_output`` items ``tool`` messages), flat function tools become chat tools, ``text.format``
becomes ``response_format`` and ``instructions`` a leading system message. Everything the chat path refuses
is refused here too, with the parameter named as the Responses API names it (``text.format.schema``, not
``response_format.json_schema.schema``). Conversations are kept as chat message dicts: that is what a
stored response's history holds (see `trioserve.api.responses.store`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.responses.protocol import OutputItem, ResponsesRequest
from trioserve.api.validation import invalid_request
from trioserve.errors import InvalidRequest

ChatMessageDict = dict[str, Any]

# Chat completions' sampling fields beyond what the Responses API has; a client may send them as extras.
CHAT_EXTENSIONS = frozenset(
    {
        "seed",
        "logit_bias",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "ignore_eos",
        "request_timeout",
        "truncate",
        "chat_template_kwargs",
        "cache_salt",
    }
)
_TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_ROLES = frozenset({"user", "system", "developer", "assistant"})
_TOOL_CHOICES = frozenset({"none", "auto", "required"})


def input_messages(body: ResponsesRequest) -> tuple[list[ChatMessageDict], list[str]]:
    """This turn's ``input`` as chat messages, and for each the item it came from (``input[2]``), so errors
    about a message's parts (an image refused) name the Responses path.

    Raises:
        InvalidRequest: an item or a content part this server cannot take; ``param`` is its path.
    """
    if body.input is None:
        return [], []
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}], ["input"]
    messages: list[ChatMessageDict] = []
    sources: list[str] = []
    for index, item in enumerate(body.input):
        if _append(messages, _message_of(item, f"input[{index}]")):
            sources.append(f"input[{index}]")
    return messages, sources


def output_messages(output: Sequence[OutputItem]) -> list[ChatMessageDict]:
    """A response's output as the chat messages that continue its conversation (reasoning is dropped, as
    chat templates drop an earlier turn's thinking)."""
    messages: list[ChatMessageDict] = []
    for item in output:
        if item.type == "message":
            _append(messages, {"role": "assistant", "content": "".join(part.text for part in item.content)})
        elif item.type == "function_call":
            _append(messages, _assistant_call(item.call_id, item.name, item.arguments))
    return messages


def chat_request(
    body: ResponsesRequest, history: Sequence[ChatMessageDict], messages: Sequence[ChatMessageDict]
) -> ChatCompletionRequest:
    """The chat completions request that answers ``body``, after ``history`` (a previous response's
    conversation), with this turn's ``messages``.

    Raises:
        InvalidRequest: anything the chat path refuses, ``param`` named as in the Responses API.
    """
    body.check_supported()
    conversation = list(history) + list(messages)
    if body.instructions:
        conversation.insert(0, {"role": "system", "content": body.instructions})
    if not conversation:
        raise InvalidRequest("input must not be empty", param="input")
    fields: dict[str, Any] = {
        "messages": conversation,
        "model": body.model,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream_options": {"include_usage": True},  # the usage chunk feeds response.completed
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user,
    }
    if body.tools:
        fields["tools"] = [_chat_tool(tool, f"tools[{index}]") for index, tool in enumerate(body.tools)]
    fields["tool_choice"] = _chat_tool_choice(body.tool_choice) if body.tools or body.tool_choice != "auto" else None
    if body.text is not None and body.text.format is not None and body.text.format.type != "text":
        fields["response_format"] = _response_format(body)
    if (
        body.reasoning is not None
        and body.reasoning.effort
        and "reasoning_effort" in ChatCompletionRequest.model_fields
    ):
        fields["reasoning_effort"] = body.reasoning.effort
    for name, value in (body.model_extra or {}).items():
        # Extensions pass as they are; an extra that is a chat field with another meaning here (n,
        # messages, response_format...) does not, or it would change the request behind the client's back.
        if name in CHAT_EXTENSIONS or name not in ChatCompletionRequest.model_fields:
            fields[name] = value
    try:
        return ChatCompletionRequest.model_validate(fields)
    except InvalidRequest as error:
        raise renamed(error) from None
    except ValidationError as exc:
        invalid = invalid_request(exc, fields)
        if invalid.param is not None:
            message = invalid.message.removeprefix(f"{invalid.param}: ")
            invalid.param = responses_param(invalid.param)
            invalid.message = f"{invalid.param}: {message}"
        raise invalid from None


def renamed(error: InvalidRequest) -> InvalidRequest:
    """``error`` with its ``param`` named as the Responses API names it."""
    if error.param is not None:
        error.param = responses_param(error.param)
    return error


def responses_param(param: str) -> str:
    """A chat completions parameter path as the Responses API names it."""
    param = re.sub(r"^response_format(\.json_schema)?", "text.format", param)
    param = re.sub(r"^tools([.\[])(\d+)(\]?)\.function", r"tools\1\2\3", param)
    if param.startswith("messages"):
        return "input"  # the chat messages are instructions, history and input together: no exact path
    return {"max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort"}.get(param, param)


def _append(messages: list[ChatMessageDict], message: ChatMessageDict | None) -> bool:
    """Adds a message; a call joins the assistant turn right before it (one turn, several calls), copied
    so a stored conversation is never changed. Whether a new message was added."""
    if message is None:
        return False
    previous = messages[-1] if messages else None
    if message.get("tool_calls") and previous is not None and previous["role"] == "assistant":
        calls = list(previous.get("tool_calls") or []) + message["tool_calls"]
        messages[-1] = previous | {"tool_calls": calls}
        return False
    messages.append(message)
    return True


def _assistant_call(call_id: str, name: str, arguments: str) -> ChatMessageDict:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def _message_of(item: Any, where: str) -> ChatMessageDict | None:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(
                f"{where}.role must be one of user, system, developer, assistant", param=f"{where}.role"
            )
        return {"role": role, "content": _content_of(item.get("content"), f"{where}.content", role)}
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
        return _assistant_call(item["call_id"], item["name"], item["arguments"])
    if kind == "function_call_output":
        call_id = item.get("call_id")
        if not isinstance(call_id, str):
            raise InvalidRequest(f"{where}.call_id must be a string", param=f"{where}.call_id")
        return {"role": "tool", "tool_call_id": call_id, "content": _text_of(item.get("output"), f"{where}.output")}
    if kind == "reasoning":
        return None  # an earlier turn's thinking: chat templates drop it, so do we
    if kind == "item_reference":
        raise InvalidRequest(
            f"{where}: item references are not supported by this server; send the item itself or use "
            "previous_response_id",
            param=f"{where}.type",
        )
    raise InvalidRequest(
        f"{where}: input item type {kind!r} is not supported by this server (message, function_call, "
        "function_call_output and reasoning are)",
        param=f"{where}.type",
    )


def _content_of(content: Any, where: str, role: str) -> str | list[dict[str, Any]]:
    """A message's content: its text (`_text_of`), or, when it has ``input_image`` parts, chat content
    parts one for one (so ``messages[i].content[j]`` in an error is ``input[k].content[j]`` here)."""
    if not isinstance(content, list) or not any(
        isinstance(part, dict) and part.get("type") == "input_image" for part in content
    ):
        return _text_of(content, where)
    parts: list[dict[str, Any]] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if isinstance(part, dict) and part.get("type") == "input_image":
            if role != "user":
                raise InvalidRequest(f"{at}: images are only taken in user messages (this one is {role!r})", param=at)
            parts.append(_image_part(part, at))
        else:
            parts.append({"type": "text", "text": _part_text(part, at)})
    return parts


def _image_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    """An ``input_image`` part as chat's ``image_url`` part."""
    url = part.get("image_url")
    if url is None and part.get("file_id") is not None:
        raise InvalidRequest(
            f"{where}.file_id: file ids are not supported by this server (it keeps no files); send image_url, "
            "an http(s) URL or a data: URL",
            param=f"{where}.file_id",
        )
    if not isinstance(url, str):
        raise InvalidRequest(f"{where}.image_url must be a string (a URL or a data: URL)", param=f"{where}.image_url")
    detail = part.get("detail")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise InvalidRequest(f"{where}.detail must be one of auto, low, high", param=f"{where}.detail")
    return {"type": "image_url", "image_url": {"url": url} | ({"detail": detail} if detail is not None else {})}


def image_param(param: str, sources: Sequence[str]) -> str | None:
    """A chat path ``messages[i].content[j]...`` as the Responses path it came from (``input[k].content[j]``),
    where ``sources`` says where each chat message came from; None if ``param`` is not such a path."""
    match = re.match(r"messages\[(\d+)\]\.content(\[\d+\].*)$", param)
    if match is None or int(match[1]) >= len(sources):
        return None
    source = sources[int(match[1])]
    return f"{source}.content{match[2]}" if source.startswith("input[") else source


def _text_of(content: Any, where: str) -> str:
    """Text content: a string, or text parts joined with no separator."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content parts", param=where)
    return "".join(_part_text(part, f"{where}[{index}]") for index, part in enumerate(content))


def _part_text(part: Any, where: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return str(part["refusal"])
    if kind in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
        return str(part["text"])
    raise InvalidRequest(
        f"{where}: content part type {kind!r} is not supported by this server (text and input_image are)",
        param=f"{where}.type",
    )


def _chat_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    kind = tool.get("type")
    if kind != "function":
        raise InvalidRequest(
            f"{where}: tool type {kind!r} is not supported by this server (built-in tools such as web_search "
            "run on OpenAI's side); only function tools are",
            param=f"{where}.type",
        )
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise InvalidRequest("tool_choice must be none, auto, required or a function", param="tool_choice")
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequest(
            f"tool_choice type {choice.get('type')!r} is not supported by this server; only "
            '{"type": "function", "name": ...} and none/auto/required are',
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(body: ResponsesRequest) -> dict[str, Any]:
    assert body.text is not None and body.text.format is not None
    spec = body.text.format
    if spec.type == "json_object":
        return {"type": "json_object"}
    if spec.name is None:
        raise InvalidRequest("text.format.name is required for a json_schema format", param="text.format.name")
    schema = {"name": spec.name, "description": spec.description, "schema": spec.schema_, "strict": spec.strict}
    return {"type": "json_schema", "json_schema": {key: value for key, value in schema.items() if value is not None}}
