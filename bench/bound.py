"""In-process references, no server, no HTTP, no event loop.

- `runner_bound`: the runner's own batched steps, driven by the same scheduler policy the engine uses, for
  B requests arriving together: exactly the server's model work, so server / bound is the serving overhead.
- `static_batch`: the plain transformers loop (one batched prefill of B identical prompts, then batched
  greedy decode with a `DynamicCache`), the textbook "forward passes alone" figure.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from trioserve.config import Settings
from trioserve.engine.scheduler import Scheduler
from trioserve.model.loading import load_runner
from trioserve.types import GenerationRequest, SamplingParams


def runner_bound(
    model_dir: Path, prompt_ids: list[int], batch: int, max_tokens: int, repeats: int = 2, grammar: str | None = None
) -> float:
    """Best tokens/s over ``repeats`` runs of B requests through the runner, as the engine would drive it.

    With ``grammar``, every sequence is constrained by it (it must not allow EOS within ``max_tokens``).
    """
    settings = Settings(model=str(model_dir), torch_dtype="float32", max_concurrent=batch)
    runner = load_runner(settings)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=grammar is None, grammar=grammar)
    best = 0.0
    for _ in range(repeats):
        scheduler = Scheduler(
            max_running=batch, max_waiting=0, batch_size=runner.max_batch_size, prefill_chunk=settings.prefill_chunk
        )
        for seq_id in range(batch):
            scheduler.submit(seq_id, GenerationRequest(str(seq_id), tuple(prompt_ids), params))
        produced = dict.fromkeys(range(batch), 0)
        start = time.perf_counter()
        while scheduler.running or scheduler.waiting:
            plan = scheduler.plan()
            output = runner.step(plan)
            for chunk in plan.prefill:
                scheduler.prefilled(chunk)
            for seq_id in output.tokens:
                produced[seq_id] += 1
                if produced[seq_id] == max_tokens:
                    scheduler.remove(seq_id)
                    runner.release(seq_id)
        best = max(best, batch * max_tokens / (time.perf_counter() - start))
    return best


@torch.inference_mode()
def static_batch(model_dir: Path, prompt_ids: list[int], batch: int, max_tokens: int, repeats: int = 2) -> float:
    """Best tokens/s over ``repeats`` runs of the plain transformers batched loop."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([prompt_ids] * batch), cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(max_tokens - 1):
            next_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            out = model(input_ids=next_ids, cache=cache, use_cache=True, logits_to_keep=1)
        best = max(best, batch * max_tokens / (time.perf_counter() - start))
    return best
