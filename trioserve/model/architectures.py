"""What each model family needs from the runner, read from its config alone (no weights).

Three questions, each answered with the reason (None: nothing special):

- ``one_per_pass_reason``: why its decode cannot put several sequences in one forward pass. Layers that keep
  a fixed-size recurrent state per sequence (Mamba, linear attention, short convolutions) are not KV the
  arena can hold; such models decode one sequence per pass, taking turns, each on its own cache. A
  sliding window is *not* a reason: in the arena it is one more condition on the attention mask.
- ``needs_whole_prefill``: why a prompt must go through the model in one forward pass. Mamba-1 mixers start
  their selective scan from a zero state on every multi-token pass, ignoring the state cached by the
  previous chunk.
- ``unsupported_reason``: why trioserve cannot serve the model at all.

Checked per family by the architecture matrix (``tests/test_architectures.py``) against tiny random-weight
models and full-recomputation greedy references; the findings behind each reason are written there.
"""

from __future__ import annotations

from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import LinearAttentionCacheLayerMixin

# Mamba-1 mixers (`mamba_selective_scan` and the `mamba_ssm` kernel it stands in for) take no initial state:
# any forward pass of more than one token scans from zeros and overwrites the cached state, so a prompt
# continued in chunks forgets the chunks before. Mamba-2 style mixers pass `initial_states` and are exact.
_MAMBA1_FAMILIES = frozenset({"mamba", "falcon_mamba", "jamba", "zamba"})

_UNSUPPORTED = {
    "recurrent_gemma": (
        "RecurrentGemma keeps its recurrent and convolution state inside the model's own modules, not in the "
        "cache, so two sequences in flight overwrite each other's state and a chunked prompt restarts it"
    ),
    "minimax": "MiniMax needs its own cache class (MiniMaxCache); trioserve's runner drives transformers' DynamicCache",
}


# Attention the arena's decode masks cannot reach. A model whose decoder layers drop our keyword still gets
# the masks through the 4-D `attention_mask` of the decode pass (StableLM, Falcon with rotary positions), but
# these build their ALiBi bias from a 2-D padding mask, which a 4-D one breaks. The runner's load-time probe
# finds this too (the pass raises, and the model keeps its own caches); named here so the startup log says why.
_OWN_ATTENTION = {
    "bloom": "it builds its ALiBi bias from a 2-D padding mask, so the decode pass's 4-D arena mask cannot reach it",
    "falcon": "with ALiBi (alibi=true) it builds its position bias from a 2-D padding mask, which the arena's 4-D "
    "decode mask cannot replace",
}


def _own_attention_reason(config: PreTrainedConfig, model_type: str) -> str | None:
    if model_type == "falcon" and not getattr(config.get_text_config(), "alibi", False):
        return None  # rotary Falcon (7B, 40B, 180B) batches: its attention takes the 4-D mask
    return _OWN_ATTENTION.get(model_type)


def _model_types(config: PreTrainedConfig) -> set[str]:
    """The config's model type and its text model's (multimodal configs nest the language model)."""
    return {str(config.model_type), str(config.get_text_config().model_type)}


def one_per_pass_reason(config: PreTrainedConfig) -> str | None:
    """Why this model decodes one sequence per forward pass; None when its decode batches."""
    for model_type in sorted(_model_types(config)):
        if (reason := _own_attention_reason(config, model_type)) is not None:
            return reason
    probe = DynamicCache(config=config)  # the layer kinds transformers itself would cache for this model
    stateful = sorted(
        {type(layer).__name__ for layer in probe.layers if isinstance(layer, LinearAttentionCacheLayerMixin)}
    )
    if not stateful:
        return None
    return (
        f"its recurrent layers ({', '.join(stateful)}: Mamba, linear attention or convolution state) keep a "
        "fixed-size state per sequence rather than per-token KV, which the batch does not hold"
    )


def needs_whole_prefill(config: PreTrainedConfig) -> str | None:
    """Why this model's prompts must be prefilled in one forward pass; None when chunks are exact."""
    if _model_types(config) & _MAMBA1_FAMILIES:
        return (
            "its Mamba-1 mixers scan every multi-token forward pass from a zero state, ignoring the state "
            "cached by the previous chunk"
        )
    return None


def unsupported_reason(config: PreTrainedConfig) -> str | None:
    """Why trioserve cannot serve this model; None when it can."""
    for model_type in sorted(_model_types(config)):
        if model_type in _UNSUPPORTED:
            return _UNSUPPORTED[model_type]
    return None
