"""The architecture matrix: tiny random-weight models of many families, served through the real runner.

For each family the table records what it needs (does its decode batch? must its prompts be prefilled
whole?), and the tests check three things against it:

- the runner decodes it in the recorded mode (``max_batch_size`` > 1, or one sequence per pass);
- `trioserve.model.architectures` says the same, from the config alone;
- every request's greedy tokens from one busy run -- staggered arrivals, prompts of different lengths
  prefilled in chunks of 8 tokens or together left-padded, across the sliding window of 6 where there is
  one, one request leaving mid-batch -- equal its solo greedy tokens, computed by recomputing the whole
  sequence without any cache.

What each family needed, and why (from transformers 5.24's modeling code):

- Sliding-window models (mistral, gemma2, gemma3_text, cohere2, olmo3, exaone4, gpt_oss) batch through the
  KV arena: their `DynamicSlidingWindowLayer`s keep just the last window - 1 tokens, which are copied to the
  columns they belong to, and the window is one more condition of the decode mask. (The left-padded join
  of version 1 could not batch them.)
- deepseek_v3 (multi-head latent attention): its cache holds a compressed latent as "keys" and the rotary key
  as "values", of different sizes, so the arena keeps per-layer key and value shapes (it crashed at load when
  it assumed one).
- stablelm, falcon: their decoder layers do not hand transformers' keywords down to attention, so the arena's
  per-layer masks never arrive; the 4-D mask the decode pass gives the model does (each row's causal prefix),
  which is exact since no layer has a window. The load-time probe (two rows of different lengths, noise in the
  columns the shorter one must not see) checks it. (StableLM's partial rotary embedding was never the issue:
  the probe disagreed only because it required the keyword in every layer.)
- bloom: one sequence per pass. It builds ALiBi from a 2-D padding mask, raises on a 4-D one, and transformers
  reports that its attention bypasses the interface (`_can_set_attn_implementation`). Falcon with ``alibi``
  does the same and falls back (`architectures` names both reasons for the log).
- Every family's decode mode is also stated in README's model-support table (`test_readme_table_...`).
- mamba, falcon_mamba: decode went wrong from the third token when a 2-D mask was passed at decode. Their
  `apply_mask_to_padding_states` multiplies the one new token's hidden states ``[rows, 1, hidden]`` by a
  2-D mask ``[rows, length]`` (these two families do not trim it with `create_recurrent_attention_mask` as
  the other recurrent families do), which broadcasts the token into ``length`` copies that
  `causal_conv1d_update` then stores as the convolution state. The runner passes no mask to a one-row pass
  (`generate` drops it at decode too). And, as below, they need whole prefill.
- mamba, falcon_mamba, jamba, zamba: a prompt prefilled in chunks goes wrong. Their Mamba-1
  `mamba_selective_scan` starts from a zero SSM state on any pass of more than one token ("initial hidden
  state is not supported by the kernel path"), ignoring the state the previous chunk cached (the
  convolution state is continued correctly). Mamba-2 mixers (mamba2, bamba, falcon_h1, granitemoehybrid,
  nemotron_h, zamba2) and gated delta nets (qwen3_next) pass ``initial_states`` and are exact. The runner
  reports `prefill_whole` (from `architectures.needs_whole_prefill`) and the scheduler sends such prompts
  in one pass.
- recurrent_gemma: wrong whenever two sequences are in flight or a prompt is chunked: it keeps its state
  in the model's modules (``conv1d_state``, ``rg_lru.recurrent_states``), not in the cache, and treats any
  multi-token pass as a fresh prefill. Refused at load (`architectures.unsupported_reason`).
- minimax: raises at the first forward pass: it accepts only its own `MiniMaxCache`. Refused at load.

Models whose attention resolves to eager (gemma2, gpt_oss, bloom) run in float32 rather than float64:
eager attention adds ``finfo(float64).min`` for masked positions and then computes the softmax in
float32, where that is -inf, so a left-padded row's all-masked padding queries turn to NaN, and the NaN
values poison the real rows through the next layer (``0 * NaN``). Real models in float32/bf16 are not
affected.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from tests.test_runner import Arrival, drive
from trioserve.model.architectures import needs_whole_prefill, one_per_pass_reason, unsupported_reason
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinymodel import build_tokenizer
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, SamplingParams

WINDOW = 6  # sliding window: shorter than a prefill chunk, and than every prompt plus its tokens but one
CHUNK = 8  # prefill budget: "long" goes in three chunks, "tiny" and "pair" together in one left-padded pass

SLIDING = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8)
EXPERTS = dict(num_local_experts=2, num_experts_per_tok=1)


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix and what it is expected to need."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    batches: bool = True  # decodes several sequences per forward pass (README's model-support table says why not)
    whole_prefill: bool = False  # its prompts must go through in one pass
    dtype: torch.dtype = torch.float64
    marks: tuple[pytest.MarkDecorator, ...] = ()  # on the token test
    mode_marks: tuple[pytest.MarkDecorator, ...] = ()  # on the decode-mode test


FAMILIES = [
    Family("llama"),
    Family("mistral", dict(sliding_window=WINDOW)),
    Family("qwen2"),
    Family("qwen3"),
    Family("gemma"),
    Family("gemma2", dict(SLIDING, head_dim=8), dtype=torch.float32),
    Family("gemma3_text", dict(SLIDING, head_dim=8)),
    Family("cohere2", dict(SLIDING, head_dim=8)),
    Family("olmo3", SLIDING),
    Family("exaone4", SLIDING),
    Family("gpt_oss", dict(SLIDING, head_dim=8, **EXPERTS), dtype=torch.float32),
    Family("phi3"),
    Family("gpt2"),
    Family("gpt_neox"),
    Family("falcon"),  # rotary; its decoder layers drop our keyword, the model-level 4-D mask reaches attention
    Family("olmo2"),
    Family("starcoder2"),
    Family("smollm3"),
    # ALiBi from a 2-D mask, attention outside the interface: on its own caches (exact, one per pass).
    Family("bloom", batches=False, dtype=torch.float32),
    Family("mixtral", EXPERTS),
    # Multi-head latent attention: the cache holds a compressed latent (16) as keys and the shared rotary part
    # (8) as values, one head each; attention expands them to 4 heads per pass.
    Family(
        "deepseek_v3",
        dict(
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=2,
            num_experts_per_tok=1,
            n_group=1,
            topk_group=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
        ),
    ),
    Family("stablelm"),  # partial rotary (a quarter of each head); its decoder layers drop our keyword
    Family("qwen3_moe", dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)),
    Family("mamba", dict(state_size=4), batches=False, whole_prefill=True),
    Family("falcon_mamba", dict(state_size=4), batches=False, whole_prefill=True),
    Family(
        "jamba",
        dict(attn_layer_period=2, attn_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=4),
        batches=False,
        whole_prefill=True,
    ),
    Family(
        "zamba",
        dict(layers_block_type=["mamba", "hybrid"], attention_head_dim=8, mamba_d_state=4, n_mamba_heads=2),
        batches=False,
        whole_prefill=True,
    ),
    Family("mamba2", dict(num_heads=8, head_dim=8, state_size=8, n_groups=2, chunk_size=8), batches=False),
    Family("bamba", dict(MAMBA2, attn_layer_indices=[1]), batches=False),
    Family("falcon_h1", dict(MAMBA2, mamba_d_ssm=64, head_dim=8), batches=False),
    Family(
        "granitemoehybrid",
        dict(MAMBA2, layer_types=["mamba", "attention"], shared_intermediate_size=32, **EXPERTS),
        batches=False,
    ),
    Family(
        "nemotron_h",
        dict(
            MAMBA2,
            layers_block_type=["linear_attention", "full_attention"],
            head_dim=8,
            ssm_state_size=8,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=1,
            chunk_size=8,
        ),
        batches=False,
    ),
    Family(
        "zamba2",
        dict(
            layers_block_type=["mamba", "hybrid"],
            hybrid_layer_ids=[1],
            mamba_d_state=8,
            n_mamba_heads=4,
            mamba_headdim=16,
            attention_head_dim=8,
        ),
        batches=False,
    ),
    Family("lfm2", dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False), batches=False),
    Family(
        "qwen3_next",
        dict(
            layer_types=["linear_attention", "full_attention"],
            head_dim=8,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        batches=False,
    ),
]

# Each family's name in README's model-support table (by default its model type, capitalised).
README_NAMES = {
    "llama": "Llama",
    "qwen2": "Qwen2/3",
    "qwen3": "Qwen2/3",
    "gemma2": "Gemma 2/3",
    "gemma3_text": "Gemma 2/3",
    "cohere2": "Cohere2",
    "olmo3": "OLMo 3",
    "exaone4": "EXAONE 4",
    "gpt_oss": "GPT-OSS",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "olmo2": "OLMo 2",
    "smollm3": "SmolLM3",
    "starcoder2": "StarCoder2",
    "mamba2": "Mamba-2",
    "qwen3_moe": "Qwen3-MoE",
    "deepseek_v3": "DeepSeek-V3",
    "stablelm": "StableLM",
    "falcon_mamba": "Falcon-Mamba",
    "falcon_h1": "Falcon-H1",
    "granitemoehybrid": "Granite-MoE-Hybrid",
    "nemotron_h": "Nemotron-H",
    "lfm2": "LFM2",
    "qwen3_next": "Qwen3-Next",
    "recurrent_gemma": "RecurrentGemma",
    "minimax": "MiniMax",
}

UNSUPPORTED = [
    Family(
        "recurrent_gemma",
        dict(block_types=["recurrent", "attention"], lru_width=32, attention_window_size=WINDOW, head_dim=8),
        batches=False,
    ),
    Family(
        "minimax",
        dict(layer_types=["linear_attention", "full_attention"], head_dim=8, block_size=4, **EXPERTS),
        batches=False,
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Models this small gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    return build_tokenizer()


def tiny_config(family: Family) -> Any:
    """A two-layer, 32-wide config of the family, sized to the byte-level tokenizer."""
    hf = tokenizer()
    return AutoConfig.for_model(
        family.model_type,
        **{
            "vocab_size": len(hf),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 256,
            # Wide, untied random weights give varied tokens, so a wrong token is likely to show.
            "initializer_range": 0.5,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "bos_token_id": None,
            "eos_token_id": hf.convert_tokens_to_ids("<|im_end|>"),
            "use_mamba_kernels": False,
            **family.overrides,
        },
    )


@functools.cache
def _tiny_model(model_type: str) -> PreTrainedModel:
    family = next(f for f in FAMILIES + UNSUPPORTED if f.model_type == model_type)
    torch.manual_seed(0)
    # Attention is left for transformers to pick, as loading's ``auto`` does. Grouped-GEMM experts need
    # float32 or narrower; the eager experts loop runs in float64 too (and is ignored by models without).
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=family.dtype, experts_implementation="eager")
    return torch.nn.Module.eval(model)


def tiny_model(family: Family) -> PreTrainedModel:
    """A deterministic random-weight model of the family, built once per test session."""
    return _tiny_model(family.model_type)


def make_runner(family: Family) -> TransformersRunner:
    hf = tokenizer()
    eos = frozenset({hf.convert_tokens_to_ids("<|im_end|>")})
    return TransformersRunner(
        tiny_model(family), ChatTokenizer(hf), model_id=family.model_type, max_batch_size=8, eos_token_ids=eos
    )


def greedy(name: str, prompt: range | list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(name, tuple(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens))


ARRIVALS = [
    Arrival(0, greedy("long", range(3, 22), 6)),  # 19 tokens: 3 chunks, across the window
    Arrival(0, greedy("short", range(40, 45), 8)),
    Arrival(2, greedy("leaves", range(60, 73), 8), leave_after=3),
    Arrival(4, greedy("tiny", [90, 91, 92], 6)),
    Arrival(4, greedy("pair", [100, 101], 5)),  # prefilled with "tiny" where the model batches
]


@torch.inference_mode()
def solo_greedy(model: PreTrainedModel, arrival: Arrival) -> list[int]:
    """The request's greedy tokens alone, recomputing the whole sequence each step: no cache to get wrong."""
    ids = list(arrival.request.prompt_ids)
    count = min(arrival.request.params.max_tokens, arrival.leave_after or 1 << 30)
    for _ in range(count):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(arrival.request.prompt_ids) :]


def cases(families: list[Family], marks: str = "") -> list[Any]:
    """Parameters named by model type, with the family's marks of that kind ("" for none)."""
    return [pytest.param(f, id=f.model_type, marks=getattr(f, marks) if marks else ()) for f in families]


@pytest.mark.parametrize("family", cases(FAMILIES, "marks"))
def test_batched_greedy_equals_solo_greedy(family: Family) -> None:
    runner = make_runner(family)
    # The hook the engine needs: the runner says whether its model's prompts must go in one pass.
    batched = drive(runner, ARRIVALS, prefill_whole=bool(getattr(runner, "prefill_whole", False)))
    model = tiny_model(family)
    assert batched == {a.request.request_id: solo_greedy(model, a) for a in ARRIVALS}


@pytest.mark.parametrize("family", cases(FAMILIES, "mode_marks"))
def test_decode_mode(family: Family) -> None:
    assert (make_runner(family).max_batch_size > 1) == family.batches


def readme_support() -> dict[str, str]:
    """README's model-support table: each family name listed in a row's first cell -> that row's decode cell."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Model support", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("families", "---"):
            continue
        names = cells[0].rsplit(": ", 1)[-1]  # after a group's label ("sliding-window attention: ...")
        for name in names.split(", "):
            rows[name] = cells[1]
    return rows


@pytest.mark.parametrize("family", cases(FAMILIES + UNSUPPORTED))
def test_readme_table_says_how_each_family_decodes(family: Family) -> None:
    """A family listed as one sequence per pass (or refused) must say so, with a reason, in README; one that
    batches must be listed as batched. So a family that stops batching fails here (and in `test_decode_mode`)
    until the table gives the reason."""
    name = README_NAMES.get(family.model_type, family.model_type.capitalize())
    decode = readme_support()[name]
    if family in UNSUPPORTED:
        assert decode.startswith("refused at startup")
    elif family.batches:
        assert decode.startswith("batched")
    else:
        assert re.match(r"one sequence per pass: .{20,}", decode), decode  # and why


@pytest.mark.parametrize("family", cases(FAMILIES + UNSUPPORTED))
def test_architectures_module_agrees_with_the_table(family: Family) -> None:
    config = tiny_config(family)
    assert (one_per_pass_reason(config) is None) == family.batches
    assert (needs_whole_prefill(config) is not None) == family.whole_prefill
    assert (unsupported_reason(config) is not None) == (family in UNSUPPORTED)


@pytest.mark.parametrize("family", cases([f for f in FAMILIES if f.model_type in ("jamba", "zamba")]))
def test_whole_prefill_makes_mamba1_hybrids_exact(family: Family) -> None:
    """What the marked cases above need: with whole prefill, these families are exact today."""
    runner = make_runner(family)
    model = tiny_model(family)
    expected = {a.request.request_id: solo_greedy(model, a) for a in ARRIVALS}
    assert drive(runner, ARRIVALS, prefill_whole=True) == expected
    assert drive(runner, ARRIVALS, prefill_whole=False) != expected  # the reason the flag exists


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(
            UNSUPPORTED[0],
            id="recurrent_gemma",
            marks=pytest.mark.xfail(raises=AssertionError, strict=True, reason="state in modules"),
        ),
        pytest.param(
            UNSUPPORTED[1],
            id="minimax",
            marks=pytest.mark.xfail(strict=True, raises=ValueError, reason="needs MiniMaxCache"),
        ),
    ],
)
def test_unsupported_families_fail_in_the_runner(family: Family) -> None:
    """Why they are refused at load: driven anyway, they give wrong tokens or raise."""
    runner = make_runner(family)
    model = tiny_model(family)
    assert drive(runner, ARRIVALS, prefill_whole=True) == {
        a.request.request_id: solo_greedy(model, a) for a in ARRIVALS
    }
