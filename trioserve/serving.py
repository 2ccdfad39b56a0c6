"""Between the wire models and the engine: prompts in, OpenAI-shaped completions and chunks out. No HTTP.

`ChatService.prepare` does everything that can fail on bad input (tokenizing, context checks, parameter
conversion) before anything is admitted; `complete` and `stream` then only consume the engine's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import trio

from trioserve.engine import Engine, TokenStream
from trioserve.errors import ContextLengthExceeded, DeadlineExceeded, ModelNotFound, TrioserveError, Unavailable
from trioserve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
    chat_completion_id,
    now,
)
from trioserve.tokenization import StopMatcher
from trioserve.types import FinishReason, GenerationRequest, Runner, TokenEvent, Tokenizer

logger = logging.getLogger(__name__)

SYSTEM_FINGERPRINT = "trioserve-0.1"


@dataclass(frozen=True, slots=True)
class Piece:
    """Text made certain by one token event, and the finish reason if the sequence ended there."""

    text: str
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] = ()


class TextAssembler:
    """Turns a sequence's token events into text pieces: detokenizes, applies stop strings, counts tokens."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str], *, logprobs: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer(prompt_ids)
        self._stops = StopMatcher(stops)
        self._logprobs = logprobs
        self.completion_tokens = 0

    def feed(self, event: TokenEvent, *, eos: bool) -> Piece:
        """Takes the next event; ``eos`` says its token is an end-of-sequence token (never shown)."""
        self.completion_tokens += 1
        text = "" if eos else self._detokenizer.push(event.token.token_id)
        if event.finish_reason is not None:
            text += self._detokenizer.flush()
        shown, stopped = self._stops.push(text)
        finish = FinishReason.STOP if stopped else event.finish_reason
        if finish is not None and not stopped:
            shown += self._stops.flush()
        logprobs = self._token_logprob(event) if self._logprobs else ()
        return Piece(shown, finish, logprobs)

    def _token_logprob(self, event: TokenEvent) -> tuple[TokenLogprob, ...]:
        def entry(token_id: int, logprob: float) -> TopLogprob:
            raw = self._tokenizer.token_bytes(token_id)
            return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

        chosen = entry(event.token.token_id, event.token.logprob)
        top = [entry(token_id, logprob) for token_id, logprob in event.token.top_logprobs]
        return (TokenLogprob(**chosen.model_dump(), top_logprobs=top),)


@dataclass
class RequestTiming:
    """What happened to one request, in trio time, for its log line and the metrics."""

    arrived: float
    deadline: float
    prompt_tokens: int | None = None
    first_token: float | None = None
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive tokens
    completion_tokens: int = 0
    finish_reason: str | None = None
    aborted: str | None = None  # "deadline" or "error" when serving ended it

    def token(self, now: float) -> None:
        self.completion_tokens += 1
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.gaps.append(now - self.last_token)
        self.last_token = now


@dataclass
class PreparedChat:
    """A validated chat request, ready to hand to the engine."""

    body: ChatCompletionRequest
    generation: GenerationRequest
    completion_id: str
    created: int
    model: str
    stops: list[str]
    timing: RequestTiming

    @property
    def request_id(self) -> str:
        return self.generation.request_id


class ChatService:
    """Chat completions on top of an engine.

    Args:
        engine: the engine serving the model.
        strict_model_name: refuse requests naming another model (404) instead of serving them anyway.
    """

    def __init__(self, engine: Engine, *, strict_model_name: bool = False) -> None:
        self.engine = engine
        self.strict_model_name = strict_model_name

    async def models(self) -> ModelList:
        runner = await self.engine.ensure_loaded()
        return ModelList(data=[ModelCard(id=runner.model_id, created=now())])

    async def prepare(
        self, body: ChatCompletionRequest, *, request_id: str | None = None, time_limit: float = 600.0
    ) -> PreparedChat:
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
        if self.strict_model_name and body.model not in (None, runner.model_id):
            raise ModelNotFound(f"The model `{body.model}` does not exist.", param="model")
        prompt_ids = runner.tokenizer.encode_chat([m.for_template() for m in body.messages])
        if body.truncate is not None:
            prompt_ids = prompt_ids[-body.truncate :]
        max_tokens = _resolve_max_tokens(runner, len(prompt_ids), body.requested_max_tokens())
        params = body.to_sampling_params(
            max_tokens=max_tokens, vocab_size=runner.vocab_size, logprobs=body.requested_logprobs()
        )
        completion_id = request_id or chat_completion_id()
        unknown = body.unknown_fields()
        if unknown:
            logger.info("request %s: ignoring fields this server does not know: %s", completion_id, ", ".join(unknown))
        return PreparedChat(
            body=body,
            generation=GenerationRequest(completion_id, tuple(prompt_ids), params),
            completion_id=completion_id,
            created=now(),
            model=runner.model_id,
            stops=body.stop_strings(),
            timing=RequestTiming(arrived=arrived, deadline=arrived + time_limit, prompt_tokens=len(prompt_ids)),
        )

    async def _next(self, prepared: PreparedChat, stream: TokenStream) -> TokenEvent | None:
        """The next token event, or None at the end.

        The deadline is applied to each wait, never across a ``yield``: a cancel scope must not stay open
        while an async generator is suspended, so the streaming path checks it here, token by token.

        Raises:
            DeadlineExceeded: the request's deadline passed while waiting.
        """
        timing = prepared.timing
        with trio.move_on_at(timing.deadline):
            try:
                event = await stream.__anext__()
            except StopAsyncIteration:
                return None
            except TrioserveError:
                timing.aborted = "error"
                raise
            timing.token(trio.current_time())
            return event
        timing.aborted = "deadline"
        raise DeadlineExceeded(
            f"the request took longer than its deadline ({timing.deadline - timing.arrived:g} s)",
        )

    def _assembler(self, prepared: PreparedChat) -> TextAssembler:
        runner = self.engine.runner
        assert runner is not None
        return TextAssembler(
            runner.tokenizer, prepared.generation.prompt_ids, prepared.stops, logprobs=prepared.body.logprobs
        )

    def _is_eos(self, event: TokenEvent) -> bool:
        runner = self.engine.runner
        assert runner is not None
        return event.token.token_id in runner.eos_token_ids and event.finish_reason is FinishReason.STOP

    async def complete(self, prepared: PreparedChat, stream: TokenStream) -> ChatCompletion:
        """Collects a whole completion; the stream is closed when it returns, whatever happens."""
        assembler = self._assembler(prepared)
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        finish: FinishReason | None = None
        async with stream:
            while (event := await self._next(prepared, stream)) is not None:
                piece = assembler.feed(event, eos=self._is_eos(event))
                parts.append(piece.text)
                logprobs.extend(piece.logprobs)
                if piece.finish_reason is not None:
                    finish = piece.finish_reason
                    break
            stream.close()  # a stop string ends it early: free the slot now, not after the response
        if finish is None:
            raise Unavailable("the request was cancelled by the server")
        prepared.timing.finish_reason = finish.value
        choice = ChatChoice(
            index=0,
            message=AssistantMessage(content="".join(parts)),
            logprobs=ChoiceLogprobs(content=logprobs) if prepared.body.logprobs else None,
            finish_reason=finish.value,
        )
        return ChatCompletion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.model,
            choices=[choice],
            usage=_usage(prepared, assembler),
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def stream(
        self, prepared: PreparedChat, stream: TokenStream
    ) -> AsyncGenerator[ChatCompletionChunk | TrioserveError, None]:
        """Yields the chunks of a streamed completion, or one error (after which the stream ends).

        The token stream is closed (its KV released) as soon as the last token is in, before the final
        chunks are yielded, and in any case when the generator is closed.
        """
        assembler = self._assembler(prepared)

        def chunk(
            delta: Delta, finish: FinishReason | None = None, logprobs: Sequence[TokenLogprob] = ()
        ) -> ChatCompletionChunk:
            choice = ChunkChoice(
                index=0,
                delta=delta,
                logprobs=ChoiceLogprobs(content=list(logprobs)) if prepared.body.logprobs and logprobs else None,
                finish_reason=finish.value if finish is not None else None,
            )
            return ChatCompletionChunk(
                id=prepared.completion_id,
                created=prepared.created,
                model=prepared.model,
                choices=[choice],
                system_fingerprint=SYSTEM_FINGERPRINT,
            )

        finish: FinishReason | None = None
        async with stream:
            yield chunk(Delta(role="assistant", content=""))
            try:
                while (event := await self._next(prepared, stream)) is not None:
                    piece = assembler.feed(event, eos=self._is_eos(event))
                    if piece.text or piece.logprobs:
                        yield chunk(Delta(content=piece.text), logprobs=piece.logprobs)
                    if piece.finish_reason is not None:
                        finish = piece.finish_reason
                        break
            except TrioserveError as error:
                yield error
                return
            stream.close()  # a stop string ends it early: free the slot before the last chunks go out
            if finish is None:
                yield Unavailable("the request was cancelled by the server")
                return
            prepared.timing.finish_reason = finish.value
            yield chunk(Delta(), finish)
            options = prepared.body.stream_options
            if options is not None and options.include_usage:
                yield ChatCompletionChunk(
                    id=prepared.completion_id,
                    created=prepared.created,
                    model=prepared.model,
                    choices=[],
                    usage=_usage(prepared, assembler),
                    system_fingerprint=SYSTEM_FINGERPRINT,
                )


def _usage(prepared: PreparedChat, assembler: TextAssembler) -> Usage:
    prompt = len(prepared.generation.prompt_ids)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=assembler.completion_tokens,
        total_tokens=prompt + assembler.completion_tokens,
    )


def _resolve_max_tokens(runner: Runner, prompt_tokens: int, requested: int | None) -> int:
    """The tokens the request may generate; OpenAI's wording when prompt plus request exceed the context."""
    room = runner.max_context - prompt_tokens
    if requested is None:
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {runner.max_context} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        return room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {runner.max_context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
        )
    return requested
