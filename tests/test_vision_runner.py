"""Vision-language models through the real runner and scheduler: tiny random-weight models of each family
(`trioserve.model.tinyvision`), prompts with images batched with text-only ones, against full recomputation.

The reference recomputes the whole sequence at every step with the model's own forward pass, images and
all (the model then computes its own positions, multi-axis rotary ones included), so it shares nothing with
the runner's chunking, arena, rotary offsets or prefix cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import PreTrainedModel

from tests.test_architectures import readme_support
from tests.test_runner import Arrival, drive
from trioserve.engine.scheduler import Scheduler
from trioserve.errors import InvalidRequest
from trioserve.model.architectures import needs_whole_prefill, one_per_pass_reason, unsupported_reason
from trioserve.model.loading import is_vision_language
from trioserve.model.runner import TransformersRunner
from trioserve.model.tinyvision import FAMILIES, available_families, build_vision, build_vision_model, family_tokenizer
from trioserve.model.vision import cache_key
from trioserve.text.processor import VisionTokenizer
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import GenerationRequest, ImageInputs, SamplingParams

CHUNK = 8  # prefill budget: shorter than every prompt with an image, so the image rule decides the first chunk


def _families() -> list[Any]:
    built = set(available_families())
    return [
        pytest.param(name, marks=() if name in built else pytest.mark.skip(reason="torchvision does not import here"))
        for name in FAMILIES
    ]


@functools.cache
def tiny(family: str) -> tuple[PreTrainedModel, VisionTokenizer]:
    model, processor = build_vision(family)
    return model, VisionTokenizer(processor)


def picture(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def chat(
    tokenizer: VisionTokenizer, text: str, images: Sequence[Image.Image] = ()
) -> tuple[list[int], ImageInputs | None]:
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in images]
    parts.append({"type": "text", "text": text})
    prompt = tokenizer.render_chat([{"role": "user", "content": parts}])
    if not images:
        return tokenizer.encode(prompt), None
    return tokenizer.encode_images(prompt, images)


def request(
    name: str, tokenizer: VisionTokenizer, text: str, images: Sequence[Image.Image] = (), tokens: int = 6
) -> GenerationRequest:
    ids, inputs = chat(tokenizer, text, images)
    return GenerationRequest(name, tuple(ids), SamplingParams(temperature=0.0, max_tokens=tokens), images=inputs)


@torch.inference_mode()
def reference(model: PreTrainedModel, request: GenerationRequest) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step, with the model's own positions."""
    ids = list(request.prompt_ids)
    features = dict(request.images.features) if request.images is not None else {}
    for _ in range(request.params.max_tokens):
        extra = {}
        for key, value in features.items():
            if key in ("token_type_ids", "mm_token_type_ids"):  # per token: generated tokens are text
                value = torch.nn.functional.pad(value, (0, len(ids) - value.shape[-1]))
            extra[key] = value
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, **extra).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(request.prompt_ids) :]


def make_runner(
    model: PreTrainedModel, tokenizer: VisionTokenizer, *, batch: int = 8, prefix: bool = True
) -> TransformersRunner:
    eos = frozenset({tokenizer.hf.convert_tokens_to_ids("<|im_end|>")})
    return TransformersRunner(
        model, tokenizer, model_id="tiny-vlm", max_batch_size=batch, eos_token_ids=eos, prefix_caching=prefix
    )


@pytest.mark.parametrize("family", _families())
def test_images_batched_with_text_equal_solo(family: str) -> None:
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer)
    assert runner.max_batch_size > 1, runner.mode  # decode goes through the arena
    arrivals = [
        Arrival(0, request("text", tokenizer, "tell me about the sea and the sky", tokens=8)),
        Arrival(0, request("one", tokenizer, "what is this", [picture(1)])),
        Arrival(1, request("two", tokenizer, "compare these two pictures", [picture(2), picture(3, (24, 50))])),
        Arrival(2, request("short", tokenizer, "hi", tokens=5)),
        Arrival(2, request("again", tokenizer, "what is this", [picture(1)], tokens=4)),  # a prefix-cache hit
    ]
    batched = drive(runner, arrivals)
    assert batched == {a.request.request_id: reference(model, a.request) for a in arrivals}


@pytest.mark.parametrize("family", _families())
def test_the_image_reaches_the_model(family: str) -> None:
    """Two prompts that differ only in their image get different tokens (a runner that dropped the image, or
    served one prompt from the other's cached KV, would give the same)."""
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer)
    arrivals = [Arrival(0, request(f"p{seed}", tokenizer, "describe", [picture(seed)], tokens=8)) for seed in (5, 6)]
    arrivals.append(Arrival(3, request("p5-again", tokenizer, "describe", [picture(5)], tokens=8)))
    out = drive(runner, arrivals)
    assert out["p5"] != out["p6"]
    assert out["p5-again"] == out["p5"]
    assert out == {a.request.request_id: reference(model, a.request) for a in arrivals}


@pytest.mark.parametrize("family", _families())
def test_text_only_requests_to_a_vision_model(family: str) -> None:
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer)
    # Text that spells the family's image placeholder is text: no image reaches the model, nothing breaks.
    spelled = FAMILIES[family].placeholder or FAMILIES[family].tokens[0]
    arrivals = [
        Arrival(0, request("a", tokenizer, f"just words here {spelled} and more", tokens=6)),
        Arrival(1, request("b", tokenizer, "and more words, quite a few of them this time", tokens=6)),
    ]
    assert drive(runner, arrivals) == {a.request.request_id: reference(model, a.request) for a in arrivals}


def test_one_per_pass_mode_with_images_equals_solo() -> None:
    """Without the arena (one sequence per pass, each on its own cache) the rotary offset still applies."""
    model, tokenizer = tiny("paddleocr_vl")
    runner = make_runner(model, tokenizer, batch=1)
    arrivals = [
        Arrival(0, request("img", tokenizer, "what is this", [picture(8)])),
        Arrival(0, request("txt", tokenizer, "words", tokens=4)),
    ]
    assert drive(runner, arrivals) == {a.request.request_id: reference(model, a.request) for a in arrivals}


def test_cache_keys_carry_the_images_content() -> None:
    _, tokenizer = tiny("llava")
    ids_a, images_a = chat(tokenizer, "what is this", [picture(1)])
    ids_b, images_b = chat(tokenizer, "what is this", [picture(2)])
    assert ids_a == ids_b  # the same tokens: only the key tells the two prompts apart
    key_a, key_b = cache_key(ids_a, images_a), cache_key(ids_b, images_b)
    (start, end), *_ = images_a.spans  # type: ignore[union-attr]
    assert (key_a[:start] == key_b[:start]).all()
    assert (key_a[start:end] != key_b[start:end]).all()
    assert (key_a[start:end] < 0).all()  # no text token id equals an image's key
    again, images_again = chat(tokenizer, "what is this", [picture(1)])
    assert (cache_key(again, images_again) == key_a).all()
    # A text prompt that spells the placeholder has the image token's id, never an image's key.
    literal = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "<image>what is this"}]))
    assert not set(cache_key(literal, None).tolist()) & set(key_a[start:end].tolist())


@pytest.mark.parametrize("family", _families())
def test_prefix_cache_never_shares_kv_across_images_and_never_ends_inside_one(family: str) -> None:
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer)
    first = request("first", tokenizer, "what is this picture about", [picture(1)], tokens=3)
    drive(runner, [Arrival(0, first)])
    same_text_other_image = request("other", tokenizer, "what is this picture about", [picture(2)], tokens=3)
    span_start = same_text_other_image.images.spans[0][0]  # type: ignore[union-attr]
    hit = runner._lookup(same_text_other_image)
    # The text before the image at most (none for Gemma 3: its sliding window no longer holds those keys).
    assert hit is None or hit.length <= span_start
    same = request("same", tokenizer, "what is this picture about", [picture(1)], tokens=3)
    hit = runner._lookup(same)
    assert runner.prefix_cache is not None
    if not any(runner.prefix_cache.windows):  # (a sliding window keeps too few keys to restart a prompt)
        assert hit is not None and hit.length > same.images.spans[-1][1]  # type: ignore[union-attr]
    # Another question about the same image: the hit covers the image, or stops before it.
    follow = request("follow", tokenizer, "what is this picture not about", [picture(1)], tokens=3)
    hit = runner._lookup(follow)
    spans = follow.images.spans  # type: ignore[union-attr]
    assert hit is None or hit.length <= spans[0][0] or hit.length >= spans[-1][1]
    outputs = drive(runner, [Arrival(0, same_text_other_image), Arrival(0, follow)])
    assert outputs == {r.request_id: reference(model, r) for r in (same_text_other_image, follow)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_serves_text_through_the_arena(family: str) -> None:
    """The language side of every family, the ones whose processors need torchvision included: the arena's
    load-time probe accepts it (decode batches), and text-only requests equal full recomputation."""
    hf = family_tokenizer(family)
    model = build_vision_model(family, hf)
    tokenizer = ChatTokenizer(hf)
    eos = frozenset({hf.convert_tokens_to_ids("<|im_end|>")})
    runner = TransformersRunner(model, tokenizer, model_id=family, max_batch_size=4, eos_token_ids=eos)
    assert runner.max_batch_size == 4, runner.mode
    prompts = {"a": "just words here", "b": "and more words, quite a few of them this time", "c": "hi"}
    arrivals = []
    for step, (name, text) in enumerate(prompts.items()):
        ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text}]))
        arrivals.append(
            Arrival(step, GenerationRequest(name, tuple(ids), SamplingParams(temperature=0.0, max_tokens=5)))
        )
    assert drive(runner, arrivals) == {a.request.request_id: reference(model, a.request) for a in arrivals}


README_NAMES = {
    "llava": "LLaVA",
    "gemma3": "Gemma 3 (vision)",
    "idefics3": "Idefics3/SmolVLM",
    "paddleocr_vl": "PaddleOCR-VL",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "mistral3": "Mistral3",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_matrix_and_readme_agree(family: str) -> None:
    """README's model-support table lists every vision family as batched, and `architectures` agrees from
    the config alone (the runner's probe is checked by the tests above)."""
    config = build_vision_model(family, family_tokenizer(family)).config
    assert one_per_pass_reason(config) is None
    assert needs_whole_prefill(config) is None and unsupported_reason(config) is None
    assert is_vision_language(config)
    assert readme_support()[README_NAMES[family]].startswith("batched")


def test_images_that_do_not_match_the_placeholders_are_a_clear_error() -> None:
    _, tokenizer = tiny("llava")
    one_placeholder = tokenizer.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    )
    with pytest.raises(InvalidRequest, match="images could not be prepared") as raised:
        tokenizer.encode_images(one_placeholder, [picture(1), picture(2)])
    assert raised.value.param == "messages"
    no_placeholder = tokenizer.render_chat([{"role": "user", "content": "no image part"}])
    with pytest.raises(InvalidRequest):
        tokenizer.encode_images(no_placeholder, [picture(1)])


def test_the_scheduler_keeps_a_prompts_images_in_its_first_chunk() -> None:
    """Chunks of 4 tokens: the prompt with images goes alone, its first chunk past the last image; the text
    prompts behind it are grouped as usual."""
    spans = ((3, 9), (12, 20))
    images = ImageInputs({}, ("a", "b"), spans)
    with_images = GenerationRequest("img", tuple(range(30)), images=images)
    scheduler = Scheduler(max_running=4, max_waiting=4, batch_size=4, prefill_chunk=8)
    scheduler.submit(0, GenerationRequest("t0", (1, 2)))
    scheduler.submit(1, with_images)
    scheduler.submit(2, GenerationRequest("t1", (3, 4)))
    first = scheduler.plan().prefill
    assert [c.request.request_id for c in first] == ["t0"]  # a group of whole prompts stops at the image prompt
    for chunk in first:
        scheduler.prefilled(chunk)
    (chunk,) = scheduler.plan().prefill
    assert chunk.request is with_images and (chunk.start, chunk.end) == (0, 20)
    scheduler.prefilled(chunk)
    (chunk,) = scheduler.plan().prefill
    assert (chunk.start, chunk.end) == (20, 28)  # text after the images: chunks as usual


@pytest.mark.parametrize("family", _families())
def test_a_new_turn_with_a_new_image_after_a_cached_one(family: str) -> None:
    """Turn 2 repeats turn 1 (its image included) and adds a second image: the cached prefix covers the first
    image where the second's features can be passed alone (all but Idefics3, whose pixel layout does not say
    which rows are whose), else it stops before the first; the tokens are exact either way."""
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer)
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}]
    prompt = tokenizer.render_chat(first_turn)
    ids, images = tokenizer.encode_images(prompt, [picture(11)])
    turn1 = GenerationRequest("turn1", tuple(ids), SamplingParams(temperature=0.0, max_tokens=4), images=images)
    answer = drive(runner, [Arrival(0, turn1)])["turn1"]
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": tokenizer.decode(answer)},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this one"}]},
    ]
    ids, images = tokenizer.encode_images(tokenizer.render_chat(second_turn), [picture(11), picture(12)])
    turn2 = GenerationRequest("turn2", tuple(ids), SamplingParams(temperature=0.0, max_tokens=5), images=images)
    hit = runner._lookup(turn2)
    assert images is not None
    (first_start, first_end), (second_start, _) = images.spans
    assert hit is None or hit.length <= first_start or first_end <= hit.length <= second_start
    assert runner.prefix_cache is not None
    if family != "idefics3" and not any(runner.prefix_cache.windows):
        assert hit is not None and first_end <= hit.length
    assert drive(runner, [Arrival(0, turn2)]) == {"turn2": reference(model, turn2)}


@pytest.mark.parametrize("family", _families())
def test_text_prompts_prefilled_together_beside_an_image_prompt(family: str) -> None:
    """A budget that fits several whole prompts: the text-only ones go together, left-padded, in one pass; the
    one with an image between them goes alone."""
    model, tokenizer = tiny(family)
    runner = make_runner(model, tokenizer, prefix=False)
    arrivals = [
        Arrival(0, request("t1", tokenizer, "hi", tokens=4)),
        Arrival(0, request("t2", tokenizer, "a longer question about the weather", tokens=4)),
        Arrival(0, request("img", tokenizer, "and this?", [picture(4)], tokens=4)),
        Arrival(0, request("t3", tokenizer, "bye now", tokens=4)),
    ]
    out = drive(runner, arrivals, chunk=256)
    assert out == {a.request.request_id: reference(model, a.request) for a in arrivals}
