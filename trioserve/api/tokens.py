"""``POST /tokenize`` and ``/detokenize`` in vLLM's shapes, for clients that count tokens before sending.

A tokenize body with ``messages`` is counted as a chat request would be (chat template, ``tools`` shown
to it, generation prompt added); one with ``prompt`` as a raw prompt (``add_special_tokens``: as legacy
completions encode it, with the model's BOS if it has one). ``token_strs`` are each token's own text
(its bytes decoded, U+FFFD where a token is part of a character), not the tokenizer's internal spelling.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from trioserve.api.messages import ChatMessage, check_contents
from trioserve.api.toolcalls import Tool
from trioserve.api.validation import WireModel
from trioserve.engine.engine import Engine
from trioserve.errors import InvalidRequest, ModelNotFound
from trioserve.types import Runner


class TokenizePromptRequest(WireModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(WireModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    tools: list[Tool] | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _check_contents(self) -> TokenizeChatRequest:
        check_contents(self.messages)
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize_request(raw: Any) -> type[TokenizePromptRequest] | type[TokenizeChatRequest]:
    """The shape a tokenize body has: chat when it carries ``messages``."""
    return TokenizeChatRequest if isinstance(raw, dict) and "messages" in raw else TokenizePromptRequest


class TokenService:
    """Counts and decodes with the served model's tokenizer.

    Args:
        engine: the engine whose model's tokenizer is used (loaded on first use).
        strict_model_name: refuse bodies naming another model (404), as the generation routes do.
    """

    def __init__(self, engine: Engine, *, strict_model_name: bool = False) -> None:
        self.engine = engine
        self.strict_model_name = strict_model_name

    async def tokenize(self, body: TokenizePromptRequest | TokenizeChatRequest) -> TokenizeResponse:
        """Raises:
        InvalidRequest: an option this server does not support (images included), or the template rejected the
            messages.
        ModelNotFound: with ``strict_model_name``, the body named another model.
        """
        runner = await self._runner(body.model)
        if isinstance(body, TokenizeChatRequest):
            for name in ("chat_template", "continue_final_message"):
                if getattr(body, name):
                    raise InvalidRequest(f"{name} is not supported by this server", param=name)
            if not body.add_generation_prompt:
                raise InvalidRequest(
                    "add_generation_prompt false is not supported by this server (chat requests always add it)",
                    param="add_generation_prompt",
                )
            for index, message in enumerate(body.messages):
                for position, _ in message.images()[:1]:
                    where = f"messages[{index}].content[{position}]"
                    raise InvalidRequest(f"{where}: /tokenize does not take images (not supported)", param=where)
            tools = [tool.for_template() for tool in body.tools] if body.tools else None
            ids = runner.tokenizer.encode_chat([m.for_template() for m in body.messages], tools=tools)
        elif body.add_special_tokens:
            ids = runner.tokenizer.encode_prompt(body.prompt)
        else:
            ids = runner.tokenizer.encode(body.prompt)
        strs = None
        if body.return_token_strs:
            strs = [runner.tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        return TokenizeResponse(count=len(ids), max_model_len=runner.max_context, tokens=ids, token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """Raises:
        InvalidRequest: a token id outside the vocabulary.
        ModelNotFound: with ``strict_model_name``, the body named another model.
        """
        runner = await self._runner(body.model)
        for index, token_id in enumerate(body.tokens):
            if not 0 <= token_id < runner.vocab_size:
                raise InvalidRequest(f"token id {token_id} is outside the vocabulary", param=f"tokens.{index}")
        return DetokenizeResponse(prompt=runner.tokenizer.decode(body.tokens))

    async def _runner(self, model: str | None) -> Runner:
        runner = await self.engine.ensure_loaded()
        if self.strict_model_name and model not in (None, runner.model_id):
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        return runner
