"""Legacy completions (``POST /v1/completions``): raw prompts, no chat template, the legacy shapes.

Shares everything but the shapes with chat (`serving.GenerationService`): admission, choices as separate
sequences, deadlines, stop strings, usage.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, aclosing

import trio

from trioserve.api.protocol import CompletionRequest
from trioserve.api.replies import Completion, CompletionChoice, CompletionLogprobs, TokenLogprob, completion_id, now
from trioserve.api.serving import (
    SYSTEM_FINGERPRINT,
    GenerationService,
    Prepared,
    RequestTiming,
    cache_scope,
    resolve_max_tokens,
    usage_of,
)
from trioserve.engine.engine import TokenStream
from trioserve.errors import InvalidRequest, TrioserveError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for legacy completions


class _LegacyLogprobs:
    """Converts one choice's logprobs to the legacy shape, keeping the text offset across calls."""

    def __init__(self, start_offset: int) -> None:
        self._offset = start_offset

    def add(self, entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        added = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry in entries:
            added.tokens.append(entry.token)
            added.token_logprobs.append(entry.logprob)
            added.top_logprobs.append({top.token: top.logprob for top in entry.top_logprobs})
            added.text_offset.append(self._offset)
            self._offset += len(entry.token)
        return added


class CompletionService(GenerationService):
    """Legacy completions on top of an engine."""

    async def prepare(
        self,
        body: CompletionRequest,
        *,
        request_id: str | None = None,
        time_limit: float = 600.0,
        tenant: str = "",
    ) -> Prepared:
        """Tokenizes every prompt, checks the context, builds one generation per prompt and choice.

        Raises:
            InvalidRequest: a token id outside the vocabulary, a prompt that does not fit the context, or a
                response_format schema that cannot be enforced.
            ModelNotFound: with ``strict_model_name``, the request named another model.
            Unavailable: the model failed to load.
        """
        arrived = trio.current_time()
        runner = await self.engine.ensure_loaded()
        self._check(body, body.model, runner)
        prompts: list[list[int]] = []
        for prompt in body.prompts():
            ids = runner.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else prompt
            if any(not 0 <= token < runner.vocab_size for token in ids):
                raise InvalidRequest("prompt has a token id outside the vocabulary", param="prompt")
            prompts.append(ids[-body.truncate :] if body.truncate is not None else ids)
        requested = body.max_tokens if body.max_tokens is not None else DEFAULT_MAX_TOKENS
        grammar = await self._grammar(body, runner)
        params = [
            body.to_sampling_params(
                max_tokens=resolve_max_tokens(runner, len(ids), requested, param="prompt"),
                vocab_size=runner.vocab_size,
                logprobs=body.logprobs,
                grammar=grammar,
            )
            for ids in prompts
        ]
        identifier = request_id or completion_id()
        return Prepared(
            body=body,
            generations=self._choices(identifier, prompts, params, body.n, cache_scope(tenant, body)),
            completion_id=identifier,
            created=now(),
            model=runner.model_id,
            stops=body.stop_strings(),
            timing=RequestTiming(arrived, arrived + time_limit, prompt_tokens=sum(len(ids) for ids in prompts)),
            logprobs=body.logprobs is not None,
        )

    def _echo(self, prepared: Prepared, index: int) -> str:
        body = prepared.body
        assert isinstance(body, CompletionRequest)
        if not body.echo:
            return ""
        runner = self.engine.runner
        assert runner is not None
        return runner.tokenizer.decode(prepared.generations[index].prompt_ids)

    def _completion(self, prepared: Prepared, choices: list[CompletionChoice], *, usage: bool) -> Completion:
        return Completion(
            id=prepared.completion_id,
            created=prepared.created,
            model=prepared.model,
            choices=choices,
            usage=usage_of(prepared) if usage else None,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )

    async def complete(self, prepared: Prepared, streams: Sequence[TokenStream]) -> Completion:
        """Collects every choice; every stream is closed when it returns."""
        choices = []
        for index, choice in enumerate(await self._collect(prepared, streams)):
            echo = self._echo(prepared, index)
            logprobs = _LegacyLogprobs(len(echo)).add(choice.logprobs) if prepared.logprobs else None
            finish = choice.finish.value if choice.finish is not None else None
            choices.append(
                CompletionChoice(text=echo + choice.text, index=index, logprobs=logprobs, finish_reason=finish)
            )
        return self._completion(prepared, choices, usage=True)

    async def stream(
        self, prepared: Prepared, streams: Sequence[TokenStream]
    ) -> AsyncGenerator[Completion | TrioserveError, None]:
        """Yields text_completion chunks (echoed prompts first), then a usage chunk if asked for."""
        body = prepared.body
        logprobs = [_LegacyLogprobs(len(self._echo(prepared, index))) for index in range(len(streams))]
        async with AsyncExitStack() as owned:
            for stream in streams:
                await owned.enter_async_context(stream)
            for index in range(len(streams)):
                echo = self._echo(prepared, index)
                if echo:
                    yield self._completion(prepared, [CompletionChoice(text=echo, index=index)], usage=False)
            try:
                async with aclosing(self._pieces(prepared, streams)) as pieces:
                    async for index, piece in pieces:
                        added = logprobs[index].add(piece.logprobs)
                        reason = piece.finish_reason.value if piece.finish_reason is not None else None
                        choice = CompletionChoice(
                            text=piece.text,
                            index=index,
                            logprobs=added if prepared.logprobs else None,
                            finish_reason=reason,
                        )
                        yield self._completion(prepared, [choice], usage=False)
            except TrioserveError as error:
                yield error
                return
            if body.stream_options is not None and body.stream_options.include_usage:
                yield self._completion(prepared, [], usage=True)
