"""A real Hypercorn on loopback, served from a thread with its own trio loop.

For tests whose clients block or run their own event loop (the agent frameworks run asyncio): the test
itself is synchronous, and one server can last a whole module (a module-scoped fixture), which trio-mode
async fixtures cannot.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

from tests.servers import Served, demo_app, serve_on_loopback
from trioserve.app import TrioserveApp
from trioserve.cli import build_app
from trioserve.config import Settings
from trioserve.runner import TransformersRunner
from trioserve.tinymodel import CHATML_TEMPLATE, build_model, build_tokenizer
from trioserve.tokenization import ChatTokenizer

MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
# R1-style: the assistant turn opens the thinking block, so the output starts inside it; with
# enable_thinking false it is rendered empty and closed (as Qwen3's template does).
THINKING_TEMPLATE = CHATML_TEMPLATE.replace(
    _PROMPT,
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}",
)
assert THINKING_TEMPLATE != CHATML_TEMPLATE


def marker_app(thinking: bool = False) -> TrioserveApp:
    """The demo app, its tokenizer with `MARKERS` as single added tokens (as Qwen's tokenizers have them),
    so one ``logit_bias`` can make the model start a call; ``thinking``: a template that opens a thinking
    block. (tests/toolmodel.py on the tools branch builds the same models.)"""

    def load() -> TransformersRunner:
        tokenizer = build_tokenizer()
        tokenizer.add_tokens(MARKERS)
        if thinking:
            tokenizer.chat_template = THINKING_TEMPLATE
        model = build_model(tokenizer)
        eos = frozenset(int(i) for i in model.generation_config.eos_token_id)
        return TransformersRunner(
            model, ChatTokenizer(tokenizer), model_id="tiny-tools", max_batch_size=8, eos_token_ids=eos
        )

    return build_app(Settings(hotload=True, prefill_chunk=64, max_concurrent=8, max_queue=64), load=load)


thinking_app = functools.partial(marker_app, thinking=True)


@contextmanager
def served_in_thread(app: Callable[[], TrioserveApp] | None = None, **settings: Any) -> Iterator[Served]:
    """``app()`` (default: the demo app, ``settings`` as for `demo_app`) behind Hypercorn on loopback, until
    the block ends."""
    ready: queue.Queue[tuple[Served, trio.lowlevel.TrioToken, trio.CancelScope] | BaseException] = queue.Queue()

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with serve_on_loopback(app() if app is not None else demo_app(**settings)) as served:
                ready.put((served, trio.lowlevel.current_trio_token(), scope))
                await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the waiting test rather than lost in the thread
            ready.put(exc)

    thread = threading.Thread(target=run, name="trioserve-test-server", daemon=True)
    thread.start()
    started = ready.get(timeout=120)
    if isinstance(started, BaseException):
        raise RuntimeError("the test server did not start") from started
    served, token, scope = started
    try:
        yield served
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=30)
