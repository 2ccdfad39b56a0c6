"""Between the wire models and the engine: prompts in, OpenAI-shaped completions and chunks out. No HTTP.

`GenerationService` holds what chat and legacy completions share. `prepare` does everything that can fail
on bad input (tokenizing, context checks, parameter conversion) before anything is admitted; `complete`
and `stream` then only consume the engine's tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field

import trio

from trioserve.api.protocol import _SamplingFields
from trioserve.api.replies import ModelCard, ModelList, PromptTokensDetails, TokenLogprob, TopLogprob, Usage, now
from trioserve.engine.engine import Engine, TokenStream
from trioserve.errors import (
    ContextLengthExceeded,
    DeadlineExceeded,
    ModelNotFound,
    TrioserveError,
    Unavailable,
)
from trioserve.text.tokenization import StopMatcher
from trioserve.types import (
    FinishReason,
    GenerationRequest,
    ImageInputs,
    Runner,
    SamplingParams,
    TokenEvent,
    Tokenizer,
)

logger = logging.getLogger(__name__)
MAX_REPORTED_UNKNOWN = 256  # distinct unknown request field names logged (once each) per process

SYSTEM_FINGERPRINT = "trioserve-0.1"
# Tokens one chunk carries at most when a stream has fallen behind: a slow client's backlog (up to
# --max-unread-tokens, ~2 KB a token with 20 top logprobs) goes out in bounded chunks, so a cut (the drain,
# a deadline) is sent after at most one of them, the rest dropped, rather than after the whole backlog.
MAX_TOKENS_PER_EVENT = 16


@dataclass(frozen=True, slots=True)
class Piece:
    """Text made certain by one or more token events taken together, and the finish reason if the sequence
    ended there. ``logprobs`` has one entry per token (when asked for); ``tokens`` counts them."""

    text: str
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: int = 1


class TextAssembler:
    """Turns a sequence's token events into text pieces: detokenizes, applies stop strings, counts tokens."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str], *, logprobs: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer(prompt_ids)
        self._stops = StopMatcher(stops)
        self._logprobs = logprobs

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the sequence, if one did."""
        return self._stops.matched

    def feed(self, event: TokenEvent, *, eos: bool) -> Piece:
        """Takes the next event; ``eos`` says its token is an end-of-sequence token (never shown)."""
        text = "" if eos else self._detokenizer.push(event.token.token_id)
        if event.finish_reason is not None:
            text += self._detokenizer.flush()
        shown, stopped = self._stops.push(text)
        finish = FinishReason.STOP if stopped else event.finish_reason
        if finish is not None and not stopped:
            shown += self._stops.flush()
        logprobs = self._token_logprob(event) if self._logprobs else ()
        return Piece(shown, finish, logprobs)

    def feed_all(self, events: Sequence[TokenEvent], is_eos: Callable[[TokenEvent], bool]) -> Piece:
        """Takes events that arrived together as one piece: what feeding them one by one and joining the
        pieces would give. Stops at the first that finishes the sequence (a stop string completed inside
        the batch): the events after it are not consumed, and ``tokens`` says how many were."""
        if len(events) == 1:
            return self.feed(events[0], eos=is_eos(events[0]))
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        finish: FinishReason | None = None
        consumed = 0
        for event in events:
            piece = self.feed(event, eos=is_eos(event))
            consumed += 1
            texts.append(piece.text)
            logprobs.extend(piece.logprobs)
            if piece.finish_reason is not None:
                finish = piece.finish_reason
                break
        return Piece("".join(texts), finish, tuple(logprobs), consumed)

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
    cached_tokens: int = 0  # of those, the ones whose KV came from the prefix cache
    first_token: float | None = None
    last_token: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive tokens
    completion_tokens: int = 0
    finish_reason: str | None = None
    aborted: str | None = None  # "deadline" or "error" when serving ended it

    def tokens(self, now: float, count: int) -> None:
        """``count`` tokens taken at ``now``. When several come at once, the time since the previous
        delivery is shared evenly among them (so the gaps still sum to the decode time and number one per
        token after the first delivery)."""
        self.completion_tokens += count
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            gap = (now - self.last_token) / count
            self.gaps.extend([gap] * count)
        self.last_token = now


@dataclass
class Prepared:
    """A validated request, ready to hand to the engine: one generation per choice."""

    body: _SamplingFields
    generations: tuple[GenerationRequest, ...]  # choice i is generations[i]
    completion_id: str
    created: int
    model: str
    stops: list[str]
    timing: RequestTiming
    logprobs: bool = False  # build logprob entries for every token
    matched_stops: dict[int, str] = field(default_factory=dict)  # choice -> the stop string that ended it

    @property
    def generation(self) -> GenerationRequest:
        return self.generations[0]

    @property
    def request_id(self) -> str:
        return self.completion_id


@dataclass
class Collected:
    """One choice of a non-streamed response, once its sequence has finished."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class GenerationService:
    """What chat and legacy completions share: model checks, choices, token waits, text assembly.

    Args:
        engine: the engine serving the model.
        strict_model_name: refuse requests naming another model (404) instead of serving them anyway.
    """

    def __init__(self, engine: Engine, *, strict_model_name: bool = False) -> None:
        self.engine = engine
        self.strict_model_name = strict_model_name
        self._reported_unknown: set[str] = set()
        self._reported_unforced_tools = False

    async def models(self) -> ModelList:
        runner = await self.engine.ensure_loaded()
        return ModelList(data=[ModelCard(id=runner.model_id, created=now())])

    def _check(self, body: _SamplingFields, model: str | None, runner: Runner) -> None:
        """The model name (with ``strict_model_name``), and unknown fields (logged once per name).

        Raises:
            ModelNotFound: with ``strict_model_name``, the request named another model.
        """
        if self.strict_model_name and model not in (None, runner.model_id):
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        if len(self._reported_unknown) >= MAX_REPORTED_UNKNOWN:
            return  # names are client-chosen: remembering every one would let clients grow memory forever
        unknown = [name for name in body.unknown_fields() if name not in self._reported_unknown]
        if unknown:
            # Once per field name: clients that always send an extra field should not flood the log.
            unknown = unknown[: MAX_REPORTED_UNKNOWN - len(self._reported_unknown)]
            self._reported_unknown.update(unknown)
            logger.warning("ignoring request fields this server does not know: %s", ", ".join(unknown))
            if len(self._reported_unknown) >= MAX_REPORTED_UNKNOWN:
                logger.warning("%d unknown field names reported; further ones are not logged", MAX_REPORTED_UNKNOWN)

    @staticmethod
    async def _grammar(body: _SamplingFields, runner: Runner) -> str | None:
        """The grammar enforcing ``response_format`` or a forced tool call (None for free text). A large schema
        takes milliseconds to compile (14 ms for 42 kB here), so it is compiled in a worker thread, not on
        the event loop.

        Raises:
            InvalidRequest: the schema is invalid or cannot be enforced, or this model cannot take grammars.
        """
        spec = body.output_schema()
        if spec is None:
            return None
        return await trio.to_thread.run_sync(runner.compile_grammar, spec)

    @staticmethod
    def _choices(
        completion_id: str,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        n: int,
        scope: str = "",
        *,
        images: ImageInputs | None = None,
    ) -> tuple[GenerationRequest, ...]:
        """Choice ``p * n + i`` is the ``i``-th sample for prompt ``p``, each its own sequence. With a seed,
        sample ``i`` uses ``seed + i``: the choices differ and stay reproducible."""
        generations = []
        for p, (prompt, base) in enumerate(zip(prompts, params, strict=True)):
            for i in range(n):
                index = p * n + i
                seed = base.seed + i if base.seed is not None else None
                request_id = completion_id if index == 0 else f"{completion_id}-{index}"
                sampling = dataclasses.replace(base, seed=seed)
                generations.append(
                    GenerationRequest(request_id, tuple(prompt), sampling, cache_scope=scope, images=images)
                )
        return tuple(generations)

    async def _next(self, prepared: Prepared, stream: TokenStream) -> list[TokenEvent]:
        """The next token events: every event waiting, at least one; an empty list at the end.

        While the event loop is behind (`Engine.behind`: the streams' own work delays the step loop), a
        stream past its first token waits for two, so each chunk carries at least two tokens and the
        per-chunk work (serialization, the HTTP send) is halved when it is what holds everything back.

        The deadline is applied to each wait, never across a ``yield``: a cancel scope must not stay open
        while an async generator is suspended, so the streaming path checks it here, wait by wait. Events
        already taken when the deadline passes are returned first. Tokens are counted in the request's
        timing by the caller, as they are consumed.

        Raises:
            DeadlineExceeded: the request's deadline passed while waiting.
        """
        timing = prepared.timing
        at_least = 2 if timing.first_token is not None and self.engine.behind else 1
        with trio.move_on_at(timing.deadline):
            try:
                return await stream.receive_ready(at_least, MAX_TOKENS_PER_EVENT)
            except TrioserveError:
                timing.aborted = "error"
                raise
        events = stream.take_received()
        if events:
            return events  # taken before the deadline passed; the next wait raises at once
        timing.aborted = "deadline"
        raise DeadlineExceeded(
            f"the request took longer than its deadline ({timing.deadline - timing.arrived:g} s)",
        )

    def _assembler(self, prepared: Prepared, index: int) -> TextAssembler:
        runner = self.engine.runner
        assert runner is not None
        prompt_ids = prepared.generations[index].prompt_ids
        return TextAssembler(runner.tokenizer, prompt_ids, prepared.stops, logprobs=prepared.logprobs)

    def _is_eos(self, event: TokenEvent) -> bool:
        runner = self.engine.runner
        assert runner is not None
        return event.token.token_id in runner.eos_token_ids and event.finish_reason is FinishReason.STOP

    async def _pieces(
        self, prepared: Prepared, streams: Sequence[TokenStream]
    ) -> AsyncGenerator[tuple[int, Piece], None]:
        """Text pieces of every choice, as (index, piece), taking the choices in turn. A piece carries every
        token that was waiting for its choice (at least one), so a consumer that fell behind catches up in
        one chunk rather than one chunk per token.

        Every running sequence gets a token each step, so waiting on one choice's stream never starves the
        others (their tokens wait in their buffers). Each stream is closed as soon as its choice finishes
        (a stop string ends it early: its slot is freed before the response goes out).

        Raises:
            DeadlineExceeded, GenerationFailed: as `_next`.
            Unavailable: the server closed a stream (shutdown).
        """
        assemblers = [self._assembler(prepared, index) for index in range(len(streams))]
        active = list(range(len(streams)))
        timing = prepared.timing
        counted: set[int] = set()
        while active:
            for index in list(active):
                events = await self._next(prepared, streams[index])
                if not events:
                    raise Unavailable("the request was cancelled by the server")
                if index % prepared.body.n == 0 and index not in counted:
                    # A prompt's first choice: what its prefill took from the cache (the prompt counts once).
                    counted.add(index)
                    timing.cached_tokens += streams[index].cached_tokens
                piece = assemblers[index].feed_all(events, self._is_eos)
                timing.tokens(trio.current_time(), piece.tokens)
                if piece.finish_reason is not None:
                    streams[index].close()
                    active.remove(index)
                    if (stop := assemblers[index].matched_stop) is not None:
                        prepared.matched_stops[index] = stop
                yield index, piece

    async def _collect(self, prepared: Prepared, streams: Sequence[TokenStream]) -> list[Collected]:
        """Every choice's text, logprobs and finish reason; every stream is closed when it returns."""
        collected = [Collected() for _ in streams]
        async with AsyncExitStack() as owned:
            for stream in streams:
                await owned.enter_async_context(stream)
            async with aclosing(self._pieces(prepared, streams)) as pieces:
                async for index, piece in pieces:
                    choice = collected[index]
                    choice.parts.append(piece.text)
                    choice.logprobs.extend(piece.logprobs)
                    choice.finish = piece.finish_reason or choice.finish
        prepared.timing.finish_reason = ",".join(c.finish.value for c in collected if c.finish is not None)
        return collected


def cache_scope(tenant: str, body: _SamplingFields) -> str:
    """Who may share a request's prefix-cache entries: one tenant (API key) and one ``cache_salt``."""
    return f"{tenant}\x00{body.cache_salt or ''}"


def usage_of(prepared: Prepared) -> Usage:
    """Each prompt's tokens once (its choices share it), and the completion tokens of every choice."""
    prompt = prepared.timing.prompt_tokens or 0
    completion = prepared.timing.completion_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=prepared.timing.cached_tokens),
    )


def resolve_max_tokens(runner: Runner, prompt_tokens: int, requested: int | None, param: str = "messages") -> int:
    """The tokens the request may generate; OpenAI's wording when prompt plus request exceed the context."""
    room = runner.max_context - prompt_tokens
    if requested is None:
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {runner.max_context} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param=param,
            )
        return room
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {runner.max_context} tokens. However, you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the messages, {requested} in the "
            "completion). Please reduce the length of the messages or completion.",
            param=param,
        )
    return requested
