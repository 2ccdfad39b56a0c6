"""Constrained decoding below the HTTP layer: schema compilation errors, the mask, how it meets the other
sampling rules (min_tokens, a failed matcher), and models whose tokenizer llguidance cannot read."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
import trio
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

from tests.fakes import FakeRunner
from tests.strategies import SCHEMA_KEYWORDS, schemas, typed_documents
from trioserve.api.chat import ChatService
from trioserve.api.protocol import ChatCompletionRequest
from trioserve.engine.engine import Engine
from trioserve.errors import InvalidRequest
from trioserve.model.logits import unpack_bitmask
from trioserve.model.sampling import SequenceSampler, sample_rows
from trioserve.text.guided import Guide, GuideFactory, closed, json_grammar
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import SamplingParams

CPU = torch.device("cpu")


@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=12), st.integers(0, 400))
def test_unpack_bitmask_reads_llguidance_layout(words: list[int], size: int) -> None:
    expected = [i < len(words) * 32 and bool(words[i // 32] >> (i % 32) & 1) for i in range(size)]
    bitmask = torch.tensor([words, words[::-1]], dtype=torch.int32)
    unpacked = unpack_bitmask(bitmask, size)
    assert unpacked[0].tolist() == expected
    assert unpacked[1].tolist() == [
        i < len(words) * 32 and bool(words[::-1][i // 32] >> (i % 32) & 1) for i in range(size)
    ]


def allowed(guide: Guide, vocab: int) -> list[int]:
    """The tokens ``guide`` allows next, read through a batch bitmask as sampling does (in row 1 of 3)."""
    bitmask = torch.full((3, (vocab + 31) // 32), -1, dtype=torch.int32)
    guide.fill_bitmask(bitmask, 1)
    assert bitmask[0].eq(-1).all() and bitmask[2].eq(-1).all(), "other rows untouched"
    return unpack_bitmask(bitmask, vocab)[1].nonzero().flatten().tolist()


@pytest.mark.parametrize(
    ("schema", "strict", "fragment"),
    [
        ({"type": "wat"}, False, "Invalid type"),
        ({"$ref": "#/nowhere"}, False, "does not exist"),
        ({"type": "string", "format": "no-such-format"}, True, "format"),
        # llguidance 1.9.1 panics (a Rust panic, a BaseException in Python) formatting this one's error: it
        # cuts the message at byte 100, inside a 4-byte character. Still a 400, never a crash.
        ({"maxLength": {"pattern": "x" + "\U000c51c0" * 30}}, True, "char boundary"),
    ],
)
def test_bad_schemas_are_invalid_requests(schema: dict[str, object], strict: bool, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment) as caught:
        json_grammar(schema, strict=strict, param="response_format.json_schema.schema")
    assert caught.value.param == "response_format.json_schema.schema"


def test_strict_refuses_keywords_it_cannot_enforce(caplog: pytest.LogCaptureFixture) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(InvalidRequest, match="uniqueItems"):
        json_grammar(schema, strict=True)
    json_grammar(schema, strict=False)  # not strict: best effort, the keyword is ignored and logged
    assert "uniqueItems" in caplog.text


@pytest.fixture(scope="module")
def guides(hf_tokenizer: PreTrainedTokenizerBase) -> GuideFactory:
    eos = frozenset({int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))})
    return GuideFactory(hf_tokenizer, len(hf_tokenizer), eos)


def drive(hf_tokenizer: PreTrainedTokenizerBase, sampler: SequenceSampler, eos: int, steps: int) -> list[int]:
    """Samples from flat logits until EOS (or ``steps``), as the runner does with a model's logits."""
    vocab = len(hf_tokenizer)
    tokens: list[int] = []
    while len(tokens) < steps and (not tokens or tokens[-1] != eos):
        (token,) = sample_rows(torch.zeros(1, vocab), [sampler], frozenset({eos}))
        tokens.append(token.token_id)
    return tokens


def test_a_uniform_model_under_a_schema_gives_matching_json(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory
) -> None:
    schema = {"type": "array", "items": {"enum": [1, 22, 333]}, "minItems": 2, "maxItems": 4}
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    for seed in range(5):
        params = SamplingParams(seed=seed, grammar=json_grammar(schema))
        sampler = SequenceSampler(params, (), len(hf_tokenizer), CPU, guides.guide(params.grammar or ""))
        tokens = drive(hf_tokenizer, sampler, eos, 500)
        assert tokens[-1] == eos
        value = json.loads(hf_tokenizer.decode(tokens[:-1]))
        assert 2 <= len(value) <= 4 and set(value) <= {1, 22, 333}


def sample_values(hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory, schema: dict[str, Any]) -> list[Any]:
    """What a uniform model writes under ``schema``, for a few seeds (the grammar decides everything), with
    no whitespace between tokens (a uniform model would spend its tokens on it)."""
    schema = schema | {"x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None}}
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    values = []
    for seed in range(6):
        params = SamplingParams(seed=seed, grammar=json_grammar(schema))
        sampler = SequenceSampler(params, (), len(hf_tokenizer), CPU, guides.guide(params.grammar or ""))
        tokens = drive(hf_tokenizer, sampler, eos, 400)
        assert tokens[-1] == eos
        values.append(json.loads(hf_tokenizer.decode(tokens[:-1])))
    return values


def test_objects_with_properties_get_no_keys_of_the_models_invention(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory
) -> None:
    # JSON Schema leaves objects open; a uniform model, allowed to, adds keys after "a" in most samples.
    digit = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {"type": "object", "properties": {"a": digit}, "required": ["a"]}
    nested = {"type": "array", "items": schema, "minItems": 1, "maxItems": 2}
    outer = {"type": "object", "properties": {"x": nested}, "required": ["x"]}
    for value in sample_values(hf_tokenizer, guides, outer):
        assert value.keys() == {"x"} and all(item.keys() == {"a"} for item in value["x"])


def test_all_of_members_stay_open_so_together_they_can_be_met() -> None:
    # Closing each member would leave no object that satisfies both (each forbids the other's key), and
    # llguidance refuses such a schema as unsatisfiable.
    digit = {"type": "integer", "minimum": 0, "maximum": 9}
    part = {"type": "object", "properties": {"b": digit}, "required": ["b"]}
    schema = {
        "$defs": {"Part": part},
        "allOf": [{"type": "object", "properties": {"a": digit}, "required": ["a"]}, {"$ref": "#/$defs/Part"}],
    }
    assert closed(schema) == schema
    json_grammar(schema)
    with pytest.raises(InvalidRequest, match="nsatisfiable"):
        json_grammar({"allOf": [{**member, "additionalProperties": False} for member in (schema["allOf"][0], part)]})


def test_closing_objects_reads_schema_maps_as_maps() -> None:
    # A property named "properties" is a property, not the keyword.
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {}}}}
    assert closed(schema) == {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {}, "additionalProperties": False}},
        "additionalProperties": False,
    }
    # Values are values: an enum of objects is not a schema.
    values = {"enum": [{"properties": {}}], "const": {"properties": {}}, "default": {"properties": {}}}
    assert closed(values) == values
    kept = {"properties": {"a": {}}, "additionalProperties": True}
    assert closed(kept) == kept


def test_min_tokens_holds_eos_back_only_while_the_grammar_allows_more(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory
) -> None:
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    grammar = json_grammar({"const": 7})  # exactly one output: "7", then only EOS
    params = SamplingParams(temperature=0.0, min_tokens=5, logit_bias={eos: 100.0}, grammar=grammar)
    sampler = SequenceSampler(params, (), len(hf_tokenizer), CPU, guides.guide(grammar))
    assert hf_tokenizer.decode(drive(hf_tokenizer, sampler, eos, 10)) == "7<|im_end|>"
    # With a grammar that goes on, min_tokens keeps EOS out until it is met, despite the bias.
    grammar = json_grammar({"type": "integer", "minimum": 1})
    params = SamplingParams(temperature=0.0, min_tokens=5, logit_bias={eos: 100.0}, grammar=grammar)
    sampler = SequenceSampler(params, (), len(hf_tokenizer), CPU, guides.guide(grammar))
    assert hf_tokenizer.decode(drive(hf_tokenizer, sampler, eos, 10)) == "10000<|im_end|>"


def test_guides_for_one_grammar_are_independent(hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory) -> None:
    # The factory hands out copies of one cached matcher: advancing one must not move the others.
    grammar = json_grammar({"enum": ["ab", "cd"]})
    first, second = guides.guide(grammar), guides.guide(grammar)
    (quote,) = hf_tokenizer.encode('"', add_special_tokens=False)
    (a, c) = (hf_tokenizer.encode(x, add_special_tokens=False)[0] for x in "ac")
    first.advance(quote)
    first.advance(a)
    assert c not in allowed(first, len(hf_tokenizer))
    second.advance(quote)
    assert c in allowed(second, len(hf_tokenizer))
    third = guides.guide(grammar)
    assert allowed(third, len(hf_tokenizer)) == [quote]


def test_a_token_the_grammar_refuses_ends_the_sequence_with_eos(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory
) -> None:
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    guide = guides.guide(json_grammar({"type": "object"}))
    (letter,) = hf_tokenizer.encode("x", add_special_tokens=False)
    assert letter not in allowed(guide, len(hf_tokenizer))
    guide.advance(letter)  # what a caller bypassing the mask would do
    assert guide.failed
    assert allowed(guide, len(hf_tokenizer)) == [eos]


@settings(max_examples=150, deadline=None)
@given(schema=st.dictionaries(st.sampled_from(SCHEMA_KEYWORDS), schemas, max_size=5), strict=st.booleans())
def test_any_schema_is_refused_or_enforced_never_a_crash(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory, schema: dict[str, object], strict: bool
) -> None:
    # Schemas of any shape (most are refused): a refusal is an InvalidRequest, never another exception; an
    # accepted one is enforced: every token sampled under its mask is one the matcher accepts.
    try:
        grammar = json_grammar(schema, strict=strict)
    except InvalidRequest:
        return
    params = SamplingParams(seed=0, grammar=grammar)
    guide = guides.guide(grammar)
    sampler = SequenceSampler(params, (), len(hf_tokenizer), CPU, guide)
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    tokens = drive(hf_tokenizer, sampler, eos, 20)
    assert not guide.failed, hf_tokenizer.decode(tokens)


TIGHT = {"x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None}}  # no tokens spent on spaces


@settings(max_examples=120, deadline=None)
@given(schema=typed_documents(), strict=st.booleans(), seed=st.integers(0, 2**32))
def test_every_accepted_typed_schema_is_enforced_to_its_end(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory, schema: dict[str, Any], strict: bool, seed: int
) -> None:
    # Flat logits: a model of pure noise. Whatever it would write, the mask makes it valid JSON for the schema.
    try:
        grammar = json_grammar(schema | TIGHT, strict=strict)
    except InvalidRequest as refused:
        event(f"refused: {refused}"[:60])
        assume(False)  # hypothesis fails the test (filter_too_much) if most typed schemas were refused
    sampler = SequenceSampler(
        SamplingParams(seed=seed, grammar=grammar), (), len(hf_tokenizer), CPU, guides.guide(grammar)
    )
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    tokens = drive(hf_tokenizer, sampler, eos, 400)
    text = hf_tokenizer.decode(tokens[:-1])
    assert tokens[-1] == eos, f"no end within 400 tokens: {text[:200]!r}"
    jsonschema.validate(json.loads(text), schema)


class _SlowTokenizer:
    """Stands for a tokenizer llguidance cannot read (not backed by the `tokenizers` library)."""

    def __len__(self) -> int:
        return 100


def test_an_unreadable_tokenizer_leaves_json_modes_unavailable_not_the_model() -> None:
    factory = GuideFactory(_SlowTokenizer(), 100, frozenset({1}))
    factory.prepare()  # what loading does: must not raise
    assert factory.unavailable is not None and "tokenizer" in factory.unavailable


async def test_a_model_without_grammar_support_answers_400_before_admission(chat_tokenizer: ChatTokenizer) -> None:
    runner = FakeRunner(tokenizer=chat_tokenizer, vocab_size=300)
    engine = Engine(lambda: runner, max_concurrent=1, max_queue=1, batch_size=1, offload=runner.offload)
    service = ChatService(engine)
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        with pytest.raises(InvalidRequest, match="not available for this model") as caught:
            await service.prepare(body)
        assert caught.value.param == "response_format"
        assert engine.active == 0
        nursery.cancel_scope.cancel()


def test_guided_rows_share_one_batch_mask_each_keeping_its_own_grammar(
    hf_tokenizer: PreTrainedTokenizerBase, guides: GuideFactory
) -> None:
    # Three grammars and an unconstrained row in one batch: each row's tokens are those it draws alone.
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    vocab = len(hf_tokenizer)
    schemas: list[dict[str, object] | None] = [
        {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        None,
        {"enum": ["ab", "cd", "efg"]},
        {"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
    ]

    def run(indexes: list[int]) -> dict[int, list[int]]:
        samplers = {}
        for i in indexes:
            grammar = None if schemas[i] is None else json_grammar(schemas[i])  # type: ignore[arg-type]
            params = SamplingParams(seed=i, temperature=0.8, grammar=grammar)
            samplers[i] = SequenceSampler(params, (), vocab, CPU, None if grammar is None else guides.guide(grammar))
        tokens: dict[int, list[int]] = {i: [] for i in indexes}
        for step in range(40):
            live = [i for i in indexes if not tokens[i] or tokens[i][-1] != eos]
            if not live:
                break
            logits = torch.stack(
                [torch.randn(vocab, generator=torch.Generator().manual_seed(step * 10 + i)) for i in live]
            )
            for i, token in zip(live, sample_rows(logits, [samplers[i] for i in live], frozenset({eos})), strict=True):
                tokens[i].append(token.token_id)
        return tokens

    together = run([0, 1, 2, 3])
    for i in range(4):
        assert run([i])[i] == together[i]
    for i in (0, 2, 3):
        assert together[i][-1] == eos
        json.loads(hf_tokenizer.decode(together[i][:-1]))


class PanicException(BaseException):  # the name pyo3 gives a Rust panic, which guided matches
    """Stands for ``pyo3_runtime.PanicException``."""


class _PanickingMatcher:
    """Stands for an llguidance matcher whose Rust code panics while computing the mask."""

    def is_error(self) -> bool:
        return False

    def compute_bitmask(self) -> bytes:
        raise PanicException("index out of bounds")


def test_a_panicking_matcher_ends_its_row_with_eos_and_spares_the_others(caplog: pytest.LogCaptureFixture) -> None:
    vocab, eos = 100, 7
    guide = Guide(_PanickingMatcher(), eos)  # type: ignore[arg-type]
    panicking = SequenceSampler(SamplingParams(seed=1), (), vocab, CPU, guide)
    other = SequenceSampler(SamplingParams(temperature=0.0), (), vocab, CPU)
    logits = torch.zeros(2, vocab)
    logits[:, 50] = 10.0
    first, second = sample_rows(logits, [panicking, other], frozenset({eos}))
    assert first.token_id == eos and second.token_id == 50
    assert guide.failed
    assert "panicked" in caplog.text


@pytest.mark.parametrize(("table", "rows"), [(288, 288), (320, 280), (300, 300)])
def test_masks_fit_vocabularies_32_divides_and_tokenizers_wider_than_the_model(
    hf_tokenizer: PreTrainedTokenizerBase, table: int, rows: int
) -> None:
    # llguidance wants ceil(n / 32) words, and says n // 32 + 1 when asked (one more for 288 or 32000
    # tokens); a table wider than the model's rows (``table`` > ``rows``) is cut to the rows.
    eos = int(hf_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    factory = GuideFactory(hf_tokenizer, table, frozenset({eos}))
    grammar = json_grammar({"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 2})
    sampler = SequenceSampler(SamplingParams(seed=3, grammar=grammar), (), rows, CPU, factory.guide(grammar))
    tokens: list[int] = []
    while not tokens or tokens[-1] != eos:
        (token,) = sample_rows(torch.zeros(1, rows), [sampler], frozenset({eos}))
        tokens.append(token.token_id)
    assert json.loads(hf_tokenizer.decode(tokens[:-1])) in (
        [True],
        [False],
        [True, True],
        [False, False],
        [True, False],
        [False, True],
    )
