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
