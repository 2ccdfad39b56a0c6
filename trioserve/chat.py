"""Chat completions (``POST /v1/chat/completions``): messages through the model's chat template, the chat
shapes, and forced tool calls made into ``tool_calls``.

Shares admission, choices as sequences, deadlines, stop strings and usage with legacy completions
(`serving.GenerationService`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, aclosing

import trio

from trioserve.engine import TokenStream
from trioserve.errors import TrioserveError
from trioserve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    chat_completion_id,
    now,
)
from trioserve.serving import (
    SYSTEM_FINGERPRINT,
    Collected,
    GenerationService,
    Prepared,
    RequestTiming,
    resolve_max_tokens,
    usage_of,
)
from trioserve.toolcalls import FunctionCallDelta, ToolCallDelta, parse_call
from trioserve.types import FinishReason

logger = logging.getLogger(__name__)


class ChatService(GenerationService):
    """Chat completions: messages through the model's chat template."""

    async def prepare(
        self, body: ChatCompletionRequest, *, request_id: str | None = None, time_limit: float = 600.0
    ) -> Prepared:
        """Validates against the model and builds the engine request.

        Args:
            body: the parsed request.
            request_id: the id to use (the client's X-Request-Id), else a new ``chatcmpl-`` id.
            time_limit: seconds from now the whole request may take (its deadline).

        Raises:
            InvalidRequest: the prompt or a parameter does not fit the model.
            ModelNotFound: with ``strict_model_name``, the request named another model.
            Unavailable: the model failed to load.
        """
        arrived = trio.current_time()
        runner = await self.engine.ensure_loaded()
        self._check(body, body.model, runner)
        if body.tools and not body.forced_tools() and not self._reported_unforced_tools:
            self._reported_unforced_tools = True  # once: agent frameworks send tools with every request
            logger.warning(
                "tools with tool_choice 'auto' or 'none' are answered in text: this server only makes forced "
                "tool calls (tool_choice 'required' or a named function)"
            )
        prompt_ids = runner.tokenizer.encode_chat(
            [m.for_template() for m in body.messages], tools=body.tools_for_template()
        )
        if body.truncate is not None:
            prompt_ids = prompt_ids[-body.truncate :]
        max_tokens = resolve_max_tokens(runner, len(prompt_ids), body.requested_max_tokens())
        params = body.to_sampling_params(
            max_tokens=max_tokens,
            vocab_size=runner.vocab_size,
            logprobs=body.requested_logprobs(),
            grammar=await self._grammar(body, runner),
        )
        completion_id = request_id or chat_completion_id()
        return Prepared(
            body=body,
            generations=self._choices(completion_id, [prompt_ids], [params], body.n),
            completion_id=completion_id,
            created=now(),
            model=runner.model_id,
            stops=body.stop_strings(),
            timing=RequestTiming(arrived=arrived, deadline=arrived + time_limit, prompt_tokens=len(prompt_ids)),
            logprobs=body.logprobs,
        )

    async def complete(self, prepared: Prepared, streams: Sequence[TokenStream]) -> ChatCompletion:
        """Collects a whole completion (one choice per stream); every stream is closed when it returns."""
        choices = []
        for index, choice in enumerate(await self._collect(prepared, streams)):
            message, finish = _answer(prepared, choice.text, choice.finish)
            logprobs = ChoiceLogprobs(content=choice.logprobs) if prepared.logprobs else None
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish))
        return ChatCompletion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.model,
            choices=choices,
            usage=usage_of(prepared),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def stream(
        self, prepared: Prepared, streams: Sequence[TokenStream]
    ) -> AsyncGenerator[ChatCompletionChunk | TrioserveError, None]:
        """Yields the chunks of a streamed completion, or one error (after which the stream ends).

        Per choice: a first chunk with the role, content deltas, a chunk with its finish reason; then one
        usage chunk if asked for. A forced tool call is held back until its choice finishes, then sent as one
        ``tool_calls`` delta (it is only a call once it is complete). Streams are closed as their choices
        finish, and all of them when the generator is closed.
        """

        def chunk(
            index: int, delta: Delta, finish: str | None = None, logprobs: Sequence[TokenLogprob] = ()
        ) -> ChatCompletionChunk:
            choice = ChunkChoice(
                index=index,
                delta=delta,
                logprobs=ChoiceLogprobs(content=list(logprobs)) if prepared.logprobs and logprobs else None,
                finish_reason=finish,
            )
            return ChatCompletionChunk(
                id=prepared.completion_id,
                created=prepared.created,
                model=prepared.model,
                choices=[choice],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        held = [Collected() for _ in streams] if _forced_call(prepared) else None
        finished: list[str] = []
        async with AsyncExitStack() as owned:
            for stream in streams:
                await owned.enter_async_context(stream)
            for index in range(len(streams)):
                yield chunk(index, Delta(role="assistant", content=""))
            try:
                async with aclosing(self._pieces(prepared, streams)) as pieces:
                    async for index, piece in pieces:
                        if held is not None:
                            held[index].parts.append(piece.text)
                            held[index].logprobs.extend(piece.logprobs)
                        elif piece.text or piece.logprobs:
                            yield chunk(index, Delta(content=piece.text), logprobs=piece.logprobs)
                        if piece.finish_reason is None:
                            continue
                        finish: str | None = piece.finish_reason.value
                        if held is not None:
                            message, finish = _answer(prepared, held[index].text, piece.finish_reason)
                            yield chunk(index, _delta_of(message), logprobs=held[index].logprobs)
                        finished.append(finish or "")
                        yield chunk(index, Delta(), finish)
            except TrioserveError as error:
                yield error
                return
            prepared.timing.finish_reason = ",".join(finished)
            options = prepared.body.stream_options
            if options is not None and options.include_usage:
                yield ChatCompletionChunk(
                    id=prepared.completion_id,
                    created=prepared.created,
                    model=prepared.model,
                    choices=[],
                    usage=usage_of(prepared),
                    system_fingerprint=SYSTEM_FINGERPRINT,
                )


def _forced_call(prepared: Prepared) -> bool:
    body = prepared.body
    return isinstance(body, ChatCompletionRequest) and bool(body.forced_tools())


def _answer(prepared: Prepared, text: str, finish: FinishReason | None) -> tuple[AssistantMessage, str | None]:
    """A choice's message and finish reason. Under a forced ``tool_choice`` a complete call becomes
    ``tool_calls``, with OpenAI's finish reasons: ``"tool_calls"`` for ``required``, ``"stop"`` for a named
    function. A call cut short (``max_tokens``, a stop string) stays text, with its own finish reason."""
    if _forced_call(prepared) and finish is FinishReason.STOP and (call := parse_call(text)) is not None:
        body = prepared.body
        assert isinstance(body, ChatCompletionRequest)
        return AssistantMessage(content=None, tool_calls=[call]), "stop" if body.named_tool else "tool_calls"
    return AssistantMessage(content=text), finish.value if finish is not None else None


def _delta_of(message: AssistantMessage) -> Delta:
    if not message.tool_calls:
        return Delta(content=message.content)
    return Delta(
        tool_calls=[
            ToolCallDelta(
                index=i, id=call.id, type="function", function=FunctionCallDelta(**call.function.model_dump())
            )
            for i, call in enumerate(message.tool_calls)
        ]
    )
