"""Tools on the wire: the request's tools and ``tool_choice``, the calls in responses and stream deltas.

Which tools the model is shown and may call (`tools_in_play`) and their schemas as plain data (`tool_specs`,
each naming its request field for errors) are decided here; the grammar that makes every call parse and
match its tool's schema is built from them (`grammars`), and calls are read out of the output by
`toolparsers`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trioserve.api.validation import WireModel
from trioserve.types import ToolSpec

# -- requests ---------------------------------------------------------------------------------------------


class FunctionDefinition(WireModel):
    model_config = ConfigDict(extra="allow")
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; absent: no parameters
    strict: bool | None = None


class Tool(WireModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """The tool as chat templates expect it (the OpenAI shape, parameters defaulted)."""
        function = self.function.model_dump(exclude_none=True)
        function.setdefault("parameters", {"type": "object", "properties": {}})
        return {"type": "function", "function": function}


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
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


def tools_in_play(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools the model is shown and may call: none for ``"none"``, the named one, else all of them."""
    if not tools or choice == "none":
        return []
    return forced_tools(tools, choice) or list(tools)


def tool_specs(tools: list[Tool], in_play: list[Tool]) -> tuple[ToolSpec, ...]:
    """The schemas of ``in_play`` as plain data; errors about one name its place in ``tools``."""
    return tuple(
        ToolSpec(
            name=tool.function.name,
            parameters=tool.function.parameters or {"type": "object", "properties": {}},
            strict=bool(tool.function.strict),
            param=f"tools[{next(i for i, t in enumerate(tools) if t is tool)}].function.parameters",
        )
        for tool in in_play
    )


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
