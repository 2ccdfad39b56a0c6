"""The decode pass over the KV arena: static shapes, persistent buffers, and CUDA graphs where there is CUDA.

A pass covers the first ``rows`` slots (a batch bucket: 1, 2, 4, 8, ... up to the slot count) and the first
``columns`` arena columns (a length bucket: 64, 128, 256, ... up to the arena's length). Row ``i`` is slot
``i``; slots that are free, or whose request is still prefilling, ride along as padding rows: token 0 at
position 0, writing to the scratch column, their logits ignored. Every input lives in a buffer allocated
once (token ids, positions, write columns) and the logits land in one, so a pass is "fill the buffers,
run, read the logits": on CUDA the run is the replay of a CUDA graph captured at startup for each
(rows, columns) bucket (one Python call a step, the GIL free for the event loop while the GPU works); on the
CPU it is the same forward pass run eagerly over the same buffers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trioserve.model.arena import ArenaCache, KVArena
from trioserve.model.attention import MASKS_KWARG, DecodeMasks

logger = logging.getLogger(__name__)

MIN_COLUMNS = 64


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit`` itself."""
    sizes = []
    size = start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket_of(sizes: Sequence[int], need: int) -> int:
    """The smallest size that holds ``need``."""
    for size in sizes:
        if size >= need:
            return size
    raise ValueError(f"{need} exceeds the largest bucket {sizes[-1]}")


class DecodeStep:
    """Decode passes of ``model`` over ``arena``, one token per row.

    Args:
        model: the transformers model, already switched to arena attention.
        arena: the KV arena its attention layers read and write.
        cache_kwarg: the forward argument that takes a cache (``cache`` or ``past_key_values``).
        additive_masks: the model attends eagerly (float masks) rather than with SDPA (boolean masks).
    """

    def __init__(self, model: Any, arena: KVArena, *, cache_kwarg: str, additive_masks: bool) -> None:
        self._model = model
        self._arena = arena
        self._cache_kwarg = cache_kwarg
        self._additive = additive_masks
        self.row_buckets = buckets(arena.slots)
        self.column_buckets = buckets(arena.max_len, min(MIN_COLUMNS, arena.max_len))
        device = arena.keys[0].device
        slots = arena.slots
        # ids, positions, write columns, rotary positions (the position plus a per-sequence offset, for models
        # with multi-axis rotary positions after an image): one host->device copy per pass fills all four.
        self._inputs = torch.zeros(4, slots, dtype=torch.long, device=device)
        self._host = torch.zeros(4, slots, dtype=torch.long, pin_memory=device.type == "cuda")
        vocab = int(model.config.get_text_config().vocab_size)
        self._logits = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self._windows = [shape.sliding_window for shape in arena.layers]
        self._graphs: dict[tuple[int, int], Callable[[], None]] = {}
        self.captured = False
        self.capture_seconds = 0.0
        self.masks_seen = 0  # attention calls of the last pass that used the arena masks

    def run(
        self,
        slots: Sequence[int],
        tokens: Sequence[int],
        positions: Sequence[int],
        rope_offsets: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One decode pass: ``tokens[i]`` enters at ``positions[i]`` of slot ``slots[i]`` (its rotary position
        shifted by ``rope_offsets[i]``, if given); returns the float32 logits of those rows, in that order
        ([len(slots), vocab], on the model's device)."""
        rows = bucket_of(self.row_buckets, max(slots) + 1)
        # Graphs need a fixed set of shapes; an eager pass attends over exactly the columns in use.
        need = max(positions) + 1
        columns = bucket_of(self.column_buckets, need) if self.captured else need
        host = self._host
        host[:2].zero_()  # padding rows: token 0 at position 0 ...
        host[3].zero_()
        host[2].fill_(self._arena.scratch)  # ... writing to the scratch column
        index = torch.tensor(slots, dtype=torch.long)
        host[0, index] = torch.tensor(tokens, dtype=torch.long)
        host[1, index] = host[2, index] = host[3, index] = torch.tensor(positions, dtype=torch.long)
        if rope_offsets is not None:
            host[3, index] += torch.tensor(rope_offsets, dtype=torch.long)
        self._inputs.copy_(host, non_blocking=True)  # whole buffers: one small contiguous copy
        self._pass(rows, columns)()
        logits = self._logits[:rows]
        if list(slots) == list(range(rows)):
            return logits
        return logits.index_select(0, index.to(logits.device))

    def drop_graphs(self) -> None:
        """Back to eager passes (a capture failed)."""
        self._graphs.clear()
        self.captured = False

    def _pass(self, rows: int, columns: int) -> Callable[[], None]:
        if self.captured:
            return self._graphs[rows, columns]
        return lambda: self._forward(rows, columns)

    def _forward(self, rows: int, columns: int) -> None:
        """The pass itself, reading only the persistent buffers and writing only the logits buffer."""
        ids, positions, write_at = self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows]
        rotary = self._inputs[3, :rows]
        masks = DecodeMasks(positions, columns, self._windows, additive=self._additive)
        cache = ArenaCache(self._arena, write_at, columns)
        out = self._model(
            input_ids=ids[:, None],
            position_ids=rotary[:, None],
            # A 4-D mask makes transformers skip building its own; the wrapper swaps in each layer's.
            attention_mask=masks.mask(None, self._arena.keys[0].dtype),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache, MASKS_KWARG: masks},
        )
        self._logits[:rows].copy_(out.logits[:, -1, :])
        self.masks_seen = masks.calls

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every (rows, columns) bucket as a CUDA graph, largest first so the smaller graphs reuse its
        memory pool; from then on every pass is a replay."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._inputs[2].fill_(self._arena.scratch)  # warm-up and capture passes write only scratch columns
        for rows in reversed(self.row_buckets):
            for columns in reversed(self.column_buckets):
                side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._forward(rows, columns)  # warm-up: lazy initialisations happen outside the graph
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(rows, columns)
                self._graphs[rows, columns] = graph.replay
        torch.cuda.synchronize()
        self.captured = True
        self.capture_seconds = time.perf_counter() - started
        logger.info(
            "captured %d CUDA graphs of the decode pass (rows %s x columns %s) in %.2f s",
            len(self._graphs),
            self.row_buckets,
            self.column_buckets,
            self.capture_seconds,
        )
