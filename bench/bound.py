"""The in-process bound: the model's own batched forward passes, no server, no HTTP, no scheduler.

For a batch of B identical-length prompts: one batched prefill, then ``max_tokens - 1`` batched decode
steps with a `DynamicCache`, greedy. Tokens per second over the whole thing is what a server with perfect
batching and zero overhead could reach with B streams arriving together.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache


@torch.inference_mode()
def forward_bound(model_dir: Path, prompt_ids: list[int], batch: int, max_tokens: int, repeats: int = 2) -> float:
    """Best tokens/s over ``repeats`` runs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        input_ids = torch.tensor([prompt_ids] * batch)
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(max_tokens - 1):
            next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            out = model(input_ids=next_ids, cache=cache, use_cache=True, logits_to_keep=1)
        elapsed = time.perf_counter() - start
        best = max(best, batch * max_tokens / elapsed)
    return best
