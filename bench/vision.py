"""`./dev bench --image`: time to first token with one image, beside a text prompt of the same token count.

Runner level, on the CPU, in-process: a LLaVA-shaped random-weight model (CLIP tower on 224x224 images in
14x14 patches: 256 image tokens; a Llama language model), built offline. For the image prompt the time
includes what serving does before the first prefill: the processor (resize, normalise, expand the
placeholder) in `VisionTokenizer.encode_images`; the prefill pass then runs the vision encoder too. The text
prompt has exactly as many tokens, so the difference is the image's own cost. Prefix caching is off, so
every repeat computes everything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from trioserve.model.runner import TransformersRunner
from trioserve.model.tinyvision import family_tokenizer
from trioserve.text.processor import VisionTokenizer
from trioserve.types import GenerationRequest, PrefillChunk, SamplingParams, StepPlan

RESULTS = Path(__file__).with_name("results")
IMAGE_SIZE = 224
PATCH = 14


def bench_model(text_hidden: int, text_layers: int) -> tuple[Any, VisionTokenizer]:
    """The LLaVA-shaped model and its tokenizer (processor-backed)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = family_tokenizer("llava")
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
        image_token="<image>",
    )
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    return model, VisionTokenizer(processor)


def _ttft(runner: TransformersRunner, request: GenerationRequest) -> float:
    """Seconds from the request to its first token: one prefill step (the whole prompt in one chunk)."""
    started = time.perf_counter()
    runner.step(StepPlan(prefill=(PrefillChunk(0, request, 0, len(request.prompt_ids)),)))
    elapsed = time.perf_counter() - started
    runner.release(0)
    return elapsed


def run_image(args: argparse.Namespace) -> int:
    print("building the LLaVA-shaped benchmark model...", file=sys.stderr)
    model, tokenizer = bench_model(args.image_text_hidden, args.image_text_layers)
    eos = frozenset({tokenizer.hf.convert_tokens_to_ids("<|im_end|>")})
    runner = TransformersRunner(
        model, tokenizer, model_id="bench-llava", max_batch_size=4, eos_token_ids=eos, prefix_caching=False
    )
    params = SamplingParams(temperature=0.0, max_tokens=1)
    question = "Describe this picture in one sentence, then name its main colour."
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=generator, dtype=torch.uint8).numpy()
    picture = Image.fromarray(pixels, "RGB")
    rendered = tokenizer.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    )
    ids, _ = tokenizer.encode_images(rendered, [picture])
    filler = tokenizer.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 200))
    text_ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": question}]))
    text_prompt = tuple(filler[: len(ids) - len(text_ids)] + text_ids)
    assert len(text_prompt) == len(ids)

    image_runs, encode_runs, text_runs = [], [], []
    for repeat in range(args.repeats + 1):  # the first of each is a warm-up
        started = time.perf_counter()
        ids, inputs = tokenizer.encode_images(rendered, [picture])
        encoded = time.perf_counter() - started
        image_total = encoded + _ttft(runner, GenerationRequest("img", tuple(ids), params, images=inputs))
        text_total = _ttft(runner, GenerationRequest("txt", text_prompt, params))
        if repeat:
            image_runs.append(image_total)
            encode_runs.append(encoded)
            text_runs.append(text_total)
    result = {
        "mode": "image",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": len(ids),
        "image_tokens": sum(end - start for start, end in inputs.spans),
        "image": f"{picture.size[0]}x{picture.size[1]} RGB, resized to {IMAGE_SIZE}x{IMAGE_SIZE}",
        "text_model": {"hidden": args.image_text_hidden, "layers": args.image_text_layers},
        "ttft_image_ms": 1000 * statistics.median(image_runs),
        "of_which_processor_ms": 1000 * statistics.median(encode_runs),
        "ttft_text_ms": 1000 * statistics.median(text_runs),
        "repeats": args.repeats,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-image.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"TTFT, {result['prompt_tokens']} prompt tokens ({result['image_tokens']} of them one image), CPU, "
        f"median of {args.repeats}:\n"
        f"  with the image   {result['ttft_image_ms']:8.1f} ms (processor {result['of_which_processor_ms']:.1f} ms)\n"
        f"  text only        {result['ttft_text_ms']:8.1f} ms\n"
        f"written to {out}"
    )
    return 0
