"""GET /metrics: Prometheus text exposition (prometheus-client).

Each app has its own CollectorRegistry (tests build many apps in one process). Request and
rejection counters are fed by the request-tracking middleware from the finished RequestRecord;
token counts, time to first token and decode speed by the generation observer; the per-model
gauges (queue depth, slots, load time, failure) and the loaded-model count are read from the
ModelHost at scrape time. With ``--instance-name`` every sample carries a ``replica`` label, so
one Prometheus can scrape a fleet of replicas (behind LiteLLM or nginx) and tell them apart
even when they sit behind one address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from llmserve.registry import ModelHost, ModelStatus
from llmserve.server.access import RequestRecord
from llmserve.server.state import AppState

# error code → rejection reason
REJECTION_REASONS = {
    "server_busy": "queue_full",
    "rate_limit_exceeded": "rate_limit",
    "invalid_api_key": "auth",
    "request_too_large": "too_large",
    "shutting_down": "shutting_down",
}
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 35.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)


class Metrics:
    def __init__(self, host: ModelHost, *, replica: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self._exposed: CollectorRegistry | _Labelled = (
            self.registry if replica is None else _Labelled(self.registry, {"replica": replica}))
        r = self.registry
        self.requests = Counter("llmserve_requests", "HTTP requests answered, by route and "
                                "status.", ["route", "status"], registry=r)
        self.rejections = Counter("llmserve_rejections", "Requests refused before any work, "
                                  "by reason.", ["reason"], registry=r)
        for reason in REJECTION_REASONS.values():
            self.rejections.labels(reason)
        self.prompt_tokens = Counter("llmserve_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("llmserve_completion_tokens", "Tokens generated.",
                                         ["model"], registry=r)
        self.ttft = Histogram("llmserve_time_to_first_token_seconds", "From the request's "
                              "arrival to its first generated token.", ["model"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.decode_rate = Histogram("llmserve_tokens_per_second", "Generation speed of one "
                                     "request after its first token.", ["model"],
                                     buckets=_RATE_BUCKETS, registry=r)
        r.register(_HostCollector(host))

    def observe_request(self, record: RequestRecord) -> None:
        status = record.status or 500
        self.requests.labels(record.route, str(status)).inc()
        reason = REJECTION_REASONS.get(record.error_code or "")
        if reason is not None and status >= 400:
            self.rejections.labels(reason).inc()

    def observe_generation(self, record: RequestRecord) -> None:
        model = record.model or "unknown"
        if record.prompt_tokens:
            self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.labels(model).inc(record.completion_tokens)
        if record.ttft is not None:
            self.ttft.labels(model).observe(record.ttft)
        if record.tokens_per_second is not None:
            self.decode_rate.labels(model).observe(record.tokens_per_second)

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


class _Labelled:
    """A registry seen through extra constant labels (prometheus-client has no such option)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._registry = registry
        self._labels = labels

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [s._replace(labels={**self._labels, **s.labels})
                                for s in metric.samples]
            yield labelled


class _HostCollector(Collector):
    """Per-model gauges, one sample per loaded model, read from the ModelHost at scrape time."""

    def __init__(self, host: ModelHost) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        loaded = [s for s in self._host.statuses() if s.state == "loaded"]
        gauges: list[tuple[GaugeMetricFamily, Callable[[ModelStatus], float]]] = [
            (GaugeMetricFamily("llmserve_queue_depth", "Requests waiting for a slot, by model.",
                               labels=["model"]), lambda s: s.queued),
            (GaugeMetricFamily("llmserve_slots_busy", "Slots generating now, by model.",
                               labels=["model"]), lambda s: s.slots_busy),
            (GaugeMetricFamily("llmserve_slots", "Slots of each loaded model (--parallel).",
                               labels=["model"]), lambda s: s.slots),
            (GaugeMetricFamily("llmserve_model_load_seconds", "How long loading each loaded "
                               "model took.", labels=["model"]),
             lambda s: s.info.load_seconds if s.info else 0.0),
            (GaugeMetricFamily("llmserve_model_failed", "1 while a loaded model's engine has "
                               "died (until it is reloaded).", labels=["model"]),
             lambda s: float(s.failed)),
        ]
        for family, value in gauges:
            for status in loaded:
                family.add_metric([status.spec.id], value(status))
            yield family
        yield GaugeMetricFamily("llmserve_loaded_models", "Models loaded now.", value=len(loaded))


async def metrics_endpoint(request: Request) -> Response:
    return Response(AppState.of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# /v1/metrics: seed 003's OpenAI-prefixed twin
routes = [Route("/metrics", metrics_endpoint, methods=["GET"]),
          Route("/v1/metrics", metrics_endpoint, methods=["GET"])]
