"""Metric series a dashboard relies on: present from the start, gone with their backend."""

from __future__ import annotations

from corral.balancer.admission import Admission
from corral.balancer.routing import Router
from corral.config import BalancerSettings, QueueSettings
from corral.fleet.backends import BackendRegistry
from corral.metrics import Metrics


def test_queue_depth_has_a_series_per_priority_before_anything_queues() -> None:
    """A fresh corral exports corral_queue_depth 0 for every priority class, so the
    dashboard's queue panel shows a flat line instead of "no data"."""
    metrics = Metrics()
    Admission(Router(BackendRegistry(), BalancerSettings()), QueueSettings(), metrics)
    text = metrics.render().decode()
    for priority in ("low", "normal", "high", "urgent"):
        assert f'corral_queue_depth{{priority="{priority}"}} 0.0' in text


def test_a_removed_backends_series_are_gone() -> None:
    """Once a backend is removed, no series names it any more; the others stay."""
    metrics = Metrics()
    for backend in ("a", "b"):
        metrics.observe_request(backend, "generate", "llama3.2", 200, 0.1, 0.05, 3)
        metrics.backend_up.labels(backend=backend).set(1)
        metrics.cold_loads.labels(backend=backend).inc()
        metrics.placement_actions.labels(action="preload", backend=backend).inc()
    metrics.forget_backend("a")
    text = metrics.render().decode()
    assert 'backend="a"' not in text
    assert (
        'corral_requests_total{backend="b",code="200",model="llama3.2",route="generate"} 1.0'
        in text
    )
    assert 'corral_placement_actions_total{action="preload",backend="b"} 1.0' in text


def test_model_labels_are_bounded_and_canonical() -> None:
    """Spellings of one model share one label; a backend listing thousands of models makes
    at most MAX_MODEL_LABELS label values, the rest count as "other"."""
    from corral.metrics import MAX_MODEL_LABELS

    metrics = Metrics()
    assert metrics.model_label("llama3.2:latest", True, False) == "llama3.2:latest"
    assert metrics.model_label("nope:latest", False, False) == "other"
    assert metrics.model_label("gpt-oss:20b-cloud", False, True) == "cloud"
    labels = {metrics.model_label(f"m{i}:latest", True, False) for i in range(5000)}
    assert len(labels) == MAX_MODEL_LABELS
    assert "other" in labels
    assert metrics.model_label("llama3.2:latest", True, False) == "llama3.2:latest"
