"""Model loads through the upstream seam: ``http_sender`` over a scripted FakeTransport and
``post_load`` (no sockets)."""

from __future__ import annotations

import pytest

from corral.config import TimeoutSettings
from corral.errors import PlacementError, UpstreamConnectError, UpstreamTimeoutError
from corral.fleet.backends import BackendState
from corral.fleet.placement import Send, http_sender, post_load
from corral.upstream import Upstream
from tests.helpers import Answer, FakeTransport, base_url, forbid_sockets

A = base_url("a")
LOAD = {"model": "all-minilm", "prompt": "", "keep_alive": -1, "stream": False}


@pytest.fixture(autouse=True)
def _no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_sockets(monkeypatch)


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


def send_over(fake: FakeTransport, timeout_s: float = 5) -> Send:
    return http_sender(Upstream(TimeoutSettings(), transport=fake), timeout_s)


def backend() -> BackendState:
    return BackendState(id="a", url=A, healthy=True, probed=True)


async def test_load_falls_back_to_embed_for_embedding_only_models(fake: FakeTransport) -> None:
    """An embedding model refuses generate: the load is made with an empty /api/embed."""
    refusal = {"error": '"all-minilm" does not support generate'}
    fake.script(f"{A}/api/generate", Answer.json(refusal, status=400))
    fake.script(f"{A}/api/embed", Answer.json({"model": "all-minilm", "embeddings": []}))
    await post_load(send_over(fake), backend(), LOAD)
    generate, embed = fake.requests
    assert (generate.method, generate.url) == ("POST", f"{A}/api/generate")
    assert generate.json() == LOAD
    assert generate.header("content-type") == "application/json"
    assert (embed.method, embed.url) == ("POST", f"{A}/api/embed")
    assert embed.json() == {"model": "all-minilm", "keep_alive": -1, "input": ""}
    assert fake.pool_stats() == (0, 0)


async def test_a_load_is_bounded_by_the_senders_timeout(fake: FakeTransport) -> None:
    """The whole load waits at most the sender's timeout, for headers and for body alike."""
    fake.script(f"{A}/api/generate", Answer.json({"done": True}))
    await post_load(send_over(fake, timeout_s=7), backend(), LOAD)
    (sent,) = fake.requests
    assert (sent.headers_timeout_s, sent.idle_timeout_s) == (7, 7)


async def test_other_400_is_not_retried_as_embed(fake: FakeTransport) -> None:
    """A 400 for another reason is the backend's refusal, reported as such."""
    fake.script(f"{A}/api/generate", Answer.json({"error": "invalid keep_alive"}, status=400))
    with pytest.raises(PlacementError, match=r"a: HTTP 400: invalid keep_alive"):
        await post_load(send_over(fake), backend(), LOAD)
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "failure",
    [UpstreamConnectError("connection refused"), UpstreamTimeoutError("no answer within 5s")],
    ids=["unreachable", "timeout"],
)
async def test_unreachable_backend_raises_placement_error(
    fake: FakeTransport, failure: Exception
) -> None:
    """A backend that cannot be reached (or does not answer) fails the load with
    PlacementError naming it."""
    fake.script(f"{A}/api/generate", failure)
    with pytest.raises(PlacementError, match=r"^a: ") as caught:
        await post_load(send_over(fake), backend(), LOAD)
    assert str(failure) in str(caught.value)
    assert fake.pool_stats() == (0, 0)


async def test_failed_load_reports_the_backends_error(fake: FakeTransport) -> None:
    """A 500 on load (out of memory, say) is a PlacementError with the backend's words."""
    fake.script(
        f"{A}/api/generate", Answer.json({"error": "model requires more memory"}, status=500)
    )
    with pytest.raises(PlacementError, match="a: HTTP 500: model requires more memory"):
        await post_load(send_over(fake), backend(), LOAD)
