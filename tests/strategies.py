"""Hypothesis strategies shared by the fuzzing tests."""

from __future__ import annotations

from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# JSON Schema keywords with values of any shape: the grammar compiler must refuse or accept, never crash.
SCHEMA_KEYWORDS = [
    "type", "properties", "items", "prefixItems", "enum", "const", "anyOf", "allOf", "oneOf", "$ref", "$defs",
    "required", "additionalProperties", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "multipleOf", "minItems", "maxItems", "x-guidance",
]  # fmt: skip
schemas = st.recursive(
    json_values | st.sampled_from(["string", "integer", "object", "array", "#/$defs/a", "#", "^a+$", "date-time"]),
    lambda inner: st.dictionaries(st.sampled_from(SCHEMA_KEYWORDS), inner, max_size=4),
    max_leaves=16,
)

# Typed schemas, built from templates so nearly all compile, and bounded (string lengths, item counts,
# ranges) so that even a model of noise, held to them token by token, ends its answer within a few hundred
# tokens: every accepted schema can be run to its end and its output checked with `jsonschema`.
NAMES = st.text("abcdefghij", min_size=1, max_size=4)
SCALARS = st.none() | st.booleans() | st.integers(-50, 50) | st.text("abcxyz", max_size=3)


@st.composite
def _integers(draw: st.DrawFn) -> dict[str, object]:
    low = draw(st.integers(-100, 100))
    return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 500))}


@st.composite
def _strings(draw: st.DrawFn) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string", "maxLength": draw(st.integers(0, 6))}
    if draw(st.booleans()):
        schema["minLength"] = draw(st.integers(0, int(schema["maxLength"])))  # type: ignore[call-overload]
    return schema


typed_leaves = st.one_of(
    _integers(),
    _strings(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.just({"type": "number", "minimum": 0, "maximum": 1}),
    st.just({"type": "string", "pattern": "^[a-c]{1,3}$"}),
    st.just({"type": "string", "format": "date"}),
    st.just({"type": ["integer", "null"], "minimum": 0, "maximum": 9}),
    st.lists(SCALARS, min_size=1, max_size=4, unique_by=repr).map(lambda values: {"enum": values}),
    SCALARS.map(lambda value: {"const": value}),
)


@st.composite
def _objects(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, object]]) -> dict[str, object]:
    properties = draw(st.dictionaries(NAMES, inner, max_size=3))
    schema: dict[str, object] = {"type": "object", "properties": properties}
    schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), unique=True)) if properties else []
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


@st.composite
def _arrays(draw: st.DrawFn, inner: st.SearchStrategy[dict[str, object]]) -> dict[str, object]:
    most = draw(st.integers(0, 3))
    return {"type": "array", "items": draw(inner), "minItems": draw(st.integers(0, most)), "maxItems": most}


typed_schemas: st.SearchStrategy[dict[str, object]] = st.recursive(
    typed_leaves,
    lambda inner: (
        _objects(inner)
        | _arrays(inner)
        | st.lists(inner, min_size=1, max_size=3).map(lambda members: {"anyOf": members})
    ),
    max_leaves=6,
)


@st.composite
def typed_documents(draw: st.DrawFn) -> dict[str, object]:
    """A typed schema, sometimes with its parts moved into ``$defs`` and referred to (as pydantic writes)."""
    schema = draw(typed_schemas)
    if draw(st.booleans()):
        shared = draw(typed_schemas)
        return {
            "$defs": {"Shared": shared},
            "type": "object",
            "properties": {"main": schema, "other": {"$ref": "#/$defs/Shared"}},
            "required": ["main", "other"],
        }
    return schema
