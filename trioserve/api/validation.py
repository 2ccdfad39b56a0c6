"""Strict wire models and their validation errors as OpenAI's 400s, naming the field that was wrong.

OpenAI rejects a value of the wrong JSON type (``"stream": "yes"``, ``"max_tokens": "5"``, ``"user": 1``);
pydantic's default (lax) mode would coerce each of them, so every request model derives from `WireModel`,
which validates strictly. A ``ValidationError`` then becomes `InvalidRequest` with ``param`` the dotted path
of the field in the body (``messages.0.content``, the shape this server has always used), found by walking
the body along pydantic's error location: the location also names the union member that was tried
(``str``, ``list[TextPart]``, a model's class name), which is no part of the client's body.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from trioserve.errors import InvalidRequest

Model = TypeVar("Model", bound=BaseModel)


class WireModel(BaseModel):
    """A request model: JSON types as declared, no coercion (subclasses set ``extra`` themselves)."""

    model_config = ConfigDict(strict=True)


def parse(model: type[Model], raw: Any) -> Model:
    """``raw`` (a parsed JSON body) as ``model``.

    Raises:
        InvalidRequest: a field is missing, of the wrong type or out of range; ``param`` is its path.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid_request(exc, raw) from None


def invalid_request(exc: ValidationError, raw: Any) -> InvalidRequest:
    """The 400 for ``exc``, raised validating ``raw``.

    A value no member of a union takes fails once per member (``content``: not a string; not a list, or
    ``content.0.type`` wrong in the list): the deepest path is the one that tells the client what to fix.
    All the ways that field failed are said, once each.
    """
    failures = [(_path_of(error, raw), error["msg"]) for error in exc.errors()]
    param = max((path for path, _ in failures), key=lambda path: path.count(".") + bool(path))
    message = "; or ".join(dict.fromkeys(msg for path, msg in failures if path == param))
    if not param:
        return InvalidRequest(message)
    return InvalidRequest(f"{param}: {message}", param=param, code="invalid_value")


def _path_of(error: ErrorDetails, raw: Any) -> str:
    path = field_path(error["loc"], raw, missing=error["type"] == "missing")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a union discriminated by a field:
        tag = str((error.get("ctx") or {}).get("discriminator", "")).strip("'")  # that field is what is wrong
        path = f"{path}.{tag}" if path and tag else path or tag
    return path


def field_path(loc: tuple[int | str, ...], raw: Any, *, missing: bool = False) -> str:
    """The dotted path in ``raw`` that pydantic's error location ``loc`` points at.

    Parts that are no key or index of the body at that point (a union member's tag, ``[key]``) are
    dropped, and so is the tag of a union discriminated by ``type`` where it is also a field's name (a
    ``text`` block's ``text``); a missing field (``missing``) is kept as the last part.
    """
    path: list[str] = []
    current = raw
    for index, part in enumerate(loc):
        if isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current):
            path.append(str(part))
            current = current[part]
        elif isinstance(part, str) and isinstance(current, dict) and part in current:
            following = loc[index + 1] if index + 1 < len(loc) else None
            if current.get("type") == part and isinstance(following, str) and following in current:
                continue  # the tag of a union discriminated by "type" that is also a field's name ("text")
            path.append(part)
            current = current[part]
        elif isinstance(part, str) and missing and index == len(loc) - 1:
            path.append(part)
    return ".".join(path)
