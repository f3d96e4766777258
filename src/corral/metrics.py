"""Every Prometheus metric corral exports, on one explicit registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

if TYPE_CHECKING:
    from corral.exposition import HostMetrics

# Request latency spans milliseconds (embeddings) to minutes (long generations, cold loads).
# The *_created series double every counter's output and no dashboard needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The metric families; label values stay bounded (backend ids, routes, known models)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # serve --workers: /metrics answers for every worker on the host (None: this process).
        self.host: HostMetrics | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._model_labels: set[str] = set()
        self._requests: dict[tuple[str | None, str, str, int], tuple[Any, ...]] = {}
        r = self.registry
        self.requests = Counter(
            "corral_requests",
            "Proxied requests by backend, route, model and status code.",
            ["backend", "route", "model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "corral_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["backend", "route"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "Time from request to the first response byte from the backend.",
            ["backend", "route"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "corral_tokens_generated",
            "Tokens generated, from Ollama's eval_count (OpenAI usage.completion_tokens).",
            ["backend", "model"],
            registry=r,
        )
        self.backend_up = Gauge(
            "corral_backend_up",
            "1 when the backend takes requests, else 0.",
            ["backend"],
            registry=r,
        )
        self.transitions = Counter(
            "corral_backend_health_transitions",
            "Health state changes per backend (to: up, down, ejected).",
            ["backend", "to"],
            registry=r,
        )
        self.retries = Counter(
            "corral_retries",
            "Requests retried on another backend, by reason.",
            ["reason"],
            registry=r,
        )
        self.strategy_info = Gauge(
            "corral_strategy_info", "The active strategy (value 1).", ["strategy"], registry=r
        )
        self.queue_depth = Gauge(
            "corral_queue_depth", "Requests waiting for a free slot.", ["priority"], registry=r
        )
        self.rejections = Counter(
            "corral_rejections",
            "Requests answered 503 without a backend, by reason "
            "(queue_full, queue_timeout, draining, no_backend).",
            ["reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds",
            "Time requests waited for a free slot.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )

        self.gpu_poll_errors = Counter(
            "corral_gpu_poll_errors",
            "GPU reads that failed (source: nvml, dcgm); each is retried next poll.",
            ["source"],
            registry=r,
        )
        self.gpu_events = Counter(
            "corral_gpu_events",
            "GPU episodes: hot (at or over gpu.max_temp_c), underutilized (under 50% busy "
            "while requests are in flight on it).",
            [*GPU_LABELS, "event"],
            registry=r,
        )
        self.cold_loads = Counter(
            "corral_cold_loads",
            "Requests sent to a backend that did not hold their model (it loads it first).",
            ["backend"],
            registry=r,
        )
        self.cold_loads_avoided = Counter(
            "corral_cold_loads_avoided",
            "Requests kept on a backend holding their model while another eligible one did not.",
            ["backend"],
            registry=r,
        )
        self.context_reloads = Counter(
            "corral_context_reloads",
            "Requests sent to a backend whose runner of their model has another context length "
            "than their options.num_ctx (Ollama reloads the model for them).",
            ["backend"],
            registry=r,
        )
        self.context_reloads_avoided = Counter(
            "corral_context_reloads_avoided",
            "Requests sent to a runner with their num_ctx while another eligible backend's "
            "runner of the model had another context length.",
            ["backend"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens",
            "Prompt tokens of completed requests, from Ollama's prompt_eval_count "
            "(OpenAI usage.prompt_tokens).",
            ["backend"],
            registry=r,
        )
        self.prompt_tokens_cached = Counter(
            "corral_prompt_tokens_cached",
            "Prompt tokens read from the backend's prompt cache instead of computed, from "
            "Ollama's prompt_eval_cached_count (OpenAI usage.prompt_tokens_details.cached_tokens)"
            ": divided by corral_prompt_tokens_total, the prompt-cache hit share.",
            ["backend"],
            registry=r,
        )
        self.placement_actions = Counter(
            "corral_placement_actions",
            "Model placement changes per backend by action: preload, keep_warm, unload, evict "
            "(unloaded to make room for a priority model), gpu, cpu; error counts failed "
            "actions and failed placement passes.",
            ["action", "backend"],
            registry=r,
        )
        self.replays = Counter(
            "corral_model_replays",
            "Fleet-wide pull, delete and copy operations replayed on a backend that missed "
            "them (down, draining, failed), by outcome: done, failed (tried again later), "
            "abandoned (given up).",
            ["backend", "action", "outcome"],
            registry=r,
        )
        self.replays_pending = Gauge(
            "corral_model_replays_pending",
            "Fleet-wide model operations a backend still owes (replayed once it is available).",
            ["backend"],
            registry=r,
        )
        self.edge_refusals = Counter(
            "corral_edge_refusals",
            "Requests or connections corral refused at the edge, by reason: host, origin, "
            "cross_site, header_timeout, body_timeout, headers_too_large, too_many_headers, "
            "max_connections, buffered_bytes.",
            ["reason"],
            registry=r,
        )
        self.open_connections = Gauge(
            "corral_open_connections",
            "Client connections open now (server.max_connections caps them).",
            registry=r,
        )
        self.backend_malformed = Counter(
            "corral_backend_malformed",
            "Backend answers corral could not use, by reason: malformed_http (a bad status "
            "or header line), too_large (a body over corral's cap), bad_entry (a model list "
            "entry or version that does not parse; skipped), redirect (a 3xx).",
            ["backend", "reason"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "corral_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every 0.05 s): every request waits this.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self._gpu_source: Callable[[], Sequence[tuple[tuple[str, ...], Any]]] | None = None
        r.register(_GpuCollector(self))
        self._slot_source: Callable[[], Iterable[tuple[str, int, int]]] | None = None
        r.register(_SlotCollector(self))

    def watch_slots(self, source: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Export the slot gauges from ``source()``: (backend, in flight, max_concurrent) each,
        read at scrape time (nothing to update per request)."""
        self._slot_source = source

    def watch_gpus(self, source: Callable[[], Sequence[tuple[tuple[str, ...], Any]]]) -> None:
        """Export ``corral_gpu_*`` gauges from ``source()``: (labels, reading) per GPU."""
        self._gpu_source = source

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: label look-ups are a real cost per request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def model_label(self, model_key: str | None, known: bool, cloud: bool) -> str:
        """The ``model`` label value of a request: its canonical name when some backend lists
        it, within :data:`MAX_MODEL_LABELS` distinct names (a backend listing 100,000 models
        must not make as many series); else "cloud" for a cloud model, or "other"."""
        labels = self._model_labels
        if known and model_key is not None:
            if model_key in labels:
                return model_key
            if len(labels) < MAX_MODEL_LABELS:
                labels.add(model_key)
                return model_key
        return "cloud" if cloud else "other"

    def observe_request(
        self,
        backend: str | None,
        route: str,
        model: str,
        status: int,
        duration_s: float,
        ttft_s: float | None,
        tokens: int,
    ) -> None:
        """One routed request's series (``model`` already bounded: a known name or "other")."""
        key = (backend, route, model, status)
        series = self._requests.get(key)
        if series is None:
            if backend is None:  # no backend was chosen: only the count has a series
                series = (self.requests.labels("none", route, model, str(status)),)
            else:
                series = (
                    self.requests.labels(backend, route, model, str(status)),
                    self.request_duration.labels(backend, route),
                    self.ttft.labels(backend, route),
                    self.tokens.labels(backend, model),
                )
            self._requests[key] = series
        series[0].inc()
        if backend is None:
            return
        _, duration, ttft, generated = series
        duration.observe(duration_s)
        if ttft_s is not None:
            ttft.observe(ttft_s)
        if tokens:
            generated.inc(tokens)

    def set_strategy(self, name: str) -> None:
        self.strategy_info.clear()
        self.strategy_info.labels(strategy=name).set(1)

    def forget_backend(self, backend_id: str) -> None:
        """Drop every series of a removed backend (counters too: a backend that comes back
        under the same id starts from zero, which ``rate()`` reads as a counter reset)."""
        self._children.clear()
        self._requests.clear()
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and "backend" in metric._labelnames:
                metric.remove_by_labels({"backend": backend_id})

    def render(self) -> bytes:
        """This process's exposition."""
        return generate_latest(self.registry)

    async def render_host(self) -> bytes:
        """What ``/metrics`` answers: the host's exposition under ``serve --workers``, else
        this process's."""
        if self.host is None:
            return self.render()
        return await self.host.render()


# Distinct model names that may become label values (the rest count as "other").
MAX_MODEL_LABELS = 256

GPU_LABELS = ("gpu", "uuid", "name", "backend")

# (metric name, help, reading attribute)
_GPU_GAUGES = (
    (
        "corral_gpu_utilization_ratio",
        "Share of time the GPU ran a kernel (0-1).",
        "utilization_ratio",
    ),
    ("corral_gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes"),
    ("corral_gpu_memory_total_bytes", "GPU memory in all.", "memory_total_bytes"),
    ("corral_gpu_temperature_celsius", "GPU core temperature.", "temperature_c"),
    ("corral_gpu_power_watts", "GPU power draw.", "power_w"),
)


class _SlotCollector:
    """``corral_backend_in_flight`` and ``corral_backend_slot_utilization_ratio``, read from
    the registry at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(n, h, labels=["backend"]) for n, h in _SLOT_GAUGES]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self._metrics._slot_source
        rows = list(source()) if source is not None else []
        (in_flight_name, in_flight_help), (ratio_name, ratio_help) = _SLOT_GAUGES
        in_flight = GaugeMetricFamily(in_flight_name, in_flight_help, labels=["backend"])
        ratio = GaugeMetricFamily(ratio_name, ratio_help, labels=["backend"])
        for backend, count, limit in rows:
            in_flight.add_metric([backend], float(count))
            ratio.add_metric([backend], count / limit if limit else 0.0)
        yield in_flight
        yield ratio


_SLOT_GAUGES = (
    ("corral_backend_in_flight", "Requests being served by each backend right now."),
    (
        "corral_backend_slot_utilization_ratio",
        "In-flight requests over max_concurrent, per backend.",
    ),
)


class _GpuCollector:
    """Reads the latest GPU readings at scrape time, so a GPU that went away leaves no series."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(n, h, labels=GPU_LABELS) for n, h, _ in _GPU_GAUGES]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self._metrics._gpu_source
        rows = source() if source is not None else []
        for name, help_text, attr in _GPU_GAUGES:
            family = GaugeMetricFamily(name, help_text, labels=GPU_LABELS)
            for labels, reading in rows:
                value = getattr(reading, attr)
                if value is not None:
                    family.add_metric(list(labels), float(value))
            yield family
