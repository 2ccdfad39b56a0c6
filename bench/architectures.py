"""Batched decoding per architecture on the CPU: 8 concurrent greedy requests against the same 8 one after
another, through the real scheduler and runner (no HTTP), on the architecture matrix's tiny models widened
to ``--hidden`` (issue 21's figure: at least 2x for the families that batch).

    python -m bench.architectures --hidden 256 deepseek_v3 stablelm falcon llama bloom
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from tests import test_architectures as matrix
from trioserve.model.runner import TransformersRunner
from trioserve.text.tokenization import ChatTokenizer

REQUESTS = [matrix.Arrival(0, matrix.greedy(f"r{i}", range(3 + i, 35 + i), 64)) for i in range(8)]


def measure(model_type: str, hidden: int) -> str:
    family = next(f for f in matrix.FAMILIES if f.model_type == model_type)
    config = matrix.tiny_config(family)
    config.hidden_size = hidden
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="eager").eval()
    runners = {
        size: TransformersRunner(
            model,
            ChatTokenizer(matrix.tokenizer()),
            model_id=model_type,
            max_batch_size=size,
            eos_token_ids=frozenset(),
            prefix_caching=False,
        )
        for size in (8, 1)
    }

    def run(size: int, arrivals: list[matrix.Arrival]) -> tuple[float, dict[str, list[int]]]:
        started = time.perf_counter()
        tokens = matrix.drive(runners[size], arrivals, prefill_whole=False)
        return time.perf_counter() - started, tokens

    run(8, REQUESTS[:2])  # warm-up
    together, batched = run(8, REQUESTS)
    alone, solo = 0.0, {}
    for arrival in REQUESTS:
        seconds, tokens = run(8, [arrival])
        alone += seconds
        solo.update(tokens)
    turns, one_per_pass = run(1, REQUESTS)
    return (
        f"{model_type:12s} batch {runners[8].max_batch_size}: 8 concurrent {together:.2f} s, one after another "
        f"{alone:.2f} s ({alone / together:.1f}x); 8 concurrent one per pass {turns:.2f} s; "
        f"same tokens: {batched == solo == one_per_pass}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("families", nargs="*", default=["deepseek_v3", "stablelm", "falcon", "llama", "bloom"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for model_type in args.families:
        print(measure(model_type, args.hidden), flush=True)


if __name__ == "__main__":
    main()
