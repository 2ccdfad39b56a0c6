"""Prometheus metrics: request histograms and counters, engine gauges read at scrape time.

Each app gets its own registry, so several servers (or tests) in one process never share series.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trioserve.api.serving import RequestTiming
from trioserve.engine.engine import Engine, RequestRecord
from trioserve.types import TensorParallelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ABORT_REASONS = ("disconnect", "stalled", "deadline", "drain", "error")
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineGauges(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        runner = engine.runner
        yield GaugeMetricFamily("trioserve_requests_running", "Requests holding a slot.", value=engine.running)
        yield GaugeMetricFamily("trioserve_requests_waiting", "Requests queued for a slot.", value=engine.waiting)
        yield GaugeMetricFamily(
            "trioserve_requests_held",
            "Requests holding a slot but not decoding: their clients have not read --max-unread-tokens tokens.",
            value=engine.held,
        )
        yield GaugeMetricFamily(
            "trioserve_kv_tokens",
            "Token positions held in KV caches (padding included).",
            value=runner.kv_tokens() if runner is not None else 0,
        )
        yield GaugeMetricFamily(
            "trioserve_live_sequences",
            "Sequences whose KV the runner holds.",
            value=runner.live_sequences() if runner is not None else 0,
        )
        yield from _tensor_parallel(runner)
        stats = runner.prefix_cache_stats() if runner is not None else None
        if stats is None:
            return
        for name, text, value in (
            ("queried_tokens", "Prompt tokens looked up in the prefix cache.", stats.queried_tokens),
            ("hit_tokens", "Prompt tokens found in the prefix cache (not prefilled again).", stats.hit_tokens),
            ("evictions", "Prefix-cache entries evicted (least recently used first).", stats.evictions),
        ):
            yield CounterMetricFamily(f"trioserve_prefix_cache_{name}", text, value=value)
        yield GaugeMetricFamily(
            "trioserve_prefix_cache_entries", "Finished requests' KV retained as cache.", value=stats.retained_entries
        )
        yield GaugeMetricFamily(
            "trioserve_prefix_cache_tokens", "Token positions retained as cache.", value=stats.retained_tokens
        )


def _tensor_parallel(runner: object) -> Iterable[Metric]:
    """A tensor-parallel runner's group: each rank's live sequences, rank 0's time in the per-step collectives."""
    read = getattr(runner, "tensor_parallel_stats", None)
    if read is None:
        return
    stats = read()
    assert isinstance(stats, TensorParallelStats)
    ranks = GaugeMetricFamily(
        "trioserve_rank_live_sequences",
        "Sequences whose KV each tensor-parallel rank holds, as of rank 0's last step or heartbeat.",
        labels=["rank"],
    )
    for rank, count in enumerate(stats.live_by_rank):
        ranks.add_metric([str(rank)], count)
    yield ranks
    yield CounterMetricFamily(
        "trioserve_tp_messages", "Messages rank 0 broadcast to the other ranks (steps and heartbeats).", stats.messages
    )
    for name, text, value in (
        ("broadcast", "Rank 0's time broadcasting each step's plan, releases and tokens.", stats.broadcast_seconds),
        ("gather", "Rank 0's time gathering the ranks' live sequence counts after each message.", stats.gather_seconds),
    ):
        yield CounterMetricFamily(f"trioserve_tp_{name}_seconds", text, value=value)


class Metrics:
    """The server's metrics. `record` is the engine's ``on_record`` hook; `finish` is called per request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "trioserve_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "trioserve_inter_token_latency_seconds", "Between consecutive tokens.", buckets=_FAST, registry=r
        )
        self.e2e = Histogram(
            "trioserve_request_duration_seconds", "Arrival to the end of the request.", buckets=_LATENCY, registry=r
        )
        self.queue = Histogram(
            "trioserve_queue_time_seconds", "Admission to the first forward pass.", buckets=_LATENCY, registry=r
        )
        self.release = Histogram(
            "trioserve_cancel_to_release_seconds",
            "From a request leaving before its end (cancel, deadline, error) to its KV being released.",
            buckets=_FAST,
            registry=r,
        )
        self.prompt_tokens = Counter("trioserve_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.completion_tokens = Counter("trioserve_completion_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("trioserve_requests", "Finished chat requests by HTTP status.", ["status"], registry=r)
        self.aborted = Counter("trioserve_aborted_requests", "Requests cut short, by reason.", ["reason"], registry=r)
        for reason in ABORT_REASONS:
            self.aborted.labels(reason)

    def watch(self, engine: Engine) -> None:
        self.registry.register(_EngineGauges(engine))

    def record(self, record: RequestRecord) -> None:
        """Engine hook: one call per request, once its KV is released."""
        self.queue.observe(record.queue_seconds)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.completion_tokens.inc(record.generated)
        if record.outcome in ("closed", "error"):
            self.release.observe(record.release_seconds)

    def finish(self, status: int, timing: RequestTiming | None, ended: float, abort_reason: str | None) -> None:
        self.requests.labels(str(status)).inc()
        if abort_reason is not None:
            self.aborted.labels(abort_reason).inc()
        if timing is None:
            return
        self.e2e.observe(ended - timing.arrived)
        if timing.first_token is not None:
            self.ttft.observe(timing.first_token - timing.arrived)
        for gap in timing.gaps:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
