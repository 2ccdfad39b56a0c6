"""Internal messages between the layers: frozen dataclasses, and the `Runner` Protocol the engine drives.

Nothing here imports torch, transformers or trio, so both sides of the seam can be faked in tests.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class FinishReason(enum.Enum):
    """Why a sequence stopped producing tokens. The values are OpenAI's ``finish_reason`` strings."""

    STOP = "stop"  # an EOS token or a stop string
    LENGTH = "length"  # max_tokens reached, or the model's context is full


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. Defaults are OpenAI's."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # Hugging Face semantics: >1 discourages tokens already seen
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    grammar: str | None = None  # an llguidance grammar the output must match (``response_format``)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class Marker:
    """Fixed text that structures a model's output, such as ``<tool_call>`` or ``</think>``.

    ``token_id``: the tokenizer has it as one added token. Grammars must then name it as that token:
    llguidance never spells an added token out of text bytes, nor lets text produce it.
    """

    text: str
    token_id: int | None = None


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a model family writes tool calls; the presets and the parser are in `trioserve.text.toolparsers`.

    Each call is the JSON object ``{"name": ..., <arguments_key>: ...}``. ``open``/``close`` wrap each call
    (``each``: Hermes' ``<tool_call>``) or all of them once (Mistral's ``[TOOL_CALLS]``); ``padding`` goes
    inside each wrapper, ``separator`` between calls; ``array``: the calls form one JSON array; ``at_start``:
    calls can only open the answer (no text before them). ``name_marker``: the call is not one object but
    the tool's name, this marker, then the arguments' JSON object (Mistral's ``name[ARGS]{...}``).
    """

    name: str
    open: Marker | None = None
    close: Marker | None = None
    each: bool = True
    padding: str = ""
    separator: str = ""
    array: bool = False
    at_start: bool = False
    arguments_key: str = "arguments"
    name_marker: Marker | None = None


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool a call may name; ``param`` is the request field errors about its schema name."""

    name: str
    parameters: Mapping[str, Any]
    strict: bool = False
    param: str = "tools"


@dataclass(frozen=True, slots=True)
class Thinking:
    """A thinking block (``<think>...</think>``) the output starts with; ``opened``: the prompt already opened
    it, so the output starts inside it (otherwise the model may open one itself)."""

    open: Marker
    close: Marker
    opened: bool = False


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """What the output must look like, as plain data; the runner compiles it (`Runner.compile_grammar`).

    ``schema``: a JSON schema the answer must match (a JSON ``response_format``, or a bare forced call when
    the model has no call syntax); ``regex``, ``choice``, ``grammar`` (Lark, or GBNF as llama.cpp writes
    it): what the answer must match otherwise (vLLM's ``structured_outputs``); all None: free text.
    ``tools`` with ``calls``: the answer may (``required``:
    must) be calls in that syntax, each naming one of the tools with arguments matching its parameters;
    ``parallel``: more than one. ``thinking``: a thinking block comes first, unconstrained. ``param`` is the
    request field that errors about ``schema`` name.
    """

    schema: Mapping[str, Any] | None = None
    strict: bool = False  # keywords that cannot be enforced are an error rather than ignored
    param: str = "response_format"
    tools: tuple[ToolSpec, ...] = ()
    calls: CallSyntax | None = None
    required: bool = False
    parallel: bool = True
    thinking: Thinking | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    @property
    def free_answer(self) -> bool:
        """Whether the answer (after any thinking, when no call is made) is free text."""
        return self.schema is None and self.regex is None and self.choice is None and self.grammar is None


@dataclass(frozen=True, slots=True, eq=False)
class ImageInputs:
    """What a vision-language model's processor made of a prompt's images, for the runner's first prefill.

    ``features``: the processor's outputs besides the token ids (``pixel_values``, ``image_grid_thw``...),
    opaque to every layer but the model's (torch tensors). ``digests``: a content hash of each image, in
    prompt order. ``spans``: ``(start, end)`` of each image's tokens in the prompt ids: no prefill chunk ends
    inside one, and the prefix cache keys those tokens by the image's digest (two prompts that differ only
    in an image never share KV).
    """

    features: Mapping[str, Any]
    digests: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: prompt token ids after the chat template, and how to sample."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    # Who may share this prompt's cached KV: requests of one tenant (API key) and one `cache_salt` only.
    cache_scope: str = ""
    # The prompt's images (vision-language models only): None for a text-only prompt.
    images: ImageInputs | None = None


@dataclass(frozen=True, slots=True)
class SampledToken:
    """What a forward pass produced for one sequence."""

    token_id: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token handed to the request that owns the sequence; ``finish_reason`` is set on the last one."""

    token: SampledToken
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Part of a prompt to run through the model: ``prompt_ids[start:end]`` of ``request``.

    The runner creates the sequence's state at ``start == 0`` and samples its first token once it holds
    the whole prompt. With a prefix-cache hit, the first chunk begins where the hit ends and covers as many
    new tokens as ``end - start`` (so it may reach the prompt's end early); `StepOutput.prefilled` says how
    far it got.
    """

    seq_id: int
    request: GenerationRequest
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.request.prompt_ids)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One trip to the device: a prefill pass, then one decode pass over ``decode``.

    ``prefill`` is one chunk of one prompt, or several whole prompts prefilled together in one forward pass.
    ``decode`` lists every sequence that has finished prefill and is still live (batched mode), or one of
    them (one-request-per-pass mode).
    """

    prefill: tuple[PrefillChunk, ...] = ()
    decode: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.prefill) or bool(self.decode)

    def seq_ids(self) -> tuple[int, ...]:
        return tuple(chunk.seq_id for chunk in self.prefill) + self.decode


@dataclass(frozen=True, slots=True)
class StepOutput:
    """Tokens produced by a step, by sequence id (prefills that have not reached their end produce none).

    ``prefilled``: for the step's prefill chunks, the prompt tokens the sequence now holds, where that is
    not the chunk's end (a prefix-cache hit let the runner start past ``start``). ``cached``: for sequences
    whose first chunk ran, how many prompt tokens came from the prefix cache.
    """

    tokens: Mapping[int, SampledToken]
    prefilled: Mapping[int, int] = field(default_factory=dict)
    cached: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """The prefix cache's counters (since load) and what it retains now, for the metrics."""

    queried_tokens: int
    hit_tokens: int
    evictions: int
    retained_entries: int
    retained_tokens: int


@dataclass(frozen=True, slots=True)
class TensorParallelStats:
    """A tensor-parallel runner's group, for the metrics (its ``tensor_parallel_stats()``; other runners have none).

    ``live_by_rank`` is each rank's count of sequences holding KV as of the last message rank 0 sent (a step or
    an idle heartbeat); the seconds are rank 0's time in the message broadcast and in the counts' all-gather.
    """

    live_by_rank: tuple[int, ...]
    messages: int
    broadcast_seconds: float
    gather_seconds: float


class Runner(Protocol):
    """The synchronous model side. The engine calls ``step`` in a worker thread and every other method on
    the event loop, never both at once, so implementations need no locks.
    """

    @property
    def model_id(self) -> str: ...

    @property
    def max_context(self) -> int:
        """Prompt plus generated tokens a sequence may hold."""
        ...

    @property
    def max_batch_size(self) -> int:
        """How many sequences one decode pass can carry (1: the model cannot be batched)."""
        ...

    @property
    def prefill_whole(self) -> bool:
        """Prompts must go through the model in one forward pass (chunks would be inexact)."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def compile_grammar(self, spec: OutputSchema) -> str:
        """The grammar enforcing ``spec`` for this model (for `SamplingParams.grammar`). Changes no runner
        state, so serving calls it from a worker thread, even while a step runs.

        Raises:
            InvalidRequest: the schema cannot be enforced, or this model cannot take grammars.
        """
        ...

    def step(self, plan: StepPlan) -> StepOutput:
        """Runs one forward pass (plus a prefill chunk); called from a worker thread."""
        ...

    def release(self, seq_id: int) -> None:
        """Forgets a sequence. Cheap, on the event loop: the sequence's own cache is dropped at once and its
        rows in a shared batch are compacted away at the start of the next ``step``, before its forward pass.
        Unknown ids are ignored.
        """
        ...

    def live_sequences(self) -> int:
        """Sequences whose KV the runner still holds (released rows awaiting compaction not counted)."""
        ...

    def kv_tokens(self) -> int:
        """Token positions held in KV caches, padding included (what the memory holds)."""
        ...

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's statistics; None when the runner keeps none."""
        ...


class Detokenizer(Protocol):
    """Token ids in, text deltas out, never splitting a UTF-8 character."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Tokenizer(Protocol):
    """What serving needs of a tokenizer; satisfied by `tokenization.ChatTokenizer`."""

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]: ...

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str: ...

    @property
    def chat_template(self) -> str: ...

    def token_id(self, text: str) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer: ...

    @property
    def takes_images(self) -> bool:
        """Whether the model is a vision-language one (`encode_images` works)."""
        ...

    def encode_images(self, prompt: str, images: Sequence[Any]) -> tuple[list[int], ImageInputs]:
        """A rendered prompt whose image placeholders (from ``{"type": "image"}`` content parts in the messages
        given to `render_chat`) stand for ``images`` (decoded ``PIL.Image.Image``s, in order), tokenized
        with each placeholder expanded to the image's tokens, and the images preprocessed. CPU-heavy: serving
        calls it in a worker thread.

        Raises:
            InvalidRequest: the model takes no images, or the images do not match the placeholders.
        """
        ...
