"""Server-sent events: one ``data:`` event per chunk, and a cheap path for the chunk a stream sends most.

Almost every event of a streamed chat completion is a content delta that differs from the one before only
in its text. `ChunkEncoder` serializes the first such chunk of a stream in full, keeps the JSON around the
text as a template, and from then on writes only the text into it: the same JSON value as the full path
(tested), without a pydantic dump and a ``json.dumps`` of the whole chunk per event. Anything else (role,
finish reason, logprobs, tool calls, usage, any field added later) takes the full path.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from trioserve.api.replies import ChatCompletionChunk, dump

_MARK = "\x00trioserve-text\x00"  # cannot occur in a chunk's own fields: it is replaced before use


def sse_event(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class ChunkEncoder:
    """Frames one stream's chunks as SSE events. Use one per stream: it keeps that stream's templates."""

    def __init__(self) -> None:
        self._templates: dict[tuple[Any, ...], tuple[str, str] | None] = {}

    def encode(self, chunk: BaseModel) -> bytes:
        """The SSE event for ``chunk``."""
        if type(chunk) is ChatCompletionChunk:
            found = _content_only(chunk)
            if found is not None:
                key, text = found
                template = self._templates.get(key)
                if template is None:
                    template = self._templates[key] = _template(chunk)
                if template is not None:
                    prefix, suffix = template
                    return f"data: {prefix}{json.dumps(text, ensure_ascii=False)}{suffix}\n\n".encode()
        return sse_event(dump(chunk))


def _content_only(chunk: ChatCompletionChunk) -> tuple[tuple[Any, ...], str] | None:
    """(template key, text) if the chunk is one choice's bare content delta, else None.

    Checked field by field over the models' own attributes, so a field added to them later, when set,
    sends the chunk down the full path rather than being left out of the template.
    """
    if len(chunk.choices) != 1:
        return None
    choice = chunk.choices[0]
    text = choice.delta.content
    if not isinstance(text, str):
        return None
    for name, value in choice.delta.__dict__.items():
        if name != "content" and value is not None:
            return None
    for name, value in choice.__dict__.items():
        if name not in ("index", "delta") and value is not None:
            return None
    key: list[Any] = [choice.index]
    for name, value in chunk.__dict__.items():
        if name == "choices":
            continue
        if value is not None and not isinstance(value, (str, int)):
            return None  # usage, or a structured field: not templated
        key.append(value)
    return tuple(key), text


def _template(chunk: ChatCompletionChunk) -> tuple[str, str] | None:
    """The chunk's JSON before and after its text (None: the text's place could not be found)."""
    payload = dump(chunk)
    payload["choices"][0]["delta"]["content"] = _MARK
    parts = json.dumps(payload, ensure_ascii=False).split(json.dumps(_MARK, ensure_ascii=False))
    return (parts[0], parts[1]) if len(parts) == 2 else None
