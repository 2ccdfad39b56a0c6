"""Prefix caching: which arena slots hold whose tokens' keys and values, and which new prompt can reuse them.

A request owns its slot from its first prefill chunk to its release, as without caching. What stays
behind in the slot afterwards is an *entry* of this cache: the token ids whose KV the slot holds (prompt
and generated tokens, columns ``[0, len)``), the tenant scope it was computed for, and when it was last
used. Entries live only in memory allocated at load: the arena's own slots while no request needs them,
plus optional cache-only slots (``--prefix-cache-slots``) that no request ever owns. Nothing grows.

A new sequence asks `PrefixCache.lookup` for the longest common token prefix among the entries of its
scope (token-granular, capped at its prompt length - 1 so the last prompt token is computed and gives
the logits). Live sequences' slots are entries too (read-only sources: ``n > 1`` choices, conversations
that share a system prompt). The runner then takes a slot (`take_slot`): the hit's own slot, in place,
when it is a retained slot of the live region; otherwise a slot with no entry, or the least recently
used retained one (moved to a cache-only slot when there are some, evicting that region's LRU entry).

Sliding-window layers: a slot's sliding layers hold only the last ``window - 1`` keys of each prefill
(`KVArena.store`), so a hit must end late enough that every key it needs is still there. Each entry
records, per layer, the first column whose keys are valid (``valid_from``); a hit of length ``L`` is
usable only when ``L - window + 1 >= valid_from`` on every sliding layer that lost keys (`Entry.floor`).
A shorter hit would need keys the slot no longer holds, so it is not offered (exactness first).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy

from trioserve.types import PrefixCacheStats


@dataclass(eq=False)
class Entry:
    """The tokens whose KV one slot holds, in columns ``[0, len(prompt) + len(fed))``.

    ``fed`` is shared with the owning sequence, which appends each generated token once its KV is written,
    so a live entry grows without copies. ``owner`` is the sequence using the slot (None: retained, free).
    """

    slot: int
    scope: str
    prompt: numpy.ndarray  # int64 token ids
    fed: list[int]
    valid_from: tuple[int, ...]  # per layer: the first column with valid keys (sliding layers lose old ones)
    floor: int  # the shortest usable hit (0: any)
    owner: int | None = None
    used: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.fed)

    def common_prefix(self, prompt: numpy.ndarray) -> int:
        """How many leading tokens ``prompt`` shares with this entry."""
        own = self.prompt
        n = min(len(own), len(prompt))
        differ = numpy.flatnonzero(own[:n] != prompt[:n])
        if len(differ):
            return int(differ[0])
        # The whole stored prompt matches: go on through the generated tokens (a short Python loop).
        matched = n
        for token in self.fed:
            if matched >= len(prompt) or prompt[matched] != token:
                break
            matched += 1
        return matched


@dataclass(frozen=True, slots=True)
class Hit:
    """A usable prefix: ``length`` tokens whose KV is in ``slot``."""

    slot: int
    length: int
    retained: bool  # the slot is free (no owner): the new sequence may take it in place


def _whole(length: int) -> int:
    return length


def floor_of(valid_from: Sequence[int], windows: Sequence[int | None]) -> int:
    """The shortest hit whose sliding-window keys are all still held (see the module docstring)."""
    need = [start + window - 1 for start, window in zip(valid_from, windows, strict=True) if window and start > 0]
    return max(need, default=0)


@dataclass
class PrefixCache:
    """Entries by slot, the live region's free slots, LRU order, and counters.

    Args:
        live_slots: slots ``[0, live_slots)`` that sequences own (the decode pass covers them).
        cache_slots: slots ``[live_slots, live_slots + cache_slots)`` that only hold retained entries.
        windows: each layer's sliding window (None: full attention), in arena layer order.
    """

    live_slots: int
    cache_slots: int
    windows: tuple[int | None, ...]
    entries: dict[int, Entry] = field(default_factory=dict)
    queried_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    _ticks: itertools.count[int] = field(default_factory=itertools.count)

    def lookup(self, scope: str, prompt: numpy.ndarray, usable: Callable[[int], int] = _whole) -> Hit | None:
        """The longest usable cached prefix of ``prompt`` within ``scope`` (at most ``len(prompt) - 1``), counted
        in the statistics and marking its entry used. ``usable``: how much of a common prefix of a given length
        the prompt can start from (a prompt with images cannot start inside them)."""
        self.queried_tokens += len(prompt)
        best = self._best(scope, prompt, usable)
        if best is None:
            return None
        hit, entry = best
        entry.used = next(self._ticks)
        self.hit_tokens += hit.length
        return hit

    def peek(self, scope: str, prompt: numpy.ndarray, usable: Callable[[int], int] = _whole) -> int:
        """The length `lookup` would find, changing nothing."""
        best = self._best(scope, prompt, usable)
        return best[0].length if best is not None else 0

    def _best(self, scope: str, prompt: numpy.ndarray, usable: Callable[[int], int]) -> tuple[Hit, Entry] | None:
        best: tuple[Hit, Entry] | None = None
        limit = len(prompt) - 1
        for entry in self.entries.values():
            if entry.scope != scope:
                continue
            length = usable(min(entry.common_prefix(prompt), limit))
            if length <= 0 or length < entry.floor:
                continue
            # Prefer the longer hit; between equal ones, a retained live-region slot (no copy).
            retained = entry.owner is None and entry.slot < self.live_slots
            if (
                best is None
                or length > best[0].length
                or (length == best[0].length and retained and not best[0].retained)
            ):
                best = Hit(entry.slot, length, retained), entry
        return best

    def take_slot(self, free: Sequence[int], owner: int, hit: Hit | None) -> tuple[int, list[tuple[int, int, int]]]:
        """A live-region slot for a new sequence, from the arena's ``free`` slots: the hit's own slot when it is a
        retained one (in place), else the lowest free slot (live slots stay packed at the front, so a decode
        pass covers few rows), whose entry, if any, moves out of the way: to the highest empty free slot, else
        over the least recently used retained entry, which goes to the cache-only region or is evicted.

        Returns:
            The slot, and the copies ``(from_slot, to_slot, tokens)`` the caller must make first, in order.
        """
        if hit is not None and hit.retained:
            self.entries[hit.slot].owner = owner
            return hit.slot, []
        slot = min(free)
        entry = self.entries.pop(slot, None)
        if entry is None:
            return slot, []
        others = [s for s in free if s != slot]
        empty = [s for s in others if s not in self.entries]
        moves: list[tuple[int, int, int]] = []
        if empty:
            target = max(empty)
        else:
            target = min(others, key=lambda s: self.entries[s].used, default=slot)
            if target == slot or self.entries[target].used > entry.used:
                moves += self._demote(entry)  # this entry is the least recently used one
                return slot, moves
            moves += self._demote(self.entries.pop(target))
        moves.append((slot, target, entry.length))
        entry.slot = target
        self.entries[target] = entry
        return slot, moves

    def _demote(self, entry: Entry) -> list[tuple[int, int, int]]:
        """An entry leaving the live region: to a cache-only slot (evicting that region's least recently used
        entry when it is full) if there are any, else evicted. Returns the copy to make."""
        if self.cache_slots == 0:
            self.evictions += 1
            return []
        region = range(self.live_slots, self.live_slots + self.cache_slots)
        empty = [slot for slot in region if slot not in self.entries]
        if empty:
            target = empty[0]
        else:
            target = min(region, key=lambda s: self.entries[s].used)
            if self.entries[target].used > entry.used:
                self.evictions += 1  # older than everything the region holds
                return []
            del self.entries[target]
            self.evictions += 1
        move = (entry.slot, target, entry.length)
        entry.slot = target
        self.entries[target] = entry
        return [move]

    def stored(
        self, slot: int, scope: str, prompt: numpy.ndarray, fed: list[int], valid_from: tuple[int, ...], owner: int
    ) -> None:
        """A sequence's prompt is now in ``slot``: the slot's entry becomes its (replacing what was there)."""
        floor = floor_of(valid_from, self.windows)
        self.entries[slot] = Entry(slot, scope, prompt, fed, valid_from, floor, owner, next(self._ticks))

    def released(self, slot: int, owner: int) -> None:
        """The owner of ``slot`` is gone: its entry (if it stored one, or the one it took in place) is retained."""
        entry = self.entries.get(slot)
        if entry is not None and entry.owner == owner:
            entry.owner = None
            entry.fed = list(entry.fed)  # a snapshot: the sequence is gone
            entry.used = next(self._ticks)

    def drop(self, slot: int) -> None:
        """Forgets ``slot``'s entry (its keys are about to be overwritten by something it does not describe)."""
        self.entries.pop(slot, None)

    def stats(self) -> PrefixCacheStats:
        # list() copies in one step under the GIL: a scrape may run while a step changes the entries.
        retained = [e for e in list(self.entries.values()) if e.owner is None]
        return PrefixCacheStats(
            queried_tokens=self.queried_tokens,
            hit_tokens=self.hit_tokens,
            evictions=self.evictions,
            retained_entries=len(retained),
            retained_tokens=sum(e.length for e in retained),
        )
