"""The benchmark's model: a random-weight Llama of a 115M-parameter shape (SmolLM-135M's layout with a
16k vocabulary), built once and cached as a local `from_pretrained` directory under bench/cache/."""

from __future__ import annotations

from pathlib import Path

from trioserve.model.tinymodel import save_tiny_model

CACHE = Path(__file__).parent / "cache"
SHAPE = {
    "hidden_size": 576,
    "num_layers": 30,
    "num_heads": 9,
    "num_kv_heads": 3,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "initializer_range": 0.02,
}
VOCAB = 16384


# For --tensor-parallel-size: SmolLM's 9 heads and 3 KV heads divide by no size but 3 and 9, so the sharded
# benchmark uses the same width in 12 heads and 4 KV heads (sizes 2 and 4 work).
SHARDABLE = {"num_heads": 12, "num_kv_heads": 4}


def bench_model_dir(positions: int = 2048, *, shardable: bool = False) -> Path:
    """Builds the model on first use (about 10 s), then reuses it; ``positions``: its context (the multi-turn
    trace needs more than the default); ``shardable``: the `SHARDABLE` heads, for tensor parallelism."""
    name = "llama-115m-random" + ("" if positions == 2048 else f"-{positions}") + ("-12h" if shardable else "")
    path = CACHE / name
    if not (path / "config.json").exists():
        shape = SHAPE | {"max_position_embeddings": positions} | (SHARDABLE if shardable else {})
        save_tiny_model(path, vocab_size=VOCAB, **shape)
    return path
