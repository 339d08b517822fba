"""Prometheus metrics of the serving process, in a registry of their own (so nothing else leaks into `/metrics`).

Counters and histograms are updated as events happen; gauges (queue depth, running sequences, KV cells) are read from
each live engine's `stats()` at scrape time, so the scheduler pays nothing for them per step.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, make_asgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "sealbox_requests",
    "Generation requests by how they ended: stop, length, cancelled, error, or refused as overloaded (429), "
    "context_length or invalid (400).",
    ["model", "status"],
    registry=REGISTRY,
)
REJECTED = Counter(
    "sealbox_rejected_requests",
    "Requests refused by admission before any work: reason overloaded is a 429 with Retry-After.",
    ["model", "reason"],
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter("sealbox_prompt_tokens", "Prompt tokens of admitted requests.", ["model"], registry=REGISTRY)
PROMPT_TOKENS_REUSED = Counter(
    "sealbox_prompt_tokens_reused",
    "Prompt tokens found already in the KV cache (prefix reuse) and not computed again.",
    ["model"],
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter("sealbox_generated_tokens", "Completion tokens generated.", ["model"], registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram(
    "sealbox_time_to_first_token_seconds",
    "From submission (queueing included) to the first generated token.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    registry=REGISTRY,
)
INTER_TOKEN = Histogram(
    "sealbox_inter_token_seconds",
    "Time between consecutive tokens of one stream.",
    ["model"],
    buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
    registry=REGISTRY,
)


class EngineMetrics:
    """The metric children of one model, bound once so that the hot path skips the label lookup."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._requests: dict[str, Any] = {}
        self._rejected: dict[str, Any] = {}
        self.prompt_tokens = PROMPT_TOKENS.labels(model)
        self.prompt_tokens_reused = PROMPT_TOKENS_REUSED.labels(model)
        self.generated_tokens = GENERATED_TOKENS.labels(model)
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model)
        self.inter_token = INTER_TOKEN.labels(model)

    def finished(self, status: str) -> None:
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = REQUESTS.labels(self.model, status)
        child.inc()

    def rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = REJECTED.labels(self.model, reason)
        child.inc()
        self.finished(reason)


class _EngineGauges(Collector):
    def __init__(self) -> None:
        self._sources: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def track(self, model: str, engine: Any) -> None:
        self._sources[model] = engine

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = {
            "queue": GaugeMetricFamily("sealbox_queue_depth", "Requests waiting for admission.", labels=["model"]),
            "running": GaugeMetricFamily(
                "sealbox_running_sequences", "Sequences serving a request now.", labels=["model"]
            ),
            "sequences": GaugeMetricFamily(
                "sealbox_sequences_total", "Sequences the context was built for.", labels=["model"]
            ),
            "used": GaugeMetricFamily(
                "sealbox_kv_cells_used", "KV cells holding tokens of running requests.", labels=["model"]
            ),
            "total": GaugeMetricFamily("sealbox_kv_cells_total", "KV cells of the context.", labels=["model"]),
        }
        for model, engine in list(self._sources.items()):
            stats = engine.stats()  # an `EngineStats` (the engine imports metrics, not the other way round)
            families["queue"].add_metric([model], stats.queued)
            families["running"].add_metric([model], stats.running)
            families["sequences"].add_metric([model], stats.sequences_total)
            families["used"].add_metric([model], stats.kv_cells_used)
            families["total"].add_metric([model], stats.kv_cells_total)
        return families.values()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


_GAUGES = _EngineGauges()
REGISTRY.register(_GAUGES)


def track_engine(model: str, engine: Any) -> None:
    """Report `engine.stats()` as gauges labelled `model` while the engine lives (held weakly)."""
    _GAUGES.track(model, engine)


def render_latest() -> tuple[bytes, str]:
    """The exposition body and its content type, for a `GET /metrics` handler."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metrics_app() -> Callable[..., Any]:
    """An ASGI app serving the registry, to mount at `/metrics`."""
    return make_asgi_app(registry=REGISTRY)


HTTP_RESPONSES = Counter(
    "sealbox_http_responses",
    "API responses by endpoint and HTTP status (401s and 429s included).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
