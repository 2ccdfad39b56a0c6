"""The torch side, synchronous: loading a model, the runner (sequences, prefill, KV ownership, the
step), the KV arena and its attention wrapper, the static-shape decode pass and its CUDA graphs, and
the batched sampler; prompts with images for vision-language models (`vision`), and the offline tiny models
(`tinymodel`, `tinyvision`).

May import: torch, transformers, numpy, `trioserve.text`, and `config`, `errors`, `types`. Never trio:
it runs inside worker threads and is tested with a tiny real model and no event loop.
"""
