"""Chat completions (``POST /v1/chat/completions``): messages through the model's chat template, the chat
shapes, tool calls and the thinking block.

Shares admission, choices as sequences, deadlines, stop strings and usage with legacy completions
(`serving.GenerationService`). What the output must look like (a JSON answer, calls in the model's own
syntax, a thinking block first) is described as an `OutputSchema` and compiled by the runner; how to read
it back is an `OutputPlan` (`chatoutput`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass

import trio

from trioserve.api.chatoutput import ChoiceReader, OutputPlan, deltas_of, message_of
from trioserve.api.images import ImageLoader, ImagePolicy, ImageRef, check_count, image_refs
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.api.replies import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    chat_completion_id,
    now,
)
from trioserve.api.serving import (
    SYSTEM_FINGERPRINT,
    GenerationService,
    Prepared,
    RequestTiming,
    cache_scope,
    resolve_max_tokens,
    usage_of,
)
from trioserve.api.toolcalls import tool_specs
from trioserve.engine.engine import Engine, TokenStream
from trioserve.errors import DeadlineExceeded, InvalidRequest, TrioserveError
from trioserve.text.reasoning import choose_thinking, prompt_opens
from trioserve.text.toolparsers import BARE_JSON, choose_syntax
from trioserve.types import CallSyntax, ImageInputs, OutputSchema, Runner, Thinking, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ChatPrepared(Prepared):
    """A prepared chat request, with how to read its outputs."""

    plan: OutputPlan = dataclasses.field(default_factory=OutputPlan)


class ChatService(GenerationService):
    """Chat completions: messages through the model's chat template.

    Args:
        engine: the engine serving the model.
        strict_model_name: refuse requests naming another model (404) instead of serving them anyway.
        tool_call_parser: the call syntax (`toolparsers`): "auto" reads it from the chat template, "none"
            turns calls in ``tool_choice`` "auto" off.
        reasoning_parser: the thinking block (`reasoning`): "auto" if the chat template has one, "none" off.
        images: the limits on images in messages, and how remote ones are fetched.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        strict_model_name: bool = False,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "auto",
        images: ImagePolicy | None = None,
    ) -> None:
        super().__init__(engine, strict_model_name=strict_model_name)
        self.images = ImageLoader(images or ImagePolicy())
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self._formats: tuple[Tokenizer, CallSyntax | None, Thinking | None] | None = None
        self._reported_unparsed_tools = False

    def output_formats(self, tokenizer: Tokenizer) -> tuple[CallSyntax | None, Thinking | None]:
        """The model's call syntax and thinking block (from its template, or as configured); once per model."""
        if self._formats is None or self._formats[0] is not tokenizer:
            template = tokenizer.chat_template
            syntax = choose_syntax(self.tool_call_parser, template, tokenizer.token_id)
            thinking = choose_thinking(self.reasoning_parser, template, tokenizer.token_id)
            self._formats = (tokenizer, syntax, thinking)
            logger.info(
                "output parsers: tool calls %s, reasoning %s",
                syntax.name if syntax else "none",
                "think" if thinking else "none",
            )
        return self._formats[1], self._formats[2]

    async def prepare(
        self,
        body: ChatCompletionRequest,
        *,
        request_id: str | None = None,
        time_limit: float = 600.0,
        tenant: str = "",
    ) -> ChatPrepared:
        """Validates against the model and builds the engine request.

        Args:
            body: the parsed request.
            request_id: the id to use (the client's X-Request-Id), else a new ``chatcmpl-`` id.
            time_limit: seconds from now the whole request may take (its deadline).
            tenant: who sent it (a digest of its API key): only its own requests share its prefix cache.

        Images are checked before anything is fetched or decoded (a text-only model, too many of them), then
        fetched and decoded one by one in this request's scope, then tokenized with the prompt in a worker
        thread (`Tokenizer.encode_images`).

        Raises:
            InvalidRequest: the prompt or a parameter does not fit the model; an image is refused (``param``
                ``messages[i].content[j]``).
            ModelNotFound: with ``strict_model_name``, the request named another model.
            Unavailable: the model failed to load.
            DeadlineExceeded: reading the images took longer than the request's deadline.
        """
        arrived = trio.current_time()
        runner = await self.engine.ensure_loaded()
        self._check(body, body.model, runner)
        tokenizer = runner.tokenizer
        syntax, thinking = self.output_formats(tokenizer)
        in_play, forced = body.tools_in_play(), body.forced_tools()
        if in_play and syntax is None:
            if forced:
                syntax = BARE_JSON  # a forced call needs no syntax of the model's: the grammar writes it
            else:
                in_play = []
                self._report_unparsed_tools()
        refs = image_refs(body.messages)
        if refs:
            self._check_images(body, tokenizer, len(refs), refs[0].where)
            check_count(refs, self.images.policy)
        prompt = tokenizer.render_chat(
            [m.for_template() for m in body.messages],
            tools=[tool.for_template() for tool in in_play] or None,
            template_kwargs=body.template_kwargs(),
        )
        if thinking is not None:
            thinking = dataclasses.replace(thinking, opened=prompt_opens(prompt, thinking))
        images: ImageInputs | None = None
        if refs:
            prompt_ids, images = await self._encode_images(tokenizer, prompt, refs, arrived + time_limit)
        else:
            prompt_ids = tokenizer.encode(prompt)
        if body.truncate is not None:
            prompt_ids = prompt_ids[-body.truncate :]
        max_tokens = resolve_max_tokens(runner, len(prompt_ids), body.requested_max_tokens())
        spec = dataclasses.replace(
            body.output_schema() or OutputSchema(),
            tools=tool_specs(body.tools or [], in_play),
            calls=syntax if in_play else None,
            required=bool(forced),
            parallel=body.parallel_tool_calls is not False and not body.named_tool,
            thinking=thinking,
        )
        params = body.to_sampling_params(
            max_tokens=max_tokens,
            vocab_size=runner.vocab_size,
            logprobs=body.requested_logprobs(),
            grammar=await _compile(spec, runner),
        )
        completion_id = request_id or chat_completion_id()
        return ChatPrepared(
            body=body,
            generations=self._choices(
                completion_id, [prompt_ids], [params], body.n, cache_scope(tenant, body), images=images
            ),
            completion_id=completion_id,
            created=now(),
            model=runner.model_id,
            stops=body.stop_strings(),
            timing=RequestTiming(arrived=arrived, deadline=arrived + time_limit, prompt_tokens=len(prompt_ids)),
            logprobs=body.logprobs,
            plan=OutputPlan(calls=spec.calls, thinking=thinking, named=body.named_tool),
        )

    async def _encode_images(
        self, tokenizer: Tokenizer, prompt: str, refs: Sequence[ImageRef], deadline: float
    ) -> tuple[list[int], ImageInputs]:
        """The prompt's ids with its images' tokens, and the images as the model takes them (`ImageLoader`),
        before the request's deadline.

        Raises:
            InvalidRequest: an image is refused.
            DeadlineExceeded: the deadline passed first.
        """
        with trio.move_on_at(deadline):
            return await self.images.encode(tokenizer, prompt, refs)
        raise DeadlineExceeded(f"reading the request's {len(refs)} image(s) took longer than its deadline")

    @staticmethod
    def _check_images(body: ChatCompletionRequest, tokenizer: Tokenizer, count: int, first: str) -> None:
        """What is refused before any image is fetched or decoded.

        Raises:
            InvalidRequest: the model takes no images, or ``truncate`` would cut through an image's tokens.
        """
        if not tokenizer.takes_images:
            raise InvalidRequest(
                f"{first}: this model does not take image input (the request has {count} image part"
                f"{'s' if count > 1 else ''}); send text only",
                param=first,
                code="image_input_not_supported",
            )
        if body.truncate is not None:
            raise InvalidRequest("truncate cannot be combined with images", param="truncate")

    def _report_unparsed_tools(self) -> None:
        if not self._reported_unparsed_tools:
            self._reported_unparsed_tools = True  # once: agent frameworks send tools with every request
            logger.warning(
                "tools with tool_choice 'auto' are answered in text: no tool-call syntax was found in this "
                "model's chat template (set --tool-call-parser to name one)"
            )

    async def complete(self, prepared: Prepared, streams: Sequence[TokenStream]) -> ChatCompletion:
        """Collects a whole completion (one choice per stream); every stream is closed when it returns."""
        plan = _plan_of(prepared)
        choices = []
        for index, choice in enumerate(await self._collect(prepared, streams)):
            message, finish = message_of(plan, choice.text, choice.finish)
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

        Per choice: a first chunk with the role, then content, ``reasoning_content`` and ``tool_calls``
        deltas as the output is read (`chatoutput`), a chunk with its finish reason; then one usage chunk if
        asked for. Streams are closed as their choices finish, and all of them when the generator is closed.
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

        plan = _plan_of(prepared)
        readers = [ChoiceReader(plan) for _ in streams]
        finished: list[str] = []
        async with AsyncExitStack() as owned:
            for stream in streams:
                await owned.enter_async_context(stream)
            for index in range(len(streams)):
                yield chunk(index, Delta(role="assistant", content=""))
            try:
                async with aclosing(self._pieces(prepared, streams)) as pieces:
                    async for index, piece in pieces:
                        reader = readers[index]
                        events = reader.feed(piece.text)
                        if piece.finish_reason is not None:
                            events += reader.finish()
                        deltas = deltas_of(events)
                        if not deltas and piece.logprobs:
                            deltas = [Delta(content="")]  # the token's logprobs, its text held back
                        for n, delta in enumerate(deltas):
                            yield chunk(index, delta, logprobs=piece.logprobs if n == 0 else ())
                        if piece.finish_reason is None:
                            continue
                        finish = reader.finish_reason(piece.finish_reason)
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


def _plan_of(prepared: Prepared) -> OutputPlan:
    return prepared.plan if isinstance(prepared, ChatPrepared) else OutputPlan()


async def _compile(spec: OutputSchema, runner: Runner) -> str | None:
    """The grammar for ``spec``, or None when nothing needs constraining (free text, perhaps after a
    thinking block). A large schema takes milliseconds to compile (14 ms for 42 kB here), so it is compiled
    in a worker thread, not on the event loop.

    Raises:
        InvalidRequest: a schema is invalid or cannot be enforced, or this model cannot take grammars.
    """
    if spec.free_answer and not spec.tools:
        return None
    return await trio.to_thread.run_sync(runner.compile_grammar, spec)
