"""transformers' own bound, run in a process of its own: ``generate`` with a static cache (on CUDA,
transformers compiles it with torch.compile, CUDA graphs included), one static batch of B copies of the
prompt, ``new`` tokens each. Prints one JSON line per batch size.

usage: python -m bench.static_generate MODEL_DIR NEW B1,B2,...
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "Explain how a context manager works in Python. (#1)"


def main(argv: list[str]) -> int:
    path, new, batches = argv[0], int(argv[1]), [int(b) for b in argv[2].split(",")]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = (ids if torch.is_tensor(ids) else ids["input_ids"]).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for batch in batches:
        x = ids.repeat(batch, 1)
        options = {
            "max_new_tokens": new,
            "min_new_tokens": new,
            "do_sample": False,
            "cache_implementation": "static",
            "pad_token_id": tok.pad_token_id,
        }
        start = time.perf_counter()
        model.generate(x, **options)  # the first call compiles (CUDA)
        first = time.perf_counter() - start
        model.generate(x, **options)
        sync()
        start = time.perf_counter()
        model.generate(x, **options)
        sync()
        seconds = time.perf_counter() - start
        result = {
            "batch": batch,
            "tok_per_s": batch * new / seconds,
            "ms_per_step": seconds / new * 1000,
            "first_call_s": first,
            "compiled": cuda,
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
