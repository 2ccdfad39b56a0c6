"""Stored responses, for ``previous_response_id`` and ``GET /v1/responses/{id}``: in memory, bounded.

Each entry holds the response object and its whole conversation as chat messages (history, input,
output; never the ``instructions``, which OpenAI does not carry over to the next turn). Entries share the
message dicts of the turns before them, so a chain of n turns costs n references per entry, not copies.
The least recently used entry goes first once ``capacity`` is reached; nothing survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trioserve.api.responses.protocol import Response


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: Response
    conversation: tuple[dict[str, Any], ...]  # chat messages: what a follow-up continues from


class ResponseStore:
    """A least-recently-used map from response id to `StoredResponse`.

    Args:
        capacity: the most responses kept; 0 keeps none (``previous_response_id`` then always misses).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: Response, conversation: Sequence[dict[str, Any]]) -> None:
        if self.capacity == 0:
            return
        self._entries[response.id] = StoredResponse(response, tuple(conversation))
        self._entries.move_to_end(response.id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is not None:
            self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
