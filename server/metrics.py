"""`GET /metrics`: the server's counters in Prometheus' text format (prometheus-client).

Each app has its own `CollectorRegistry` (never the process-wide one), so several apps in one
process (tests, an app per port) count separately. Request counters and latency histograms are
recorded by the access log when a response ends; the engine's state (queue, batch, memory,
loads) is read when Prometheus scrapes, from plain values the engine thread publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match

from mlx_mistral.engine import Engine

PREFIX = "mlx_mistral_"
# Seconds: a warm prompt answers in milliseconds, a cold 7B load or a 32K prefill in a minute.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2)


class EngineCollector(Collector):
    """The engine's gauges and counters, read at scrape time (absent before it starts)."""

    def __init__(self, engine: Callable[[], Engine | None]):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None or engine.generator is None:
            return
        memory = engine.slot.memory_usage()
        for name, doc, value in (
            (
                "queue_depth",
                "Requests waiting to start (queued or held for memory).",
                engine.num_waiting,
            ),
            ("running_sequences", "Sequences being decoded.", engine.generator.num_sequences),
            ("kv_cache_bytes", "KV cache bytes held by running sequences.", memory["kv_bytes"]),
            (
                "prefix_cache_bytes",
                "Bytes of the in-memory prefix cache.",
                memory["prefix_cache_bytes"],
            ),
            (
                "weights_bytes",
                "Bytes of the loaded weights (0 when unloaded).",
                memory["weights_bytes"],
            ),
            (
                "model_loaded",
                "1 when the weights are in memory, 0 after an idle unload.",
                int(engine.loaded),
            ),
        ):
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        for name, doc, value in (
            (
                "prefix_cache_hit_tokens",
                "Prompt tokens whose KV came from the prefix cache.",
                engine.prefix_hit_tokens,
            ),
            (
                "draft_tokens_proposed",
                "Drafted tokens verified by speculative decoding (finished sequences).",
                engine.draft_tokens_proposed,
            ),
            (
                "draft_tokens_accepted",
                "Drafted tokens the model agreed with (finished sequences).",
                engine.draft_tokens_accepted,
            ),
            ("model_loads", "Times the weights were loaded.", engine.slot.loads),
            ("model_unloads", "Times the weights were freed after idling.", engine.slot.unloads),
        ):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class ServerMetrics:
    """The app's registry: what the access log records and what `/metrics` renders.

    Args:
        engine: returns the engine (None until it has started).
        routes: the app's routes, whose paths label the requests (others are "other", so a
            scanner's paths cannot grow the label set without bound).
    """

    def __init__(self, engine: Callable[[], Engine | None], routes: list[BaseRoute]):
        self.registry = CollectorRegistry()
        self._routes = routes
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of generations.", registry=self.registry
        )
        self.generated_tokens = Counter(
            PREFIX + "generated_tokens", "Tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From the request's arrival to its first token (a reload after idling included).",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.token_latency = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between a request's output tokens after its first.",
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine))

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge whose value `read()` gives at scrape time."""
        Gauge(PREFIX + name, doc, registry=self.registry).set_function(read)

    def endpoint(self, scope: dict[str, Any]) -> str:
        """The route path that serves `scope` ("/v1/models/{model:path}"), else "other"."""
        probe = {"type": "http", "path": scope.get("path", ""), "method": scope.get("method")}
        probe["root_path"] = ""
        for route in self._routes:
            if route.matches(probe)[0] is not Match.NONE:
                return getattr(route, "path", "other")
        return "other"

    def record(
        self, scope: dict[str, Any], status: int | None, stats: dict[str, Any], elapsed: float
    ) -> None:
        """Count one finished request (`elapsed` seconds long), with its tokens and latencies
        when it generated."""
        self.requests.labels(self.endpoint(scope), str(status or "none")).inc()
        if "prompt_tokens" not in stats:
            return
        completion = stats.get("completion_tokens", 0)
        self.prompt_tokens.inc(stats["prompt_tokens"])
        self.generated_tokens.inc(completion)
        ttft = stats.get("ttft")
        if ttft is None:
            return
        self.ttft.observe(ttft)
        if completion > 1:
            self.token_latency.observe(max(0.0, elapsed - ttft) / (completion - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics` (behind the API key like every path but /health)."""
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})
