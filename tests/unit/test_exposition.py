"""Several workers' metrics merged into one host's /metrics, as one corral would answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral import exposition
from corral.cluster.cluster import ClusterCollector
from corral.exposition import GAUGE_RULES, HostMetrics, merge, serve_exposition
from corral.fleet.backends import BackendRegistry
from corral.fleet.inventory import ResidencyCollector
from corral.metrics import Metrics


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def worker(requests: int, backend: str = "gpu0", duration_s: float = 0.3) -> Metrics:
    metrics = Metrics()
    for _ in range(requests):
        metrics.observe_request(backend, "/api/generate", "llama3.2", 200, duration_s, 0.1, 5)
    return metrics


def test_one_exposition_merges_to_itself() -> None:
    """A host of one worker answers exactly what that worker does: HELP, TYPE, every line."""
    metrics = worker(3)
    metrics.open_connections.set(2)
    metrics.backend_up.labels(backend="gpu0").set(1)
    text = metrics.render()
    assert merge([text]) == text


def test_counters_and_histograms_are_summed_per_label_set() -> None:
    """Requests counted on two workers add up per label set; a label set one worker never
    saw is kept; histogram buckets, _sum and _count add up; names stay a single corral's."""
    a, b = worker(3), worker(2, duration_s=2.0)
    b.observe_request("gpu1", "/api/chat", "llama3.2", 502, 0.1, None, 0)
    merged = merge([a.render(), b.render()])
    req = {"backend": "gpu0", "route": "/api/generate", "model": "llama3.2", "code": "200"}
    assert value(merged, "corral_requests_total", **req) == 5
    other = {"backend": "gpu1", "route": "/api/chat", "model": "llama3.2", "code": "502"}
    assert value(merged, "corral_requests_total", **other) == 1
    assert value(merged, "corral_tokens_generated_total", backend="gpu0", model="llama3.2") == 25
    hist = "corral_request_duration_seconds"
    labels = {"backend": "gpu0", "route": "/api/generate"}
    assert value(merged, f"{hist}_count", **labels) == 5
    assert value(merged, f"{hist}_sum", **labels) == 3 * 0.3 + 2 * 2.0
    assert value(merged, f"{hist}_bucket", le="0.5", **labels) == 3
    assert value(merged, f"{hist}_bucket", le="2.5", **labels) == 5
    assert value(merged, f"{hist}_bucket", le="+Inf", **labels) == 5
    # The same families, HELP and TYPE lines as one worker's exposition, in its order.
    one = a.render().decode().splitlines()
    heads = [line for line in merged.decode().splitlines() if line.startswith("#")]
    assert heads == [line for line in one if line.startswith("#")]


def test_gauges_follow_their_rule() -> None:
    """Per-process gauges add up (queue depth, open connections); fleet-wide readings every
    worker takes are not added (in-flight slots: the highest; backend up: only if every worker
    says so; the strategy: per label set); the host leads when one of its workers does."""
    a, b = Metrics(), Metrics()
    a.queue_depth.labels(priority="normal").set(3)
    b.queue_depth.labels(priority="normal").set(4)
    a.open_connections.set(10)
    b.open_connections.set(5)
    a.backend_up.labels(backend="gpu0").set(1)
    b.backend_up.labels(backend="gpu0").set(0)
    a.backend_up.labels(backend="gpu1").set(1)
    b.backend_up.labels(backend="gpu1").set(1)
    a.watch_slots(lambda: [("gpu0", 3, 4)])
    b.watch_slots(lambda: [("gpu0", 2, 4)])
    a.set_strategy("round_robin")
    b.set_strategy("least_connections")  # a change not yet reached by the other worker

    def cluster(up: int, leader: int) -> bytes:
        return (
            f"# HELP corral_cluster_up up\n# TYPE corral_cluster_up gauge\n"
            f"corral_cluster_up {up}\n"
            f"# HELP corral_cluster_leader leads\n# TYPE corral_cluster_leader gauge\n"
            f"corral_cluster_leader {leader}\n"
        ).encode()

    texts = [a.render() + cluster(1, 0), b.render() + cluster(0, 1)]
    merged = merge(texts)
    assert value(merged, "corral_queue_depth", priority="normal") == 7
    assert value(merged, "corral_open_connections") == 15
    assert value(merged, "corral_backend_up", backend="gpu0") == 0
    assert value(merged, "corral_backend_up", backend="gpu1") == 1
    assert value(merged, "corral_backend_in_flight", backend="gpu0") == 3
    assert value(merged, "corral_backend_slot_utilization_ratio", backend="gpu0") == 0.75
    assert value(merged, "corral_strategy_info", strategy="round_robin") == 1
    assert value(merged, "corral_strategy_info", strategy="least_connections") == 1
    assert value(merged, "corral_cluster_up") == 0
    assert value(merged, "corral_cluster_leader") == 1


def test_every_gauge_corral_exports_has_a_rule() -> None:
    """A gauge added later must be given a merge rule (a per-process share is summed,
    a fleet-wide reading is not)."""
    metrics = Metrics()
    metrics.registry.register(ResidencyCollector(BackendRegistry()))
    families = [*metrics.registry.collect(), *ClusterCollector._families(0, 0, 0)]
    gauges = {f.name for f in families if f.type == "gauge"}
    assert gauges - GAUGE_RULES.keys() == set()
    assert set(GAUGE_RULES.values()) <= {"sum", "max", "min"}


def test_workers_gauges_count_the_expositions() -> None:
    """corral_workers is the host's worker count, corral_workers_scraped how many were merged;
    an exposition cut short (its worker died mid-write) is left out, not an error."""
    cut = worker(5).render()[:200]
    merged = merge([worker(1).render(), worker(1).render(), cut], workers=3)
    assert value(merged, "corral_workers") == 3
    assert value(merged, "corral_workers_scraped") == 2
    req = {"backend": "gpu0", "route": "/api/generate", "model": "llama3.2", "code": "200"}
    assert value(merged, "corral_requests_total", **req) == 2


async def test_a_sibling_that_does_not_answer_is_left_out(tmp_path: Path) -> None:
    """One sibling answers on its socket, one has no socket, one accepts and never writes, one
    stops in the middle of its exposition (at the end of a line): the scrape holds this
    worker's and the answering sibling's counts, within the deadline."""
    mine, sibling = worker(3), worker(4)
    answering = str(tmp_path / "metrics-1.sock")
    missing = str(tmp_path / "metrics-2.sock")
    stalled = str(tmp_path / "metrics-3.sock")
    cut = str(tmp_path / "metrics-4.sock")
    release = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = worker(5).render()
        writer.write(text[: text.index(b"\n", 200) + 1])
        writer.close()

    servers = [
        await serve_exposition(answering, sibling.render),
        await asyncio.start_unix_server(hold, stalled),
        await asyncio.start_unix_server(die, cut),
    ]
    try:
        host = HostMetrics(mine.render, [answering, missing, stalled, cut], workers=5)
        started = time.monotonic()
        merged = await host.render()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        for server in servers:
            server.close()
    req = {"backend": "gpu0", "route": "/api/generate", "model": "llama3.2", "code": "200"}
    assert value(merged, "corral_requests_total", **req) == 7
    assert value(merged, "corral_workers") == 5
    assert value(merged, "corral_workers_scraped") == 2


async def test_a_sibling_that_stops_answering_keeps_its_last_counts_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sibling that answered once and then misses a scrape is stood in for by its last
    answer, so the host's counters do not drop (which Prometheus would read as a reset); once
    that answer is older than STALE_S, it is left out."""
    mine, sibling = worker(3), worker(4)
    path = str(tmp_path / "metrics-1.sock")
    server = await serve_exposition(path, sibling.render)
    host = HostMetrics(mine.render, [path], workers=2)
    req = {"backend": "gpu0", "route": "/api/generate", "model": "llama3.2", "code": "200"}
    try:
        first = await host.render()
    finally:
        server.close()
        await server.wait_closed()
    assert value(first, "corral_requests_total", **req) == 7
    assert value(first, "corral_workers_scraped") == 2
    mine.observe_request("gpu0", "/api/generate", "llama3.2", 200, 0.3, 0.1, 5)
    silent = await host.render()
    assert value(silent, "corral_requests_total", **req) == 8
    assert value(silent, "corral_workers_scraped") == 1
    monkeypatch.setattr(exposition, "STALE_S", 0.0)
    gone = await host.render()
    assert value(gone, "corral_requests_total", **req) == 4
    assert value(gone, "corral_workers_scraped") == 1
