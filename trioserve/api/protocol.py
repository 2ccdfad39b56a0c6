"""Wire models of what clients send to chat and legacy completions, in the field order of OpenAI's API
reference (what they receive: `replies`).

Fields beyond OpenAI's are fenced off under "Extensions" in each model. Unknown fields are accepted (old
clients and agent frameworks send extras) and reported through `unknown_fields` so the app can log them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from trioserve.api.messages import ChatMessage, check_contents
from trioserve.api.toolcalls import NamedToolChoice, Tool, ToolChoice, forced_tools, tools_in_play
from trioserve.api.validation import WireModel
from trioserve.errors import InvalidRequest
from trioserve.types import OutputSchema, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
GUIDED_FIELDS = frozenset(
    {
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "guided_whitespace_pattern",
    }
)
MAX_CHOICES = 128  # OpenAI's limit; each choice also needs a slot or a queue place


# -- requests -------------------------------------------------------------------------------------------


class StreamOptions(WireModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JsonSchemaFormat(WireModel):
    """``response_format.json_schema``: the schema the output must match, with OpenAI's naming rules."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # absent: any JSON value
    strict: bool | None = None  # true: keywords the compiler cannot enforce are a 400, not ignored


class ResponseFormat(WireModel):
    """``response_format``: free text, any JSON object, or JSON matching a schema; enforced while sampling."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self

    def output_schema(self) -> OutputSchema | None:
        """The schema this format enforces (None for text)."""
        if self.type == "json_object":
            return OutputSchema({"type": "object"})
        if self.json_schema is not None:
            spec = self.json_schema
            schema = spec.schema_ if spec.schema_ is not None else {}
            return OutputSchema(schema, strict=bool(spec.strict), param="response_format.json_schema.schema")
        return None


class StructuredOutputs(WireModel):
    """``structured_outputs`` (vLLM's extension, which replaced its ``guided_*`` fields): one of a JSON schema,
    any JSON object, a regular expression, a list of choices, or a grammar (Lark or GBNF), enforced while
    sampling as ``response_format`` is. vLLM's tuning options are accepted and have no effect here."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")  # a schema, or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # vLLM's options for its own backends.
    disable_fallback: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: str | None = None

    def output_schema(self) -> OutputSchema:
        """The shape the output must have.

        Raises:
            InvalidRequest: none or more than one shape was given, the JSON text does not parse, or a
                structural tag (not supported by this server) was asked for.
        """
        if self.structural_tag is not None:
            raise InvalidRequest(
                "structured_outputs.structural_tag is not supported by this server",
                param="structured_outputs.structural_tag",
            )
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, _attr(name)) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise InvalidRequest(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object"
                + (f"; got {', '.join(given)}" if given else ""),
                param="structured_outputs",
            )
        param = f"structured_outputs.{given[0]}"
        if self.json_object:
            return OutputSchema({"type": "object"}, param=param)
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise InvalidRequest(f"{param} is not valid JSON: {exc}", param=param) from None
                if not isinstance(schema, dict | bool):
                    raise InvalidRequest(f"{param} must be a JSON schema (an object)", param=param)
            return OutputSchema(schema if isinstance(schema, dict) else {}, param=param)
        if self.choice is not None:
            return OutputSchema(choice=tuple(self.choice), param=param)
        return OutputSchema(regex=self.regex, grammar=self.grammar, param=param)


def _attr(name: str) -> str:
    return "json_" if name == "json" else name


class _SamplingFields(WireModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="allow")

    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    user: str | None = None

    # -- Extensions (not in OpenAI's API) --
    top_k: Annotated[int, Field(ge=0)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    truncate: Annotated[int, Field(ge=1)] | None = None  # keep only the last N prompt tokens (old server)
    request_timeout: Annotated[float, Field(gt=0)] | None = None  # seconds; capped by the server's
    structured_outputs: StructuredOutputs | None = None  # vLLM's: regex, choice, grammar, json
    # vLLM's name: requests with different salts never share prefix-cache entries (a timing side channel).
    cache_salt: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _check_schema_and_eos(self) -> _SamplingFields:
        # The grammar ends the output with EOS once the value is complete; ignoring EOS would run past it.
        # (InvalidRequest rather than ValueError: pydantic would report it at the body, not the field.)
        for name in sorted(self.model_extra or {}):
            if name in GUIDED_FIELDS:  # ignoring one would hand back unconstrained text the client trusts
                raise InvalidRequest(
                    f"{name} is vLLM's old field, which vLLM removed: use structured_outputs", param=name
                )
        if self.ignore_eos and self.output_schema() is not None:
            raise InvalidRequest(
                "ignore_eos cannot be combined with a JSON response_format, structured_outputs or a forced tool_choice",
                param="ignore_eos",
            )
        return self

    @field_validator("logit_bias")
    @classmethod
    def _check_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def output_schema(self) -> OutputSchema | None:
        """The shape the output must have (None: free text): ``response_format`` or ``structured_outputs``.

        Raises:
            InvalidRequest: both were given, or ``structured_outputs`` is not one shape.
        """
        answer = self.response_format.output_schema() if self.response_format is not None else None
        if self.structured_outputs is not None:
            if answer is not None:
                raise InvalidRequest(
                    "structured_outputs cannot be combined with a JSON response_format", param="structured_outputs"
                )
            return self.structured_outputs.output_schema()
        return answer

    def to_sampling_params(
        self,
        *,
        max_tokens: int,
        vocab_size: int | None = None,
        logprobs: int | None = None,
        grammar: str | None = None,
    ) -> SamplingParams:
        """The internal sampling parameters; ``max_tokens`` is resolved by the caller against the context,
        and ``grammar`` is `output_schema` compiled by the caller (the runner's, off the event loop).

        Raises:
            InvalidRequest: a logit_bias token id is outside the vocabulary.
        """
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        if vocab_size is not None:
            for token_id in bias:
                if not 0 <= token_id < vocab_size:
                    raise InvalidRequest(
                        f"logit_bias has token id {token_id}, outside the vocabulary", param="logit_bias"
                    )
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            grammar=grammar,
        )


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # absent: true (several calls in one turn)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None  # to templates

    # -- Extensions (not in OpenAI's API) --
    chat_template_kwargs: dict[str, Any] | None = None  # the template's own variables, e.g. enable_thinking

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        # InvalidRequest rather than ValueError: pydantic would report these at the body, not the field.
        check_contents(self.messages)
        choice, forced = self.tool_choice, self.forced_tools()
        if choice == "required" and not self.tools:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and not forced:
            raise InvalidRequest(
                f"tool_choice names function {choice.function.name!r}, which is not among the tools",
                param="tool_choice",
            )
        if self.ignore_eos and self.tools_in_play():
            # Once the calls are complete the grammar allows only EOS.
            raise InvalidRequest("ignore_eos cannot be combined with tools", param="ignore_eos")
        reserved = {"messages", "tools", "add_generation_prompt", "tokenize", "continue_final_message"}
        if clash := reserved & set(self.chat_template_kwargs or {}):
            raise InvalidRequest(
                f"chat_template_kwargs may not set {', '.join(sorted(clash))}", param="chat_template_kwargs"
            )
        return self

    def forced_tools(self) -> list[Tool]:
        """The tools one of which the answer must call (``tool_choice`` required or named), else empty."""
        return forced_tools(self.tools, self.tool_choice)

    def tools_in_play(self) -> list[Tool]:
        """The tools the model is shown and may call (none with ``tool_choice`` "none")."""
        return tools_in_play(self.tools, self.tool_choice)

    @property
    def named_tool(self) -> bool:
        return isinstance(self.tool_choice, NamedToolChoice)

    def template_kwargs(self) -> dict[str, Any]:
        """Variables for the chat template: ``chat_template_kwargs``, and ``reasoning_effort`` if given."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        return kwargs

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (legacy): a raw prompt, no chat template."""

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _check_legacy(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs (prompt logprobs) is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [[int(item) for item in prompt]]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
