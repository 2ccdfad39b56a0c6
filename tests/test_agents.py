"""The agent frameworks users run, end to end against a real server on loopback: openai-agents (chat
completions and Responses models), pydantic-ai, langchain-openai, and the openai SDK's tool helpers.

The model is the demo's random-weight Llama with the tool-call and thinking markers added to its tokenizer
as single tokens (as Qwen's tokenizers have them). Its decisions are driven, never mocked: ``tool_choice``
"required" or named (the call is grammar-constrained), ``logit_bias`` on a token the grammar must choose
between (the first letter of a tool's name), or, for ``tool_choice`` "auto", on the ``<tool_call>`` token
that starts a call in the ChatML (Hermes) format. Tools take enum and integer arguments: a free string
from a random model runs until it happens to sample a closing quote.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import httpx
import openai
import pydantic
import pytest

from tests.servers import Served
from tests.threaded import served_in_thread
from tests.toolmodel import tool_app

pytestmark = pytest.mark.socket


class Forecast(pydantic.BaseModel):
    city: Literal["Ipoh", "Paris"]
    days: int = pydantic.Field(ge=1, le=7)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_in_thread(tool_app) as served:
        assert token_of(served, "<tool_call>") != token_of(served, "<")  # one token, so one bias drives it
        yield served


def token_of(served: Served, text: str) -> str:
    """The id (as logit_bias keys it) of the first token of ``text``, from the server's own /tokenize."""
    reply = httpx.post(served.url + "/tokenize", json={"prompt": text, "add_special_tokens": False})
    return str(reply.json()["tokens"][0])


def compact(served: Served) -> dict[str, float]:
    """logit_bias against whitespace: grammars allow any amount of it between JSON tokens, and a random
    model writes a lot, which only costs time (the value is the same)."""
    return {token_of(served, space): -100 for space in (" ", "\n", "\r", "\t")}


def async_client(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0)


# -- openai-agents ------------------------------------------------------------------------------------------


def run_agent(served: Served, api: str, *, auto: bool = False, stream: bool = False, output_type: Any = None) -> Any:
    """Runs an openai-agents Agent with one function tool to its final output; returns (result, calls)."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        RunHooks,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    calls: list[tuple[str, int]] = []

    @function_tool
    def get_weather(city: Literal["Ipoh", "Paris"], days: Annotated[int, pydantic.Field(ge=1, le=7)]) -> str:
        """The forecast for a city."""
        calls.append((city, days))
        return "sunny, 31 C"

    class ForgetTheBias(RunHooks[Any]):
        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
            # After the call: no bias, no forced call, a short answer that ends with EOS (the Agents SDK
            # takes a response cut by max_output_tokens for a failure).
            answer = {"min_tokens": 2, "logit_bias": {token_of(served, "<|im_end|>"): 100}}
            agent.model_settings = ModelSettings(extra_body={"logit_bias": compact(served)} if output_type else answer)

    async def main() -> Any:
        client = async_client(served)
        model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
        model = model_class(model="m", openai_client=client)
        if auto:
            # One call: with the bias, the model would open call after call until max_tokens.
            bias = {token_of(served, "<tool_call>"): 100}
            settings = ModelSettings(max_tokens=200, parallel_tool_calls=False, extra_body={"logit_bias": bias})
        else:
            # Required for the first turn (the grammar ends the call); the hook then makes the answer short.
            settings = ModelSettings(tool_choice="required", extra_body={"logit_bias": compact(served)})
        agent = Agent(
            name="forecaster",
            instructions="Answer with the forecast.",
            tools=[get_weather],
            model=model,
            model_settings=settings,
            output_type=output_type,
        )
        try:
            if stream:
                result = Runner.run_streamed(agent, "Weather in Ipoh?", hooks=ForgetTheBias(), max_turns=3)
                kinds = {event.type async for event in result.stream_events()}
                assert "raw_response_event" in kinds
                return result
            return await Runner.run(agent, "Weather in Ipoh?", hooks=ForgetTheBias(), max_turns=3)
        finally:
            await client.close()

    return asyncio.run(main()), calls


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_agents_run_a_required_tool_to_completion(served: Served, api: str) -> None:
    result, calls = run_agent(served, api)
    assert len(calls) == 1 and calls[0][0] in ("Ipoh", "Paris") and 1 <= calls[0][1] <= 7
    assert isinstance(result.final_output, str)
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


def test_openai_agents_streamed_responses_model(served: Served) -> None:
    result, calls = run_agent(served, "responses", stream=True)
    assert len(calls) == 1 and isinstance(result.final_output, str)


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_agents_call_a_tool_in_auto_mode_then_answer(served: Served, api: str) -> None:
    result, calls = run_agent(served, api, auto=True)
    assert len(calls) == 1 and isinstance(result.final_output, str)
    assert [item.type for item in result.new_items][-1] == "message_output_item"


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_agents_tool_and_output_type(served: Served, api: str) -> None:
    result, calls = run_agent(served, api, output_type=Forecast)
    assert len(calls) == 1 and isinstance(result.final_output, Forecast)


# -- pydantic-ai ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_pydantic_ai_tool_then_structured_result(served: Served, api: str) -> None:
    from pydantic_ai import Agent, RunContext, Tool
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.tools import ToolDefinition

    calls: list[str] = []

    def lookup_city(city: Literal["Ipoh", "Paris"]) -> str:
        """Looks a city up."""
        calls.append(city)
        return "tropical"

    async def first_turn_only(ctx: RunContext[None], definition: ToolDefinition) -> ToolDefinition | None:
        return definition if ctx.run_step <= 1 else None

    async def main() -> Any:
        async with async_client(served) as client:
            provider = OpenAIProvider(openai_client=client)
            model = (OpenAIResponsesModel if api == "responses" else OpenAIChatModel)("m", provider=provider)
            # Its structured result is an output tool ("final_result"), so every turn is a required call.
            # Biasing "l" makes the first turn pick lookup_city (the names differ at their first letter);
            # then only final_result is left, and its arguments come out of the grammar as a valid Forecast.
            # (extra_body: the Responses API has no logit_bias, so pydantic-ai would not send it.)
            agent = Agent(
                model,
                output_type=Forecast,
                tools=[Tool(lookup_city, prepare=first_turn_only)],
                model_settings={"extra_body": {"logit_bias": {**compact(served), token_of(served, "l"): 100}}},
            )
            return await agent.run("Weather in Ipoh?")

    result = asyncio.run(main())
    assert calls and calls[0] in ("Ipoh", "Paris")
    assert isinstance(result.output, Forecast)


def test_pydantic_ai_tool_in_auto_mode_then_text(served: Served) -> None:
    from pydantic_ai import Agent, RunContext, Tool
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.tools import ToolDefinition

    calls: list[str] = []

    def lookup_city(city: Literal["Ipoh", "Paris"]) -> str:
        """Looks a city up."""
        calls.append(city)
        return "tropical"

    async def first_turn_only(ctx: RunContext[None], definition: ToolDefinition) -> ToolDefinition | None:
        return definition if ctx.run_step <= 1 else None

    async def main() -> Any:
        async with async_client(served) as client:
            model = OpenAIChatModel("m", provider=OpenAIProvider(openai_client=client))
            settings = {"max_tokens": 200, "logit_bias": {token_of(served, "<tool_call>"): 100}}
            agent = Agent(model, tools=[Tool(lookup_city, prepare=first_turn_only)], model_settings=settings)  # type: ignore[arg-type]
            return await agent.run("Weather in Ipoh?")

    result = asyncio.run(main())
    assert calls and isinstance(result.output, str)


# -- langchain-openai ---------------------------------------------------------------------------------------


def chat_openai(served: Served, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    kwargs.setdefault("extra_body", {"logit_bias": compact(served)})
    return ChatOpenAI(model="m", base_url=served.url + "/v1", api_key="-", max_retries=0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("use_responses_api", [False, True])
def test_langchain_bind_tools_required(served: Served, use_responses_api: bool) -> None:
    llm = chat_openai(served, use_responses_api=use_responses_api)
    message = llm.bind_tools([Forecast], tool_choice="required", strict=True).invoke("Weather in Ipoh?")
    (call,) = message.tool_calls
    assert call["name"] == "Forecast"
    Forecast.model_validate(call["args"])


def test_langchain_with_structured_output(served: Served) -> None:
    llm = chat_openai(served, seed=1)
    # strict: the schema gets additionalProperties false (without it the grammar lets a random model add
    # keys until the context is full).
    assert isinstance(llm.with_structured_output(Forecast, strict=True).invoke("Weather in Ipoh?"), Forecast)
    by_call = llm.with_structured_output(Forecast, method="function_calling", strict=True).invoke("Weather in Ipoh?")
    assert isinstance(by_call, Forecast)


def test_langchain_bind_tools_auto(served: Served) -> None:
    llm = chat_openai(served, max_tokens=200, extra_body={"logit_bias": {token_of(served, "<tool_call>"): 100}})
    message = llm.bind_tools([Forecast], strict=True, parallel_tool_calls=False).invoke("Weather in Ipoh?")
    (call,) = message.tool_calls
    Forecast.model_validate(call["args"])


# -- the openai SDK's helpers -------------------------------------------------------------------------------


class City(pydantic.BaseModel):
    name: Literal["Ipoh", "Paris"]


class Trip(pydantic.BaseModel):
    origin: City
    destination: City
    nights: int = pydantic.Field(ge=1, le=9)


def test_sdk_pydantic_function_tool_of_a_nested_model(served: Served) -> None:
    tool = openai.pydantic_function_tool(Trip)
    assert "$defs" in json.dumps(tool)
    with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
        completion = client.chat.completions.parse(
            model="m",
            messages=[{"role": "user", "content": "Plan a trip"}],
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "Trip"}},
        )
        (call,) = completion.choices[0].message.tool_calls or []
        assert isinstance(call.function.parsed_arguments, Trip)
        function = tool["function"]
        flat = {"type": "function", "name": "Trip", "parameters": function["parameters"], "strict": True}
        response = client.responses.create(model="m", input="Plan a trip", tools=[flat], tool_choice="required")  # type: ignore[list-item]
        (item,) = response.output
        assert item.type == "function_call"
        Trip.model_validate_json(item.arguments)


def test_sdk_responses_auto_tool_call(served: Served) -> None:
    tool = {"type": "function", "name": "Trip", "parameters": Forecast.model_json_schema(), "strict": True}
    bias = {token_of(served, "<tool_call>"): 100}
    with openai.OpenAI(api_key="-", base_url=served.url + "/v1", max_retries=0) as client:
        response = client.responses.create(
            model="m",
            input="Trip?",
            tools=[tool],
            parallel_tool_calls=False,
            max_output_tokens=200,
            extra_body={"logit_bias": bias},  # type: ignore[list-item]
        )
    assert [item.type for item in response.output] == ["function_call"]
    Forecast.model_validate_json(response.output[0].arguments)  # type: ignore[union-attr]
