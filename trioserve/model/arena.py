"""The KV arena: every attention layer's keys and values for every slot, allocated once at load.

Layout per layer: keys ``[slots, key_heads, max_len + 1, key_dim]`` and values ``[slots, value_heads, max_len + 1,
value_dim]``, in the model's dtype, on its device. Keys and values have their own shapes: multi-head latent
attention (DeepSeek-V2/V3, Kimi-K2) caches a compressed latent as "keys" and its rotary part as "values", one
head each, of different sizes; most models cache both with the same heads and size. A request
owns one slot (`KVArena.acquire`) from its first prefill chunk to its release; its token at position ``p``
lives in column ``p``. The last column is scratch: padding rows of a decode step write there, so they never
touch a real token. Nothing is concatenated, re-padded or copied per step: prefill builds the request's own
`DynamicCache` and `KVArena.store` copies it into the slot once; each decode step writes its one new key and
value per row in place (`ArenaCache.update`) and attends over the first ``length`` columns of the slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


@dataclass(frozen=True, slots=True)
class LayerShape:
    """What one attention layer keeps per token, learnt from a probe forward pass: whatever its cache layer was
    handed as keys and values (not necessarily what attention sees: MLA caches latents it expands later)."""

    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int
    sliding_window: int | None  # keys older than this many positions are never attended


def arena_layers(cache: DynamicCache) -> list[LayerShape] | None:
    """The arena layout of a model from a cache its forward pass filled, or None when some layer is not plain
    attention (linear attention, recurrent state, cross-attention...): such models keep their own caches."""
    shapes = []
    for layer in cache.layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            return None
        keys, values = _kv(layer)
        window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
        key_heads, key_dim = int(keys.shape[1]), int(keys.shape[3])
        shapes.append(LayerShape(key_heads, key_dim, int(values.shape[1]), int(values.shape[3]), window))
    return shapes or None


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ([batch, heads, tokens, size], each its own heads and size) of a filled attention layer."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


class KVArena:
    """Keys and values of every slot, and which slots are free (the lowest free slot is handed out first, so
    live slots stay packed at the front and a decode step covers as few rows as possible).

    Args:
        layers: one shape per attention layer, in layer order.
        slots: requests that can hold KV at once (the live region, which decode passes cover).
        max_len: tokens a slot holds (prompt plus output).
        dtype, device: the model's.
        cache_slots: more slots after the live region that only hold prefix-cache entries (no request owns
            one; `trioserve.model.prefixcache`).
    """

    def __init__(
        self,
        layers: list[LayerShape],
        *,
        slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        cache_slots: int = 0,
    ) -> None:
        self.layers = layers
        self.slots = slots
        self.cache_slots = cache_slots
        self.max_len = max_len
        self.scratch = max_len  # the column padding rows write to
        # Zeros, not empty: padding rows attend to column 0 of whatever slot they stand in, and uninitialised
        # memory may hold NaN bit patterns.
        rows, columns = slots + cache_slots, max_len + 1
        self.keys = [torch.zeros(rows, s.key_heads, columns, s.key_dim, dtype=dtype, device=device) for s in layers]
        self.values = [
            torch.zeros(rows, s.value_heads, columns, s.value_dim, dtype=dtype, device=device) for s in layers
        ]
        self._free = set(range(slots))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free(self) -> frozenset[int]:
        return frozenset(self._free)

    def acquire(self, slot: int | None = None) -> int:
        """The lowest free slot, or ``slot`` (which must be free).

        Raises:
            RuntimeError: every slot is taken (the scheduler admits at most ``slots`` sequences).
        """
        if not self._free:
            raise RuntimeError("no free KV slot: the scheduler admitted more sequences than the arena holds")
        slot = min(self._free) if slot is None else slot
        self._free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        """Frees a slot. Its old keys stay in memory and are overwritten by the next owner; a row attends only to
        its own first ``length`` columns, so another request reads them only as a prefix-cache hit, which the
        cache offers only while they are the tokens it recorded."""
        self._free.add(slot)

    def store(
        self, slot: int, cache: DynamicCache, row: int, length: int, start: int = 0, valid_from: Sequence[int] = ()
    ) -> tuple[int, ...]:
        """Copies row ``row`` of a prefill cache (``length`` real tokens, right-aligned: rows of a prompt group
        are left-padded) into ``slot``, columns ``[start, length)``: ``start > 0`` when columns ``[0, start)``
        already hold the prefix (a prefix-cache hit reused in place). A sliding layer's cache keeps only the
        last tokens of its window; they go to the columns they belong to, and the older ones are never attended.

        Returns:
            Per layer, the first column whose keys are now valid: ``valid_from`` (the slot's, before) where the
            write continues the columns already there, else where the write began.
        """
        valid = []
        for index, layer in enumerate(cache.layers):
            keys, values = _kv(layer)
            kept = int(keys.shape[2])
            begin = max(start, length - min(length, kept))
            count = length - begin
            self.keys[index][slot, :, begin:length] = keys[row, :, kept - count :]
            self.values[index][slot, :, begin:length] = values[row, :, kept - count :]
            before = valid_from[index] if valid_from else 0
            valid.append(before if begin == start else begin)
        return tuple(valid)

    def seed(self, cache: DynamicCache, slot: int, length: int) -> None:
        """Puts columns ``[0, length)`` of ``slot`` into an empty prefill cache, as if its forward pass had
        computed them (a prefix-cache hit: the prompt's prefill goes on from ``length``)."""
        for index in range(len(self.layers)):
            cache.update(
                self.keys[index][slot : slot + 1, :, :length], self.values[index][slot : slot + 1, :, :length], index
            )

    def copy(self, source: int, target: int, length: int) -> None:
        """Columns ``[0, length)`` of one slot into another, on the device (a prefix-cache entry moving)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]


class ArenaCache(Cache):
    """The transformers `Cache` a decode pass sees: row ``i`` of the batch is slot ``i``.

    ``update`` writes each row's new key and value at its column (``write_at``: the row's position, or the
    scratch column for padding rows) and hands attention the first ``columns`` columns of the first ``rows``
    slots, as views: no copy. Its tensors are fixed for its life, so a CUDA graph can capture passes over it.
    """

    def __init__(self, arena: KVArena, write_at: torch.Tensor, columns: int) -> None:
        super().__init__(layers=[])
        self._arena = arena
        self._write_at = write_at  # [rows], long
        self._rows = torch.arange(write_at.shape[0], device=write_at.device)
        self._columns = columns

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._arena.keys[layer_idx], self._arena.values[layer_idx]
        rows = self._rows.shape[0]
        # key_states: [rows, key_heads, 1, key_dim]; the indexed target is [rows, key_heads, key_dim] (values alike).
        keys[self._rows, :, self._write_at] = key_states[:, :, 0]
        values[self._rows, :, self._write_at] = value_states[:, :, 0]
        return keys[:rows, :, : self._columns], values[:rows, :, : self._columns]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Only reached by models that derive positions from the cache; we always pass position_ids.
        return 0

    @property
    def is_compileable(self) -> bool:
        return False
