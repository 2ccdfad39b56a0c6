"""Chat messages as clients send them: roles, content as a string or parts (text, and images in user
messages: OpenAI's ``image_url`` part), tool calls, and how each becomes a chat template's message.

``{"type": "image_url", "image_url": {"url": ..., "detail": "auto" | "low" | "high"}}``, and the string form
``"image_url": "..."`` some clients send. ``detail`` is accepted and has no effect: how many tokens an
image takes is the model's processor's choice. Only user messages carry images (as OpenAI's API).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from trioserve.api.validation import WireModel
from trioserve.errors import InvalidRequest


class ImageUrl(WireModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(WireModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class TextPart(WireModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(WireModel):
    """One message. ``content`` is a string or an array of parts: text parts (joined with no separator) and,
    in user messages, images (`ImagePart`)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (OpenAI shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def images(self) -> list[tuple[int, ImagePart]]:
        """The image parts, with their indices in ``content``."""
        if not isinstance(self.content, list):
            return []
        return [(index, part) for index, part in enumerate(self.content) if isinstance(part, ImagePart)]

    def for_template(self) -> dict[str, Any]:
        # Most chat templates know no "developer" role; OpenAI treats it as the newer name of "system".
        role = "system" if self.role == "developer" else self.role
        content: str | list[dict[str, str]] = self.text()
        if self.images():
            # Hugging Face's convention for templates of vision-language models: an image part stands where
            # the image goes, and the processor expands it into the image's tokens.
            content = [
                {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
                for part in self.content or ()
            ]
        message: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [_call_for_template(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        reasoning = (self.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str):
            message["reasoning_content"] = reasoning  # templates that keep (or drop) earlier thinking read it
        if self.name is not None:
            message["name"] = self.name
        return message


def check_contents(messages: list[ChatMessage]) -> None:
    """Every message has ``content``, except an assistant turn that made calls (as OpenAI requires); images
    only in user messages.

    Raises:
        InvalidRequest: a message without content; ``param`` is its path (``messages.0.content``). An image
            in another role's message (``param`` ``messages[i].content[j]``).
    """
    for index, message in enumerate(messages):
        images = message.images()
        if images and message.role != "user":
            where = f"messages[{index}].content[{images[0][0]}]"
            raise InvalidRequest(
                f"{where}: image parts are only taken in user messages (this one is {message.role!r})", param=where
            )
        calls = message.tool_calls or (message.model_extra or {}).get("function_call")
        if message.content is None and not (message.role == "assistant" and calls):
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{index}].content'"
                + (
                    " (an assistant message may omit it only when it has tool_calls)"
                    if message.role == "assistant"
                    else ""
                ),
                param=f"messages.{index}.content",
                code="missing_required_parameter",
            )


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """Chat templates expect a call's arguments as a mapping; OpenAI sends them as JSON text."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            return call
        return call | {"function": function | {"arguments": arguments}}
    return call
