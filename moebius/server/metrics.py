"""Prometheus metrics with vLLM's names under the ``moebius:`` prefix, so dashboards built for
vLLM chart this server after a prefix rename; plus the layout, switch count, switch duration and
bytes moved by switches.

Each server owns its own ``CollectorRegistry`` (several apps may live in one test process).
Engine gauges are set by the engine thread after every step; request histograms are observed
by the request's coroutine when it ends.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


SWITCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAYOUTS = ("tp", "ep")


class ServerMetrics:
    """All metrics of one server, labelled with the served model name."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_model_len: int = 2**20) -> None:
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.running = Gauge(
            "moebius:num_requests_running", "Requests in the running batch.", m, registry=r
        )
        self.waiting = Gauge(
            "moebius:num_requests_waiting", "Requests waiting to run.", m, registry=r
        )
        self.kv_usage = Gauge(
            "moebius:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent.", m, registry=r
        )
        self.ttft = Histogram(
            "moebius:time_to_first_token_seconds",
            "Time to first token.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "moebius:inter_token_latency_seconds",
            "Time between tokens.",
            m,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "moebius:e2e_request_latency_seconds",
            "Request latency.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "moebius:request_queue_time_seconds",
            "Time from arrival to the first step that ran the request.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "moebius:prompt_tokens", "Prefilled prompt tokens.", m, registry=r
        )
        self.generation_tokens = Counter(
            "moebius:generation_tokens", "Generated tokens.", m, registry=r
        )
        tokens = _one_two_five(max_model_len)
        self.request_prompt_tokens = Histogram(
            "moebius:request_prompt_tokens", "Prompt tokens of each finished request.", m,
            buckets=tokens, registry=r,
        )
        self.request_generation_tokens = Histogram(
            "moebius:request_generation_tokens", "Tokens generated for each finished request.",
            m, buckets=tokens, registry=r,
        )
        self.prefill_time = Histogram(
            "moebius:request_prefill_time_seconds",
            "Time from the first step that ran the request to its first token.",
            m, buckets=E2E_BUCKETS, registry=r,
        )
        self.decode_time = Histogram(
            "moebius:request_decode_time_seconds",
            "Time from a finished request's first token to its last.",
            m, buckets=E2E_BUCKETS, registry=r,
        )
        self.preemptions = Counter(
            "moebius:num_preemptions", "Requests preempted (their KV dropped, recomputed).", m,
            registry=r,
        )
        self.prefix_queries = Counter(
            "moebius:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m,
            registry=r,
        )
        self.prefix_hits = Counter(
            "moebius:prefix_cache_hits", "Prompt tokens the prefix cache served.", m,
            registry=r,
        )
        self._seen = {"preemptions": 0, "prefix_cache_query_tokens": 0,
                      "prefix_cache_hit_tokens": 0}  # the engine's totals counted so far
        self.success = Counter(
            "moebius:request_success", "Finished requests.", m + ["finished_reason"], registry=r
        )
        self.layout = Gauge(
            "moebius:layout", "1 for the current layout, 0 otherwise.", m + ["layout"], registry=r
        )
        self.switches = Counter("moebius:switches", "Layout switches.", m, registry=r)
        self.switch_seconds = Histogram(
            "moebius:switch_duration_seconds",
            "Duration of a layout switch.",
            m,
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.switch_bytes = Counter(
            "moebius:switch_bytes", "Bytes moved by layout switches.", m + ["kind"], registry=r
        )
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        for kind in ("weights", "kv"):
            self.switch_bytes.labels(model_name, kind)
        self.switches.labels(model_name)
        for metric in (self.preemptions, self.prefix_queries, self.prefix_hits,
                       self.request_prompt_tokens, self.request_generation_tokens,
                       self.prefill_time, self.decode_time):
            metric.labels(model_name)  # present (at 0) before the first request

    def observe_engine(self, stats: dict) -> None:
        """Gauges from ``LLMEngine.stats()``."""
        name = self.model_name
        self.running.labels(name).set(stats["running"])
        self.waiting.labels(name).set(stats["waiting"])
        self.kv_usage.labels(name).set(stats["kv_usage"])
        for key, counter in (("preemptions", self.preemptions),
                             ("prefix_cache_query_tokens", self.prefix_queries),
                             ("prefix_cache_hit_tokens", self.prefix_hits)):
            if stats[key] > self._seen[key]:
                counter.labels(name).inc(stats[key] - self._seen[key])
                self._seen[key] = stats[key]
        for layout in LAYOUTS:
            self.layout.labels(name, layout).set(1 if stats["layout"] == layout else 0)

    def observe_switch(self, record) -> None:
        """One ``SwitchRecord``."""
        name = self.model_name
        self.switches.labels(name).inc()
        self.switch_seconds.labels(name).observe(record.seconds)
        self.switch_bytes.labels(name, "weights").inc(record.weight_bytes)
        self.switch_bytes.labels(name, "kv").inc(record.kv_bytes)

    def observe_first_token(self, ttft: float, queue_time: float, num_prompt_tokens: int) -> None:
        name = self.model_name
        self.ttft.labels(name).observe(ttft)
        self.queue_time.labels(name).observe(queue_time)
        self.prompt_tokens.labels(name).inc(num_prompt_tokens)

    def observe_tokens(self, num_tokens: int, seconds_since_last: float | None) -> None:
        """``num_tokens`` new tokens; the gap is spread over them for the ITL histogram."""
        name = self.model_name
        self.generation_tokens.labels(name).inc(num_tokens)
        if seconds_since_last is not None and num_tokens:
            for _ in range(num_tokens):
                self.itl.labels(name).observe(seconds_since_last / num_tokens)

    def observe_request(self, num_prompt: int, num_generated: int, prefill_s: float,
                        decode_s: float) -> None:
        """A request that finished (not aborted): its sizes and phases."""
        name = self.model_name
        self.request_prompt_tokens.labels(name).observe(num_prompt)
        self.request_generation_tokens.labels(name).observe(num_generated)
        self.prefill_time.labels(name).observe(prefill_s)
        self.decode_time.labels(name).observe(decode_s)

    def observe_finish(self, e2e: float, finish_reasons: list[str]) -> None:
        name = self.model_name
        self.e2e.labels(name).observe(e2e)
        for reason in finish_reasons:
            self.success.labels(name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
