"""Constrained decoding for ``response_format``: JSON schemas compiled to grammars by llguidance.

Two halves, on two sides of the engine:

- `json_grammar` runs before admission (serving asks the runner's ``compile_grammar``, in a worker thread):
  it turns a schema into an llguidance grammar and checks it, so a bad schema is a 400 and never reaches
  the model.
- `Guide` runs in the runner's worker thread: one matcher per sequence, asked to fill its row of the
  batch's bitmask of tokens allowed next before each sample, and advanced by the sampled token.

The token table llguidance needs is built once per model (`GuideFactory.prepare`, at load).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher

from trioserve.errors import InvalidRequest

logger = logging.getLogger(__name__)

# Whitespace between JSON tokens: any kind, but at most 64 characters in a row. Pretty-printed output fits
# (indentation included); what it stops is the known failure of JSON modes where a model, allowed any
# whitespace, emits newlines until max_tokens. A schema's own "x-guidance" options override this.
JSON_DEFAULTS: llguidance._lib.JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,64}"}


def json_grammar(schema: dict[str, Any], *, strict: bool = False, param: str = "response_format") -> str:
    """An llguidance grammar for JSON text matching ``schema`` (a JSON Schema, draft 2020-12).

    Args:
        schema: the schema; ``{"type": "object"}`` for JSON mode.
        strict: refuse keywords the compiler does not implement, instead of ignoring them.
        param: the request field to name in errors.

    Raises:
        InvalidRequest: the schema is not valid, or uses something the compiler cannot enforce.
    """
    try:
        grammar = LLMatcher.grammar_from_json_schema(
            json.dumps(closed(schema)), defaults=JSON_DEFAULTS, overrides={"lenient": not strict}
        )
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    except BaseException as exc:
        if not isinstance(exc, ValueError | TypeError) and not _is_panic(exc):
            raise
        raise InvalidRequest(f"Invalid schema for {param}: {exc}", param=param) from exc
    if is_error:
        raise InvalidRequest(f"Invalid schema for {param}: {messages[0]}", param=param)
    if messages:
        logger.warning("%s: schema enforced in part: %s", param, "; ".join(messages))
    return grammar


JSON_VALUES = frozenset({"const", "enum", "default", "examples"})  # keywords whose values are JSON, not schemas
# Keywords whose values map names to schemas.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "dependentSchemas", "$defs", "definitions"})


# Keywords after which an object's other properties are the schema's own business, not ours to close.
_OPEN_ENDED = frozenset(
    {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "$ref"}
    | {"if", "dependentSchemas", "not"}
)


def closed(schema: Any) -> Any:
    """``schema`` with every object that lists its ``properties`` closed to other keys (as if it said
    ``"additionalProperties": false``), unless it says what other keys may be or combines schemas.

    JSON Schema leaves an object open by default, and a grammar that follows it lets a model append keys of
    its own invention after the ones asked for: a tool called with arguments its function does not take, an
    answer the caller's model class rejects. OpenAI's strict mode requires the keyword on every object;
    vLLM's default grammar backend (xgrammar, ``strict_mode``) closes objects the same way. A schema that
    wants extra keys says so: ``"additionalProperties": true``. The members of an ``allOf`` stay open (each
    sees only some of the properties), and so do the definitions they refer to.
    """
    shared = _all_of_refs(schema, set())
    return _close(schema, shared, "#")


def _close(node: Any, shared: set[str], path: str, *, top_open: bool = False) -> Any:
    if isinstance(node, list):
        return [_close(item, shared, f"{path}/{i}") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    moved: dict[str, Any] = {}
    for key, value in node.items():
        here = f"{path}/{key}"
        if key in JSON_VALUES or not isinstance(value, dict | list):
            moved[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            moved[key] = {
                name: sub if f"{here}/{name}" in shared else _close(sub, shared, f"{here}/{name}")
                for name, sub in value.items()
            }
        elif key == "allOf" and isinstance(value, list) and len(value) > 1:
            moved[key] = [_close(item, shared, f"{here}/{i}", top_open=True) for i, item in enumerate(value)]
        else:
            moved[key] = _close(value, shared, here)
    if not top_open and isinstance(node.get("properties"), dict) and not _OPEN_ENDED & node.keys():
        moved["additionalProperties"] = False
    return moved


def _all_of_refs(node: Any, found: set[str]) -> set[str]:
    """The local references that are members of an ``allOf`` of several schemas."""
    if isinstance(node, list):
        for item in node:
            _all_of_refs(item, found)
    elif isinstance(node, dict):
        members = node.get("allOf")
        if isinstance(members, list) and len(members) > 1:
            found.update(m["$ref"] for m in members if isinstance(m, dict) and isinstance(m.get("$ref"), str))
        for key, value in node.items():
            if key not in JSON_VALUES:
                _all_of_refs(value, found)
    return found


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic inside llguidance: pyo3 raises it as ``pyo3_runtime.PanicException``, a BaseException
    (seen with some malformed schemas, in error-message formatting). It is the request's fault, not the
    server's, and must not unwind further than an ordinary error would."""
    return type(exc).__name__ == "PanicException"


class Guide:
    """One sequence's matcher: which tokens may come next, advanced by each token sampled.

    If the matcher fails (it should not: sampling only picks allowed tokens), the guide allows only EOS
    from then on, so the sequence ends instead of producing text the grammar cannot account for; the
    failure is logged.
    """

    def __init__(self, matcher: LLMatcher | None, eos_token_id: int) -> None:
        self._matcher: LLMatcher | None = matcher
        self._eos_token_id = eos_token_id
        self._buffer: torch.Tensor | None = None  # the matcher's mask, sized on first use (`_mask`)
        self._check()

    @property
    def failed(self) -> bool:
        return self._matcher is None

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the tokens allowed next into ``bitmask[row]``: an int32 tensor on the CPU in llguidance's
        layout (token *i* at bit ``i % 32`` of word ``i // 32``), as wide as the model's vocabulary; once the
        value is complete, or the matcher failed, only EOS."""
        if self._matcher is not None:
            try:
                mask = self._mask()
                # Widths differ when the tokenizer has more tokens than the model's vocabulary: those
                # cannot be sampled, so they are cut off.
                width = min(mask.numel(), bitmask.shape[1])
                bitmask[row, :width] = mask[:width]
                bitmask[row, width:] = 0
            except BaseException as exc:
                self._fail(exc)
            else:
                if self._check():
                    return
        bitmask[row] = 0
        word, bit = divmod(self._eos_token_id, 32)
        if word < bitmask.shape[1]:
            bitmask[row, word] = (1 << bit) - (1 << 32 if bit == 31 else 0)  # an int32 bit pattern

    def advance(self, token_id: int) -> None:
        if self._matcher is None:
            return
        try:
            self._matcher.consume_token(token_id)
        except BaseException as exc:
            self._fail(exc)
        else:
            self._check()

    def _mask(self) -> torch.Tensor:
        """The matcher's next mask in this guide's own buffer (int32 words), filled the way
        ``llguidance.torch.fill_next_token_bitmask`` does, without importing that module (it compiles a
        kernel with ``torch.compile`` at import, pulling in inductor).

        llguidance checks the buffer's size without saying it: ``ceil(n / 32)`` words for its ``n``
        tokens, while ``compute_bitmask`` returns ``n // 32 + 1`` (one word more when 32 divides ``n``,
        as in most real vocabularies), so the first call finds out which."""
        assert self._matcher is not None
        if self._buffer is not None:
            self._matcher.unsafe_compute_mask_ptr(self._buffer.data_ptr(), self._buffer.numel() * 4)
            return self._buffer
        whole = len(self._matcher.compute_bitmask()) // 4
        for words in (whole - 1, whole):
            buffer = torch.zeros(words, dtype=torch.int32)
            try:
                self._matcher.unsafe_compute_mask_ptr(buffer.data_ptr(), words * 4)
            except ValueError:  # "Invalid buffer size"
                continue
            self._buffer = buffer
            return buffer
        raise RuntimeError(f"llguidance takes no mask of {whole - 1} or {whole} words")

    def _check(self) -> bool:
        if self._matcher is not None and self._matcher.is_error():
            logger.error("constrained decoding stopped the sequence: %s", self._matcher.get_error())
            self._matcher = None
        return self._matcher is not None

    def _fail(self, exc: BaseException) -> None:
        if not _is_panic(exc):
            raise exc
        logger.error("constrained decoding stopped the sequence: llguidance panicked: %s", exc)
        self._matcher = None


class GuideFactory:
    """Builds `Guide`s for one model's tokenizer.

    llguidance's token table is built once (`prepare`, or on first use). Building a matcher for a large
    schema takes tens of milliseconds (34 ms for a 42 kB schema here) while copying one takes microseconds,
    so the factory keeps a fresh matcher per recent grammar and hands out copies: the choices of ``n`` and
    clients that send the same schema every time pay for it once.
    """

    TEMPLATES = 32

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._table: llguidance.LLTokenizer | None = None
        self._unavailable: str | None = None
        self._templates: OrderedDict[str, LLMatcher] = OrderedDict()

    def prepare(self) -> None:
        """Builds the token table now (about 0.1 s for a 16k vocabulary here; more for larger ones). A
        tokenizer llguidance cannot read (it needs a fast, `tokenizers`-backed one) leaves constrained
        decoding unavailable, with the reason in `unavailable`, rather than failing the model's load."""
        if self._table is not None or self._unavailable is not None:
            return
        size = max(self._vocab_size, len(self._hf_tokenizer))
        try:
            self._table = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=size, eos_token=self._eos_token_ids or None
            )
        except BaseException as exc:
            if not isinstance(exc, Exception) and not _is_panic(exc):
                raise
            self._unavailable = f"llguidance cannot read this model's tokenizer ({exc})"
            logger.warning("response_format JSON modes are unavailable: %s", self._unavailable)

    @property
    def unavailable(self) -> str | None:
        """Why grammars cannot be enforced for this model, or None when they can."""
        self.prepare()
        return self._unavailable

    def guide(self, grammar: str) -> Guide:
        """A fresh matcher for ``grammar`` (one from `json_grammar`), in its initial state. Runs in the
        worker thread; llguidance releases the GIL while it builds a grammar."""
        self.prepare()
        if self._table is None:
            raise RuntimeError(f"constrained decoding is unavailable: {self._unavailable}")
        template = self._templates.pop(grammar, None)
        if template is None:
            try:
                template = LLMatcher(self._table, grammar, log_level=0)
            except BaseException as exc:
                if not _is_panic(exc):
                    raise
                logger.error("constrained decoding could not start: llguidance panicked: %s", exc)
                return Guide(None, self._table.eos_token)
            if template.is_error():  # a grammar this tokenizer cannot serve: not worth keeping
                return Guide(template, self._table.eos_token)
        self._templates[grammar] = template  # most recently used last
        while len(self._templates) > self.TEMPLATES:
            self._templates.popitem(last=False)
        return Guide(template.deep_copy(), self._table.eos_token)
