"""What "its KV is released" means, checked where the KV lives: the runner's sequences and the arena's slots.

The runner's bookkeeping alone cannot show a leaked slot: a `release` that forgets the sequence but never
hands its slot back to the arena passes `live_sequences() == 0`, and in arena mode no `DynamicCache` outlives
its prefill whatever happens, so counting caches cannot fail either.
"""

from __future__ import annotations

from trioserve.engine.engine import Engine
from trioserve.model.runner import TransformersRunner


def assert_kv_released(engine: Engine) -> None:
    """Nothing generating, no sequence in the runner, and (in arena mode) every arena slot free."""
    runner = engine.runner
    assert engine.active == 0, engine.active
    assert runner is not None and runner.live_sequences() == 0, runner
    assert isinstance(runner, TransformersRunner) and runner.arena is not None, "arena mode expected"
    assert runner.arena.free_slots == runner.arena.slots, (runner.arena.free_slots, runner.arena.slots)
