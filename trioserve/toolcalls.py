"""Tool calls that ``tool_choice`` forces: ``"required"`` (one of the tools) or a named function.

The call is produced under a grammar (`call_schema`), like ``response_format``: the output is the JSON object
``{"name": <a tool's name>, "arguments": <that tool's parameters schema>}``, so it always names a tool and
its arguments always match that tool's schema, whatever the model. The text is then turned into the
OpenAI shape (`ToolCall`). With ``tool_choice`` ``"auto"`` (the default when tools are given) the model
answers in text: telling a call apart from text needs a parser for each model family's own tool-call format,
which this server does not have.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trioserve.types import OutputSchema

# -- requests ---------------------------------------------------------------------------------------------


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no parameters
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates expect it (the OpenAI shape, parameters defaulted)."""
        function = self.function.model_dump(exclude_none=True)
        function.setdefault("parameters", {"type": "object", "properties": {}})
        return {"type": "function", "function": function}


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def forced_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools one of which the output must call; empty when the model may answer in text."""
    if not tools or choice is None or choice in ("none", "auto"):
        return []
    if isinstance(choice, NamedToolChoice):
        return [tool for tool in tools if tool.function.name == choice.function.name]
    return list(tools)


def call_schema(tools: list[Tool]) -> OutputSchema:
    """The schema of one call to one of ``tools`` (errors about it name ``tools``)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "arguments": tool.function.parameters or {"type": "object", "properties": {}},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return OutputSchema(schema, strict=any(bool(t.function.strict) for t in tools), param="tools")


# -- responses --------------------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


def parse_call(text: str) -> ToolCall | None:
    """The call in ``text`` (output produced under `call_schema`), or None if it is incomplete (the
    output was cut by ``max_tokens`` or a stop string)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    arguments = json.dumps(value["arguments"], ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=value["name"], arguments=arguments))
