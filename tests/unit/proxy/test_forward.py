"""The forwarder behind the upstream seam: failover, retries, health, and what the client gets
when a backend fails before or after the first byte (a scripted FakeTransport, no sockets)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest

from corral.errors import (
    RoutingError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamMalformedError,
    UpstreamTimeoutError,
)
from corral.fleet.backends import BackendState, normalize_model
from corral.fleet.gpu.sampler import NullSampler
from corral.proxy.front import ROUTED
from corral.proxy.relay import Reply
from corral.proxy.request import Result, RoutedRequest
from corral.runtime import Runtime
from corral.upstream import Upstream
from tests.helpers import (
    Answer,
    FakeTransport,
    Pause,
    RecordingSend,
    base_url,
    counter,
    offline_settings,
)

A, B = base_url("a"), base_url("b")
BUSY = {"error": "server busy, please try again.  maximum pending requests exceeded"}


@dataclass
class Fleet:
    """Two probed backends, ``a`` tried first (round robin), over one fake transport."""

    rt: Runtime
    fake: FakeTransport

    @property
    def a(self) -> BackendState:
        return self.rt.registry.get("a")

    @property
    def b(self) -> BackendState:
        return self.rt.registry.get("b")

    def retries(self, reason: str) -> float:
        value = self.rt.metrics.registry.get_sample_value(
            "corral_retries_total", {"reason": reason}
        )
        return value or 0.0

    def assert_settled(self) -> None:
        """Every slot given back and every backend answer closed."""
        assert [b.in_flight for b in self.rt.registry.all()] == [0, 0]
        assert self.fake.pool_stats() == (0, 0)
        assert all(r.closed for r in self.fake.responses)


async def make_fleet(**balancer: Any) -> Fleet:
    fake = FakeTransport().ollama(A, "m").ollama(B, "m")
    settings = offline_settings(
        "a", "b", balancer={"strategy": "round_robin", "model_affinity": False, **balancer}
    )
    upstream = Upstream(settings.timeouts, transport=fake)
    rt = Runtime(settings, upstream=upstream, gpu_sampler=NullSampler())
    await rt.health.probe_all()
    assert all(b.healthy for b in rt.registry.all())
    return Fleet(rt, fake)


@pytest.fixture
async def fleet() -> Fleet:
    return await make_fleet()


def routed(path: str = "/api/chat", model: str = "m", **body: Any) -> RoutedRequest:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    return RoutedRequest(
        route=ROUTED[path],
        method="POST",
        path=path,
        body=json.dumps(payload).encode(),
        model=model,
        model_key=normalize_model(model),
        request_id="rid-1",
        headers=[(b"content-type", b"application/json"), (b"x-request-id", b"rid-1")],
        started=time.perf_counter(),
    )


async def serve(fleet: Fleet, request: RoutedRequest | None = None) -> tuple[RecordingSend, Result]:
    """Forward as the front door does: a failure before the first byte is answered by Reply."""
    request = request or routed()
    send, result = RecordingSend(), Result()
    reply = Reply(send, request.request_id, request.route.shape, events=request.route.events)
    try:
        await fleet.rt.forwarder.forward(request, reply, result)
    except RoutingError as exc:
        assert not reply.started
        result.status, result.error = exc.status, str(exc)
        await reply.fail(exc)
    return send, result


def chat_answer(text: str = "hello") -> Answer:
    return Answer.ndjson(
        {"message": {"role": "assistant", "content": text}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 3},
    )


# Before the first byte: retried elsewhere, or not --------------------------------------------


async def test_connect_failure_fails_over_to_the_next_backend(fleet: Fleet) -> None:
    """A backend that cannot be reached is skipped: the client gets the next one's answer."""
    fleet.fake.script(A, UpstreamConnectError("connection refused"))
    fleet.fake.script(B, chat_answer("from b"))
    send, result = await serve(fleet)
    assert send.status == 200
    assert send.header("x-corral-backend") == "b"
    assert send.lines()[0]["message"]["content"] == "from b"
    assert (result.status, result.backend, result.attempts) == (200, "b", 2)
    assert [r.url for r in fleet.fake.sent()] == [f"{A}/api/chat", f"{B}/api/chat"]
    assert fleet.rt.forwarder.retries == 1
    assert fleet.retries("connect") == 1
    assert fleet.a.consecutive_errors == 1  # counted against a, as a transport error
    fleet.assert_settled()


async def test_timeout_before_headers_is_not_retried(fleet: Fleet) -> None:
    """A backend that took the request but did not answer in time gives 504, tried nowhere else."""
    fleet.fake.script(A, UpstreamTimeoutError("no answer within 300s"))
    send, result = await serve(fleet)
    assert send.status == 504
    assert json.loads(send.body) == {"error": "backend a did not answer in time"}
    assert send.header("x-request-id") == "rid-1"
    assert result.status == 504
    assert len(fleet.fake.sent()) == 1
    assert fleet.rt.forwarder.retries == 0
    fleet.assert_settled()


async def test_timeout_after_headers_before_body_is_not_retried(fleet: Fleet) -> None:
    """Headers then silence: 504 "sent headers but no body in time", not tried elsewhere."""
    fleet.fake.script(A, Answer(200, [UpstreamTimeoutError("no data for 120s")]))
    send, _ = await serve(fleet)
    assert send.status == 504
    assert json.loads(send.body) == {"error": "backend a sent headers but no body in time"}
    assert len(fleet.fake.sent()) == 1
    fleet.assert_settled()


async def test_same_500_from_two_backends_is_relayed_and_blames_neither(fleet: Fleet) -> None:
    """Two backends refusing the request alike: the client gets that 500, no backend is blamed."""
    refusal = {"error": "invalid options: num_ctx"}
    fleet.fake.script(A, Answer.json(refusal, status=500))
    fleet.fake.script(B, Answer.json(refusal, status=500))
    send, result = await serve(fleet)
    assert send.status == 500
    assert json.loads(send.body) == refusal
    assert send.header("x-corral-backend") == "b"
    assert result.status == 500
    assert len(fleet.fake.sent()) == 2  # the third attempt is not made
    for b in (fleet.a, fleet.b):
        assert (b.total_failures, b.bad_outcomes, b.consecutive_errors) == (0, 0, 0)
    assert fleet.retries("status_5xx") == 1
    fleet.assert_settled()


async def test_500_from_one_backend_only_is_retried_and_counted_against_it(fleet: Fleet) -> None:
    """A 500 that the next backend does not repeat: the client gets the good answer, and the
    backend that failed is counted as failed."""
    fleet.fake.script(A, Answer.json({"error": "CUDA error"}, status=500))
    fleet.fake.script(B, chat_answer())
    send, result = await serve(fleet)
    assert (send.status, result.backend) == (200, "b")
    assert fleet.a.total_failures == 1
    assert fleet.b.total_failures == 0
    fleet.assert_settled()


async def test_server_busy_503_is_retried_and_not_counted_against_health(fleet: Fleet) -> None:
    """Ollama's 503 "server busy" sends the request elsewhere and says nothing of health."""
    fleet.fake.script(A, Answer.json(BUSY, status=503))
    fleet.fake.script(B, chat_answer("from b"))
    send, result = await serve(fleet)
    assert (send.status, result.backend) == (200, "b")
    assert fleet.retries("busy") == 1
    assert (fleet.a.total_failures, fleet.a.bad_outcomes, fleet.a.consecutive_errors) == (0, 0, 0)
    fleet.assert_settled()


async def test_body_broken_before_the_first_byte_is_retried(fleet: Fleet) -> None:
    """Headers then a reset before any body byte: the client never sees it, the next backend
    answers."""
    cut = UpstreamBrokenError("connection reset by peer")
    fleet.fake.script(A, Answer(200, [cut], content_type="application/x-ndjson"))
    fleet.fake.script(B, chat_answer("from b"))
    send, result = await serve(fleet)
    assert send.status == 200
    assert send.lines()[0]["message"]["content"] == "from b"
    assert (result.backend, result.attempts) == ("b", 2)
    assert fleet.retries("connect") == 1
    assert fleet.a.consecutive_errors == 1
    fleet.assert_settled()


async def test_exhausted_retry_budget_makes_no_second_attempt() -> None:
    """With the retry budget spent, a backend that cannot be reached is a 502, not a retry."""
    fleet = await make_fleet(retry_budget_ratio=0, retry_budget_min=0)
    fleet.rt.forwarder.budget.tokens = 0
    fleet.fake.script(A, UpstreamConnectError("connection refused"))
    send, result = await serve(fleet)
    assert send.status == 502
    assert json.loads(send.body) == {"error": "backend a unreachable: connection refused"}
    assert result.attempts == 1
    assert len(fleet.fake.sent()) == 1
    assert fleet.rt.forwarder.retries == 0
    assert fleet.retries("connect") == 0
    fleet.assert_settled()


# A backend's answer corral cannot use: malformed HTTP, a redirect -------------------------------


def malformed(fleet: Fleet, backend_id: str, reason: str) -> float:
    value = fleet.rt.metrics.registry.get_sample_value(
        "corral_backend_malformed_total", {"backend": backend_id, "reason": reason}
    )
    return value or 0.0


async def test_malformed_answer_is_retried_and_counted(fleet: Fleet) -> None:
    """Malformed HTTP before the first byte: the next backend answers; the bad one is counted
    in ``backend_malformed`` and against its health."""
    bad = UpstreamMalformedError("malformed response: Invalid status code", address="a.test:1")
    fleet.fake.script(A, bad)
    fleet.fake.script(B, chat_answer("from b"))
    send, result = await serve(fleet)
    assert (send.status, result.backend, result.attempts) == (200, "b", 2)
    assert malformed(fleet, "a", "malformed_http") == 1
    assert fleet.retries("malformed") == 1
    assert (fleet.a.total_failures, fleet.a.consecutive_errors) == (1, 1)
    fleet.assert_settled()


async def test_three_malformed_answers_eject_and_a_good_probe_does_not_lift_it() -> None:
    """``consecutive_errors`` malformed answers eject the backend; unlike a connection that
    failed, its next good probe proves nothing, so it stays ejected."""
    fleet = await make_fleet()
    bad = UpstreamMalformedError("malformed response: Invalid status code")
    for _ in range(3):
        fleet.rt.forwarder._judge(fleet.a, bad, Result())
    now = time.monotonic()
    assert fleet.a.is_ejected(now)
    assert malformed(fleet, "a", "malformed_http") == 3
    assert await fleet.rt.health.probe(fleet.a)
    assert fleet.a.is_ejected(time.monotonic())


async def test_redirect_is_retried_elsewhere_and_never_relayed(fleet: Fleet) -> None:
    """A backend's 302 is a failed attempt: the next backend answers, no Location reaches the
    client, and the redirect is counted."""
    fleet.fake.script(
        A, Answer(302, [b"moved"], headers=[("location", "http://evil.example/steal")])
    )
    fleet.fake.script(B, chat_answer("from b"))
    send, result = await serve(fleet)
    assert (send.status, result.backend) == (200, "b")
    assert send.header("location") is None
    assert malformed(fleet, "a", "redirect") == 1
    assert fleet.retries("malformed") == 1
    assert fleet.a.total_failures == 1
    fleet.assert_settled()


async def test_redirects_everywhere_give_a_502_without_location(fleet: Fleet) -> None:
    """When every attempt is redirected the client gets a 502 in its route's shape, and no
    ``Location``."""
    moved = Answer(301, [], headers=[("location", "http://evil.example/")])
    fleet.fake.script(A, moved, moved)
    fleet.fake.script(B, moved)
    send, result = await serve(fleet)
    assert send.status == 502
    assert send.header("location") is None
    error = json.loads(send.body)["error"]
    assert "redirect" in error
    assert "evil.example" not in send.body.decode()
    assert result.status == 502
    fleet.assert_settled()


async def test_502_names_the_backend_but_not_its_address(fleet: Fleet) -> None:
    """The client reads which backend failed and why, never its host or port."""
    refused = UpstreamConnectError("connection refused", address="10.9.8.7:51631")
    fleet.fake.script(A, refused, refused)
    fleet.fake.script(B, refused)
    send, _ = await serve(fleet)
    assert send.status == 502
    body = send.body.decode()
    assert json.loads(body)["error"].endswith("unreachable: connection refused")
    assert "10.9.8.7" not in body
    assert "51631" not in body
    fleet.assert_settled()


# After the first byte: told in-stream, or the connection cut ------------------------------------


async def test_ndjson_cut_midway_ends_with_an_error_line(fleet: Fleet) -> None:
    """A stream that breaks after some lines: the client has whole lines, then an error line."""
    fleet.fake.script(
        A,
        Answer.ndjson(
            {"message": {"content": "Hel"}, "done": False},
            {"message": {"content": "lo"}, "done": False},
            UpstreamBrokenError("connection reset by peer"),
        ),
    )
    send, result = await serve(fleet)
    assert send.status == 200
    assert send.lines() == [
        {"message": {"content": "Hel"}, "done": False},
        {"message": {"content": "lo"}, "done": False},
        {"error": "backend a failed mid-stream: connection reset by peer"},
    ]
    assert send.finished
    assert result.status == 502
    assert result.error == "backend a failed mid-stream: connection reset by peer"
    assert len(fleet.fake.sent()) == 1  # too late to try elsewhere
    assert fleet.a.consecutive_errors == 1
    fleet.assert_settled()


async def test_ndjson_stalled_midway_says_so(fleet: Fleet) -> None:
    """A stream that goes silent past the idle timeout ends with a "stalled" error line."""
    fleet.fake.script(
        A,
        Answer.ndjson({"response": "Hel", "done": False}, UpstreamTimeoutError("no data")),
    )
    send, result = await serve(fleet, routed("/api/generate", prompt="hi"))
    assert send.lines()[-1] == {"error": "backend a stalled: no data for 120s"}
    assert result.status == 502
    fleet.assert_settled()


async def test_sse_cut_midway_ends_with_a_blank_line_and_an_error_event(fleet: Fleet) -> None:
    """An OpenAI stream that breaks: the open event is closed by a blank line, then a
    ``data: {"error": …}`` event."""
    first = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'
    second = b'data: {"choices":[{"delta":{"content":"lo"}}]}\n'  # its blank line never came
    fleet.fake.script(
        A,
        Answer(
            200,
            [first, second, UpstreamBrokenError("connection reset by peer")],
            content_type="text/event-stream",
        ),
    )
    send, result = await serve(fleet, routed("/v1/chat/completions", stream=True))
    assert send.status == 200
    assert send.body.startswith(first + second + b"\ndata: ")
    assert send.body.endswith(b"\n\n")
    last_event = send.body.split(b"\n\n")[-2]
    error = json.loads(last_event.removeprefix(b"data: "))
    assert error["error"]["message"] == "backend a failed mid-stream: connection reset by peer"
    assert send.finished
    assert result.status == 502
    fleet.assert_settled()


async def test_plain_body_cut_midway_aborts_the_connection(fleet: Fleet) -> None:
    """A plain JSON body cut short cannot carry an error: the response is never finished, so
    the server drops the connection."""
    fleet.fake.script(
        A,
        Answer(200, [b'{"model":"m","response":"Hel', UpstreamBrokenError("reset")]),
    )
    send, result = await serve(fleet, routed("/api/generate", prompt="hi", stream=False))
    assert send.status == 200
    assert send.body == b'{"model":"m","response":"Hel'
    assert not send.finished
    assert not any(
        m["type"] == "http.response.body" and not m.get("more_body", False) for m in send.messages
    )
    assert result.status == 502
    fleet.assert_settled()


async def test_partial_line_is_held_back_until_its_newline(fleet: Fleet) -> None:
    """A line split across chunks reaches the client whole: while its rest is on the way the
    client has only the whole lines before it."""
    pause = Pause()
    fleet.fake.script(
        A,
        Answer(200, [b'{"a":1}\n{"b":', pause, b"2}\n"], content_type="application/x-ndjson"),
    )
    send, result = RecordingSend(), Result()
    request = routed()
    task = asyncio.create_task(
        fleet.rt.forwarder.forward(request, Reply(send, request.request_id), result)
    )
    await pause.reached.wait()  # the relay asked for more after the first chunk
    assert send.chunks == [b'{"a":1}\n']
    pause.release()
    await task
    assert send.chunks == [b'{"a":1}\n', b'{"b":2}\n']
    assert send.finished
    assert result.status == 200
    fleet.assert_settled()


@pytest.mark.parametrize(
    ("path", "answer", "tokens", "stats"),
    [
        (
            "/api/chat",
            Answer.ndjson(
                {"message": {"content": "hi"}, "done": False},
                {
                    "done": True,
                    "eval_count": 42,
                    "prompt_eval_count": 17,
                    "prompt_eval_cached_count": 5,
                    "prompt_eval_duration": 3_000_000,
                    "load_duration": 1_000,
                },
            ),
            42,
            {
                "prompt_eval_count": 17,
                "prompt_eval_cached_count": 5,
                "prompt_eval_duration": 3_000_000,
                "load_duration": 1_000,
            },
        ),
        (
            "/v1/chat/completions",
            Answer.json(
                {
                    "choices": [{"message": {"content": "hi"}}],
                    "usage": {
                        "prompt_tokens": 17,
                        "completion_tokens": 42,
                        "prompt_tokens_details": {"cached_tokens": 5},
                    },
                }
            ),
            42,
            {"prompt_tokens": 17, "cached_tokens": 5},
        ),
    ],
    ids=["ollama", "openai"],
)
async def test_final_chunk_stats_are_read(
    fleet: Fleet, path: str, answer: Answer, tokens: int, stats: dict[str, int]
) -> None:
    """The answer's final counters are taken: generated tokens, prompt tokens, cache hits."""
    fleet.fake.script(A, answer)
    _, result = await serve(fleet, routed(path))
    assert result.status == 200
    assert result.tokens == tokens
    assert result.stats == stats
    metrics = fleet.rt.metrics
    assert counter(metrics, "corral_prompt_tokens_total", "a") == 17
    assert counter(metrics, "corral_prompt_tokens_cached_total", "a") == 5
    fleet.assert_settled()


# Slots and connections --------------------------------------------------------------------------


def _broken() -> UpstreamBrokenError:
    return UpstreamBrokenError("reset")


SCRIPTS: dict[str, tuple[list[Any], list[Any]]] = {
    "served": ([chat_answer()], []),
    "connect error then served": ([UpstreamConnectError("refused")], [chat_answer()]),
    "timeout before headers": ([UpstreamTimeoutError("slow")], []),
    "timeout before body": ([Answer(200, [UpstreamTimeoutError("slow")])], []),
    "broken before body": ([Answer(200, [_broken()])], [chat_answer()]),
    "broken mid-stream": ([Answer.ndjson({"done": False}, _broken())], []),
    "same 500 twice": (
        [Answer.json({"error": "bad"}, status=500)],
        [Answer.json({"error": "bad"}, status=500)],
    ),
    "busy twice": ([Answer.json(BUSY, status=503)], [Answer.json(BUSY, status=503)]),
    "error body unreadable": (
        [Answer(500, [_broken()])],
        [chat_answer()],
    ),
}


@pytest.mark.parametrize("case", list(SCRIPTS))
async def test_slot_released_and_answer_closed_on_every_path(fleet: Fleet, case: str) -> None:
    """However a request ends, its slots are free again and no backend connection is left open."""
    on_a, on_b = SCRIPTS[case]
    fleet.fake.script(A, *on_a)
    fleet.fake.script(B, *on_b)
    send, result = await serve(fleet)
    assert send.messages  # the client got an answer of some kind
    assert result.status != 499
    fleet.assert_settled()
