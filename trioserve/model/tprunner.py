"""Tensor parallelism behind the `Runner` Protocol: rank 0's runner and the loop every other rank runs.

Every rank holds a `TransformersRunner` over its shard of the model (its share of the heads, so its share of
the KV arena) and runs the same forward passes; the transformers sharded layers do the collectives inside.
Rank 0 alone plans, samples and serves. Per step it broadcasts one small `Message` (`broadcast_object_list`):

* the plan (prefill chunks, decode rows);
* the releases since the last message, in the order the engine made them (prefix-cache LRU order depends on
  it), so a disconnect frees the sequence's KV on every rank before its next forward pass;
* the tokens rank 0 sampled in the last step: a follower never samples (seeded or grammar-constrained
  sampling would otherwise have to agree bit for bit); it feeds back rank 0's token, which it needs only in
  the next decode pass.

After each step the ranks all-gather their live sequence counts: rank 0 checks that every follower holds
exactly what it holds (a divergence fails the group rather than decoding garbage) and keeps the counts for
/metrics. While no step runs, a heartbeat message every `HEARTBEAT` seconds carries the releases that are
waiting, and keeps the followers' wait for the next message under the collectives' timeout.

Any exception in a collective or a step leaves the ranks out of step, so it breaks the group: the step fails
with `Unavailable`, every later step fails at once, and ``on_broken`` tells the server, which drains and exits
non-zero. A follower that raises exits, which fails rank 0's next collective.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trioserve.errors import Unavailable
from trioserve.model.ranks import Group, stopping
from trioserve.model.runner import TransformersRunner
from trioserve.model.sampling import SequenceSampler
from trioserve.text.tokenization import ChatTokenizer
from trioserve.types import (
    OutputSchema,
    PrefixCacheStats,
    SampledToken,
    StepOutput,
    StepPlan,
    TensorParallelStats,
)

logger = logging.getLogger(__name__)

HEARTBEAT = 1.0  # seconds without a message before rank 0 sends one (releases only)
# What clients are told; the cause (a rank's socket closed, a timeout, drift) goes to the server log.
BROKEN = "the tensor-parallel group failed (a rank died, hung or diverged); this server is shutting down"


@dataclass(frozen=True, slots=True)
class Message:
    """Rank 0 to every follower, once a step (or heartbeat)."""

    plan: StepPlan | None  # None: a heartbeat, no forward pass
    releases: tuple[int, ...] = ()
    sampled: tuple[tuple[int, int], ...] = ()  # (seq_id, token_id) rank 0 sampled in the last step
    stop: bool = False


class FollowerRunner(TransformersRunner):
    """A follower's runner: steps like rank 0's but samples nothing; its sequences take rank 0's tokens."""

    def _sample(self, logits: torch.Tensor, samplers: list[SequenceSampler]) -> list[SampledToken]:
        return [SampledToken(-1) for _ in samplers]  # replaced by rank 0's token before it is fed back

    def take_sampled(self, sampled: tuple[tuple[int, int], ...]) -> None:
        for seq_id, token_id in sampled:
            if (sequence := self._sequences.get(seq_id)) is not None:
                sequence.last_token = token_id


class _Channel:
    """The collectives rank 0 and its followers share: the message broadcast and the counts' all-gather."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.broadcast_seconds = 0.0  # time in the message broadcast, in all (for the metrics)
        self.gather_seconds = 0.0  # time in the counts' all-gather, in all
        self.broadcasts = 0

    def broadcast(self, message: Message | None) -> Message:
        if self.group.device.type == "cuda":
            # The current CUDA device is per thread: the engine's worker threads and the heartbeat start on GPU 0.
            torch.cuda.set_device(self.group.device)
        started = time.perf_counter()
        box: list[object] = [message]
        dist.broadcast_object_list(box, src=0, device=self.group.device)
        self.broadcast_seconds += time.perf_counter() - started
        self.broadcasts += 1
        received = box[0]
        assert isinstance(received, Message)
        return received

    def gather_counts(self, live: int) -> list[int]:
        started = time.perf_counter()
        mine = torch.tensor([live], dtype=torch.int64, device=self.group.device)
        counts = [torch.zeros_like(mine) for _ in range(self.group.size)]
        dist.all_gather(counts, mine)
        gathered = [int(count.item()) for count in counts]
        self.gather_seconds += time.perf_counter() - started
        return gathered


class TensorParallelRunner:
    """Rank 0's runner: the `Runner` Protocol over a `TransformersRunner`, keeping the followers in step.

    Args:
        inner: rank 0's own runner over its shard.
        group: the process group (rank 0).
    """

    def __init__(self, inner: TransformersRunner, group: Group) -> None:
        self.inner = inner
        self.group = group
        self.channel = _Channel(group)
        self.on_broken: Callable[[str], None] | None = None  # the server's: drain and exit non-zero
        self.broken: str | None = None
        self._live_by_rank = (0,) * group.size  # as of the last message
        self._collective = threading.Lock()  # one message at a time: a step's or the heartbeat's
        self._pending = threading.Lock()  # releases and the count they leave, against the heartbeat
        self._releases: list[int] = []
        self._sampled: tuple[tuple[int, int], ...] = ()
        self._last_message = time.monotonic()
        self._stopping = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True)
        self._heartbeat.start()

    # -- Runner Protocol --------------------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def max_context(self) -> int:
        return self.inner.max_context

    @property
    def max_batch_size(self) -> int:
        return self.inner.max_batch_size

    @property
    def prefill_whole(self) -> bool:
        return self.inner.prefill_whole

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.inner.eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self.inner.tokenizer

    def compile_grammar(self, spec: OutputSchema) -> str:
        return self.inner.compile_grammar(spec)

    def live_sequences(self) -> int:
        return self.inner.live_sequences()

    def kv_tokens(self) -> int:
        return self.inner.kv_tokens()

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.inner.prefix_cache_stats()

    def tensor_parallel_stats(self) -> TensorParallelStats:
        channel = self.channel
        return TensorParallelStats(
            self._live_by_rank, channel.broadcasts, channel.broadcast_seconds, channel.gather_seconds
        )

    def release(self, seq_id: int) -> None:
        with self._pending:
            self._releases.append(seq_id)  # an id the followers do not hold is ignored there too
            self.inner.release(seq_id)

    def step(self, plan: StepPlan) -> StepOutput:
        with self._collective:
            if self.broken is not None:
                raise Unavailable(BROKEN)
            try:
                with self._pending:
                    message = self._message(plan)
                self.channel.broadcast(message)
                output = self.inner.step(plan)
                self._sampled = tuple((seq_id, token.token_id) for seq_id, token in output.tokens.items())
                self._check_counts(self.inner.live_sequences())
            except Exception as exc:
                self._break(exc)
                raise Unavailable(BROKEN) from exc
            return output

    # -- the group --------------------------------------------------------------------------------------

    def close(self) -> bool:
        """Ends the heartbeat, then (if the group is whole) tells every follower to exit.

        Returns:
            Whether the followers were told (else they end when their collectives fail, or are ended).
        """
        self._stopping.set()
        self._heartbeat.join()
        with self._collective:
            if self.broken is None:
                try:
                    self.channel.broadcast(Message(None, stop=True))
                except Exception as exc:
                    logger.warning("could not stop the followers cleanly: %r", exc)
                else:
                    return True
        return False

    def _message(self, plan: StepPlan | None) -> Message:
        """The next message (holding ``_pending``): the releases since the last one, the last step's tokens."""
        releases, self._releases = tuple(self._releases), []
        sampled, self._sampled = self._sampled, ()
        self._last_message = time.monotonic()
        return Message(plan, releases, sampled)

    def _check_counts(self, live: int) -> None:
        counts = self.channel.gather_counts(live)
        self._live_by_rank = tuple(counts)
        if any(count != live for count in counts):
            raise RuntimeError(f"ranks disagree on the live sequences (by rank: {counts}): their state diverged")

    def _beat(self) -> None:
        while not self._stopping.wait(HEARTBEAT / 4):
            if time.monotonic() - self._last_message < HEARTBEAT or self.broken is not None:
                continue
            if not self._collective.acquire(blocking=False):
                continue  # a step is running: it is the message
            try:
                if self.broken is None and time.monotonic() - self._last_message >= HEARTBEAT:
                    with self._pending:  # the count must be the one these releases leave
                        message = self._message(None)
                        live = self.inner.live_sequences()
                    self.channel.broadcast(message)
                    self._check_counts(live)
            except Exception as exc:
                self._break(exc)
            finally:
                self._collective.release()

    def _break(self, exc: BaseException) -> None:
        if self.broken is not None:
            return
        self.broken = f"{type(exc).__name__}: {exc}".strip()
        logger.error("tensor-parallel group failed: %s", self.broken, exc_info=exc)
        if self.on_broken is not None:
            self.on_broken(self.broken)


def check_same_setup(runner: TransformersRunner, group: Group) -> None:
    """Every rank set up the same way (arena or own caches, batch size, prefix caching): the ranks' state must
    evolve alike, step by step. Runs on every rank after loading.

    Raises:
        RuntimeError: naming the ranks' setups.
    """
    mine = (runner.mode, runner.max_batch_size, runner.prefix_caching)
    setups: list[object] = [None] * group.size
    dist.all_gather_object(setups, mine)
    if any(setup != mine for setup in setups):
        raise RuntimeError(f"the ranks set up their runners differently: {setups}")


def follow(runner: FollowerRunner, group: Group) -> int:
    """A follower's whole life after loading: take each message, apply it, step, until rank 0 says stop.

    Returns:
        The process exit code: 0 after a stop message.

    Raises:
        Exception: a collective failed (rank 0 gone, a timeout) or a step raised; the process exits with it.
    """
    channel = _Channel(group)
    while True:
        message = channel.broadcast(None)
        if message.stop:
            logger.info("rank %d: stopped by rank 0", group.rank)
            stopping()
            return 0
        for seq_id in message.releases:
            runner.release(seq_id)
        runner.take_sampled(message.sampled)
        if message.plan is not None:
            runner.step(message.plan)
        channel.gather_counts(runner.live_sequences())
