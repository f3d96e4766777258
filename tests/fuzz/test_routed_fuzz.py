"""Fuzzing the Ollama/OpenAI front: bodies, headers and methods no client library would send.

Every answer must be a finished response (no exception out of the app, no hang, no traceback)
in the shape of its API: ``{"error": str}`` on the native routes, OpenAI's
``{"error": {"message", "type", ...}}`` on /v1, Ollama's plain-text 404/405. No 5xx but a
backend's own, relayed. Where corral itself must refuse a request (too large, not JSON, no
object, no model, bad X-Priority) the status is checked exactly; a 2xx only ever comes from
the backend, for a request that passed all of that. After each run corral is still healthy
and holds nothing in flight or queued. The management routes (pull, push, create, copy,
delete, blobs) are fuzzed with and without the admin key; a real socket adds the framing
cases an ASGI scope cannot carry (Content-Length that lies, chunked bodies).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.guard import host_name, is_loopback_name
from corral.proxy.front import MANAGEMENT, ROUTED
from corral.sim.harness import SimProcess
from tests.fuzz.conftest import (
    ADMIN_KEY,
    MAX_BODY_BYTES,
    AsgiHarness,
    Reply,
    examples,
    start_corral,
)
from tests.helpers import CorralThread, make_settings

pytestmark = pytest.mark.fuzz

NATIVE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show")
OPENAI = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
ANTHROPIC = ("/v1/messages",)
# Routes whose SSE stream names its events (``event:`` before each ``data:``).
NAMED_EVENTS = ("/v1/responses", "/v1/messages")
ROUTES = (*NATIVE, *OPENAI, *ANTHROPIC)
_MODEL_REQUIRED = {"/api/chat", "/api/show"}  # 400 "model is required", else 404 ''
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# The simulator's models (all-minilm embeds only), and one no backend has.
MODELS = ("llama3.2", "llama3.2:latest", "qwen2.5:7b", "all-minilm", "no-such-model")
PRIORITIES = ("low", "normal", "high", "urgent", " HIGH ", "")


@pytest.fixture(scope="module")
def front(sim: SimProcess) -> Iterator[AsgiHarness]:
    harness = start_corral(sim.url, admin_key=ADMIN_KEY)
    yield harness
    harness.stop()


# Strategies ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity too: Python's json reads them
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])
            | json_values,
            "content": st.text(max_size=60) | json_values,
            "images": json_values,
        },
    )
    | json_values,
    max_size=4,
)
# A request body as a client means it: the known fields, each of the right type or of any.
request_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(MODELS) | st.text(max_size=30) | json_values,
        "name": st.sampled_from(MODELS) | json_values,
        "prompt": st.text(max_size=60) | json_values,
        "input": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | json_values,
        "messages": messages | json_values,
        # Never true: a streamed answer is fine too, but false keeps examples quick to check.
        "stream": st.sampled_from([False, None, "false", 0, 1, "yes", [], {}]),
        "options": st.dictionaries(
            st.sampled_from(["temperature", "seed", "top_k", "stop", "num_ctx"])
            | st.text(max_size=8),
            json_values,
            max_size=4,
        )
        | json_values,
        "keep_alive": st.sampled_from(["5m", "-1", "0", "1h30m", "soon", 300, -1, 0.5, True])
        | json_values,
        "format": json_values,
        "think": json_values,
    },
)
text_bodies = st.one_of(
    request_objects.map(json.dumps),
    json_values.map(json.dumps),  # every JSON type at the top level
    st.text(max_size=200),  # anything at all, mostly not JSON
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Request bodies: JSON, near-JSON, raw bytes, invalid UTF-8, other encodings."""
    kind = draw(st.sampled_from(["json", "bytes", "mangled", "utf16", "bad-utf8"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    text = draw(text_bodies)
    data = text.encode("utf-8", "surrogatepass")
    if kind == "utf16":
        return text.encode("utf-16", "surrogatepass")  # with a BOM: json.loads detects it
    if kind == "mangled" and data:
        at = draw(st.integers(0, len(data) - 1))
        cut = draw(st.booleans())
        return data[:at] if cut else data[:at] + bytes([draw(st.integers(0, 255))]) + data[at:]
    if kind == "bad-utf8" and data:
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
        return data[:at] + junk + data[at:]
    return data


# Header values a real HTTP/1.1 server lets through: HTAB, visible ASCII, space, obs-text.
_FIELD_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
header_values = st.one_of(
    st.lists(st.sampled_from(_FIELD_BYTES), max_size=40).map(bytes),
    st.sampled_from(_FIELD_BYTES).flatmap(
        lambda b: st.integers(200, 20_000).map(lambda n: bytes([b]) * n)  # huge
    ),
)
header_names = st.sampled_from(
    [
        b"x-priority",
        b"x-request-id",
        b"x-session-id",
        b"content-type",
        b"authorization",
        b"x-api-key",
        b"accept",
        b"accept-encoding",
        b"user-agent",
        b"host",
        b"expect",
        b"cookie",
        b"x-forwarded-for",
    ]
) | st.from_regex(rb"\A[a-z0-9!#$%&'*+.^_`|~-]{1,24}\Z")
odd_headers = st.lists(
    st.tuples(header_names, header_values)
    | st.tuples(
        st.just(b"x-priority"),
        st.sampled_from(PRIORITIES).map(str.encode) | header_values,
    ),
    max_size=5,
).filter(lambda hs: all(name != b"content-length" for name, _ in hs))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at ``cuts`` (positions, any order), as several ASGI body messages."""
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(edges)] or [b""]


# The oracle ---------------------------------------------------------------------------------


def _declared(headers: list[tuple[bytes, bytes]]) -> int:
    most = 0
    for name, value in headers:
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                most = max(most, int(value))
    return most


def _priority_ok(headers: list[tuple[bytes, bytes]]) -> bool:
    value = next((v for n, v in headers if n == b"x-priority"), None)
    if value is None:
        return True
    text = value.decode("latin-1").strip().lower()
    return text in ("", "low", "normal", "high", "urgent")


def _foreign_host(headers: list[tuple[bytes, bytes]]) -> bool:
    """Bound to loopback, corral refuses a Host that is not a loopback name (DNS rebinding)."""
    value = next((v for n, v in headers if n == b"host"), None)
    return bool(value) and not is_loopback_name(host_name(value.decode("latin-1")))


def refusal(path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int | None:
    """The status corral must answer by itself for a POST to a routed ``path``, or None when
    the request is good enough to go to a backend."""
    if _foreign_host(headers):
        return 403
    if len(body) > MAX_BODY_BYTES or _declared(headers) > MAX_BODY_BYTES:
        return 413
    if not body:
        return 400
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 400
    if not isinstance(data, dict):
        return 400
    model = data.get("model")
    if model is None and path == "/api/show":
        model = data.get("name")
    if not isinstance(model, str) or not model.strip():
        if model is not None and not isinstance(model, str):
            return 400
        return 400 if path.startswith("/v1/") or path in _MODEL_REQUIRED else 404
    if not _priority_ok(headers):
        return 400
    return None


def check_shape(reply: Reply, path: str, method: str = "POST") -> None:
    """A finished response, no traceback, errors in the route's own shape, and no 5xx but a
    backend's own (Ollama answers 500 to some bad requests, e.g. an invalid ``format``). An
    answer to HEAD may have no body (the server sends none)."""
    assert reply.complete, f"{path}: the response never ended"
    if reply.status >= 500:
        assert reply.header("x-corral-backend"), (reply.status, reply.body[:500])
    if method == "HEAD" and not reply.body:
        return
    assert b"Traceback" not in reply.body
    assert b"RecursionError" not in reply.body
    ctype = reply.header("content-type") or ""
    if reply.status in (404, 405) and ctype.startswith("text/plain"):
        expected = b"404 page not found" if reply.status == 404 else b"405 method not allowed"
        assert reply.body == expected  # Ollama's own answer to an unknown route or method
        return
    if reply.status >= 400:
        assert "json" in ctype, (reply.status, ctype, reply.body[:300])
        error = json.loads(reply.body)["error"]
        if path.startswith("/v1/"):
            assert isinstance(error, dict), reply.body[:300]
            assert isinstance(error["message"], str)
            assert isinstance(error["type"], str)
        else:
            assert isinstance(error, str), reply.body[:300]
        return
    if "ndjson" in ctype:
        lines = [json.loads(line) for line in reply.body.splitlines() if line.strip()]
        assert lines
        assert all(isinstance(line, dict) for line in lines)
    elif "event-stream" in ctype:
        events = [e for e in reply.body.split(b"\n\n") if e.strip()]
        assert events
        first = b"event: " if path in NAMED_EVENTS else b"data: "
        assert all(e.startswith(first) for e in events)
    elif "json" in ctype and reply.body:
        assert isinstance(json.loads(reply.body), dict)


def check_routed(reply: Reply, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    check_shape(reply, path)
    expected = refusal(path, headers, body)
    if expected is not None:
        assert reply.status == expected, (reply.status, expected, reply.body[:300])
        assert reply.header("x-corral-backend") is None
    if 200 <= reply.status < 300:
        assert expected is None
        assert reply.header("x-corral-backend") == "sim", "a 2xx that no backend gave"


def assert_healthy(front: AsgiHarness) -> None:
    """corral answers /healthz, and nothing is left in flight or queued."""
    assert front.request("GET", "/healthz").status == 200
    runtime = front.runtime

    def state() -> tuple[list[int], int, float | None]:
        gauge = runtime.metrics.registry.get_sample_value(
            "corral_backend_in_flight", {"backend": "sim"}
        )
        return [b.in_flight for b in runtime.registry.all()], runtime.admission.queued, gauge

    in_flight, queued, gauge = front.call(state)
    assert in_flight == [0]
    assert queued == 0
    assert gauge in (None, 0.0)


# Tests --------------------------------------------------------------------------------------


def test_the_fuzzed_routes_are_every_routed_route() -> None:
    """The fuzzer covers every routed and fan-out route corral has (a new one needs adding)."""
    assert set(ROUTES) == set(ROUTED)
    assert set(MANAGEMENT) == {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}


def test_routed_bodies(front: AsgiHarness) -> None:
    """Any body (JSON of any type and field types, broken JSON, bytes, invalid UTF-8) on any
    routed endpoint: corral's own refusals exactly, the rest in shape, never a 5xx."""

    @given(path=st.sampled_from(ROUTES), body=bodies(), cuts=st.lists(st.integers(0, 400)))
    @settings(max_examples=examples(4))
    def run(path: str, body: bytes, cuts: list[int]) -> None:
        reply = front.request("POST", path, body=chunked(body, cuts))
        check_routed(reply, path, [], body)

    run()
    assert_healthy(front)


def test_routed_field_types(front: AsgiHarness) -> None:
    """A good model with every other field of any type (messages, stream, options, keep_alive
    and the rest): corral forwards it untouched, streaming or not, and relays the backend's
    answer or error in shape."""

    @given(
        path=st.sampled_from(ROUTES),
        model=st.sampled_from(MODELS[:4]),
        fields=request_objects,
        stream=st.sampled_from([True, False, None]),
    )
    @settings(max_examples=examples(3))
    def run(path: str, model: str, fields: dict[str, Any], stream: bool | None) -> None:
        data = {**fields, "model": model}
        if stream is not None:
            data["stream"] = stream
        body = json.dumps(data).encode()
        reply = front.request("POST", path, body=body)
        check_routed(reply, path, [], body)
        assert reply.header("x-corral-backend") == "sim", (reply.status, reply.body[:300])

    run()
    assert_healthy(front)


def test_routed_headers(front: AsgiHarness) -> None:
    """Garbage, huge and non-printable X-Priority, X-Request-ID, X-Session-ID and other
    headers on a good request: a bad X-Priority is a 400, the rest is served."""

    @given(
        path=st.sampled_from(ROUTES),
        model=st.sampled_from(MODELS),
        headers=odd_headers,
    )
    @settings(max_examples=examples(2))
    def run(path: str, model: str, headers: list[tuple[bytes, bytes]]) -> None:
        data: dict[str, Any] = {"model": model, "stream": False, "prompt": "hi", "input": "hi"}
        if "chat" in path:
            data["messages"] = [{"role": "user", "content": "hi"}]
        body = json.dumps(data).encode()
        reply = front.request("POST", path, headers=headers, body=body)
        check_routed(reply, path, headers, body)
        # The client's id comes back as sent when it is sane (ASCII, printable, at most 128
        # characters), else corral makes one.
        sent = next((v.decode("latin-1") for n, v in headers if n == b"x-request-id"), "")
        sane = 0 < len(sent) <= 128 and sent.isascii() and sent.isprintable()
        echoed = reply.header("x-request-id") or ""
        assert echoed == sent if sane else re.fullmatch("[0-9a-f]{32}", echoed), echoed

    run()
    assert_healthy(front)


def test_body_size_limit(front: AsgiHarness) -> None:
    """Bodies around the limit, in any chunks, with a Content-Length true, absent, garbage or
    lying either way: over the limit (sent or declared) is a 413, at or under it is served."""

    @given(
        path=st.sampled_from(ROUTES),
        size=st.integers(MAX_BODY_BYTES - 40, MAX_BODY_BYTES + 40)
        | st.sampled_from([MAX_BODY_BYTES * 3, 1]),
        declared=st.sampled_from(["true", "none", "small", "large", "garbage", "huge-number"]),
        cuts=st.lists(st.integers(0, 4 * MAX_BODY_BYTES), max_size=6),
    )
    @settings(max_examples=examples(1))
    def run(path: str, size: int, declared: str, cuts: list[int]) -> None:
        head = b'{"model": "llama3.2", "stream": false, "prompt": "'
        tail = b'", "input": "x", "messages": [{"role": "user", "content": "x"}]}'
        body = head + b"a" * max(0, size - len(head) - len(tail)) + tail
        length = {
            "true": str(len(body)).encode(),
            "small": b"2",
            "large": str(MAX_BODY_BYTES + 1).encode(),
            "garbage": b"lots",
            "huge-number": b"9" * 5000,  # over Python's int() digit limit
        }.get(declared)
        headers = [] if length is None else [(b"content-length", length)]
        reply = front.request("POST", path, headers=headers, body=chunked(body, cuts))
        check_routed(reply, path, headers, body)

    run()
    assert_healthy(front)


def test_deep_nesting(front: AsgiHarness) -> None:
    """JSON nested 5,000 levels deep or more (as deep as the body limit allows), at the top
    or inside a field: corral's 400 (or, where Python reads that deep, the backend's answer),
    never a RecursionError out of the app.

    From 5,000 levels: hypothesis raises the recursion limit while it runs an example, and
    below that corral would read bodies that the simulator (another process, at the default
    limit) cannot. test_deep_nesting_is_a_400 covers 1,000 levels at the default limit."""

    @given(
        path=st.sampled_from(ROUTES),
        depth=st.integers(5_000, MAX_BODY_BYTES // 7),  # 7: the most bytes a level takes
        where=st.sampled_from(["top", "model", "messages", "options", "keep_alive", "stream"]),
        brackets=st.sampled_from([("[", "]"), ('{"a":', "}")]),
    )
    @settings(max_examples=examples(0.5))
    def run(path: str, depth: int, where: str, brackets: tuple[str, str]) -> None:
        reply = front.request("POST", path, body=nested(depth, where, brackets))
        check_deep(reply, path)

    run()
    assert_healthy(front)


def nested(depth: int, where: str, brackets: tuple[str, str] = ("[", "]")) -> bytes:
    """A body with a value nested ``depth`` deep, the whole body or one field of a request."""
    opening, closing = brackets
    deep = opening * depth + ("1" if opening.startswith("{") else "") + closing * depth
    if where == "top":
        return deep.encode()
    return (f'{{"model": "llama3.2", "stream": false, "{where}": {deep}}}').encode()


def check_deep(reply: Reply, path: str) -> None:
    check_shape(reply, path)
    if not reply.header("x-corral-backend"):
        assert reply.status == 400, (reply.status, reply.body[:300])
        message = json.loads(reply.body)["error"]
        text = message["message"] if path.startswith("/v1/") else message
        assert text.startswith("invalid JSON: maximum recursion depth exceeded"), text


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("where", ["top", "options", "messages"])
def test_deep_nesting_is_a_400(front: AsgiHarness, path: str, where: str) -> None:
    """Regression: a body nested too deep for Python's json was a RecursionError out of the
    app (a 500 and a traceback); it is a 400 "invalid JSON" in the route's shape."""
    for depth in (1_000, 30_000):
        reply = front.request("POST", path, body=nested(depth, where))
        check_deep(reply, path)
    assert_healthy(front)


def test_non_ascii_request_id_is_replaced(front: AsgiHarness) -> None:
    """Regression: an X-Request-ID with non-ASCII bytes came back re-encoded as UTF-8 (not the
    id the client sent, nor the one the backend saw); such an id is replaced by a new one."""
    body = b'{"model": "llama3.2", "stream": false}'
    sane = front.request("POST", "/api/generate", headers=[(b"x-request-id", b"a-1 b")], body=body)
    assert sane.header("x-request-id") == "a-1 b"
    for sent in (b"\xc0", b"caf\xe9", b"\xa0x"):
        reply = front.request("POST", "/api/generate", headers=[(b"x-request-id", sent)], body=body)
        assert reply.status == 200
        assert re.fullmatch("[0-9a-f]{32}", reply.header("x-request-id") or "")


def test_methods_and_model_paths(front: AsgiHarness) -> None:
    """Any method on a routed route (405 in Ollama's words unless POST), and
    ``/v1/models/{model}`` with any model name."""

    @given(
        method=st.sampled_from(METHODS),
        path=st.sampled_from(ROUTES)
        | st.text(max_size=40).map(lambda m: "/v1/models/" + m)
        | st.sampled_from(MODELS).map(lambda m: "/v1/models/" + m),
        headers=odd_headers,
    )
    @settings(max_examples=examples(2))
    def run(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> None:
        reply = front.request(method, path, headers=headers)
        check_shape(reply, path, method)
        if _foreign_host(headers):
            assert reply.status == 403
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/") :]
            if method != "GET":
                assert reply.status == 405
            elif not name or "/" in name:
                assert (reply.status, reply.body) == (404, b"404 page not found")
            elif not _priority_ok(headers):
                assert reply.status == 400
            elif reply.status == 200:
                assert json.loads(reply.body)["id"]
        elif method != "POST":
            assert reply.status == 405
        else:
            assert reply.status == 400  # no body

    run()
    assert_healthy(front)


@pytest.fixture(scope="module")
def managed(sim: SimProcess) -> Iterator[tuple[AsgiHarness, AsgiHarness]]:
    """Two corrals on the same simulator: one with an admin key, one with none (loopback)."""
    keyed = start_corral(sim.url, admin_key=ADMIN_KEY)
    open_ = start_corral(sim.url, admin_key=None)
    yield keyed, open_
    keyed.stop()
    open_.stop()


MANAGED = (*MANAGEMENT, "/api/blobs/sha256:" + "0" * 64, "/api/blobs/sha256-x", "/api/blobs/")
credentials = st.sampled_from(
    [
        [(b"x-api-key", ADMIN_KEY.encode())],
        [(b"authorization", b"Bearer " + ADMIN_KEY.encode())],
        [(b"authorization", b"bearer   " + ADMIN_KEY.encode() + b"  ")],
        [],
        [(b"x-api-key", b"wrong")],
        [(b"authorization", b"Basic " + ADMIN_KEY.encode())],
        [(b"x-api-key", b"\xff" * 300)],
    ]
)
_MANAGEMENT_SAFE = {"/api/pull": "POST", "/api/push": "POST", "/api/create": "POST"}


def _authorized(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"x-api-key":
            return value == ADMIN_KEY.encode()
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return scheme.lower() == "bearer" and token.strip() == ADMIN_KEY
    return False


def test_management_fan_out(managed: tuple[AsgiHarness, AsgiHarness]) -> None:
    """pull/push/create/copy/delete/blobs with any method, credentials, query and body: 401
    without the admin key (403 off loopback when none is set), the body refusals of the
    routed routes, and otherwise the backends' answers merged in the documented shape."""
    keyed, open_ = managed

    @given(
        keyed_corral=st.booleans(),
        remote=st.booleans(),
        path=st.sampled_from(MANAGED),
        method=st.sampled_from(["POST", "DELETE", "HEAD", "GET"]),
        creds=credentials,
        query=st.sampled_from([b"", b"backend=sim", b"backend=nope", b"backend=", b"%ff=&&"]),
        body=bodies()
        | st.fixed_dictionaries(
            {"model": st.sampled_from(MODELS) | json_values},
            optional={
                "stream": st.sampled_from([False, True, None, "no"]),
                "source": st.text(max_size=10),
                "destination": st.text(max_size=10),
                "from": st.sampled_from(MODELS),
                "insecure": json_values,
            },
        ).map(lambda d: json.dumps(d).encode()),
    )
    @settings(max_examples=examples(3))
    def run(
        keyed_corral: bool,
        remote: bool,
        path: str,
        method: str,
        creds: list[tuple[bytes, bytes]],
        query: bytes,
        body: bytes,
    ) -> None:
        corral = keyed if keyed_corral else open_
        client = ("198.51.100.7", 40000) if remote else ("127.0.0.1", 40000)
        reply = corral.request(method, path, headers=creds, body=body, query=query, client=client)
        assert reply.complete
        assert b"Traceback" not in reply.body
        if method not in MANAGEMENT.get(path, ("HEAD", "POST")):
            assert (reply.status, reply.body) == (405, b"405 method not allowed")
            return
        if keyed_corral and not _authorized(creds):
            assert reply.status == 401
            assert reply.header("www-authenticate") == "Bearer"
        elif not keyed_corral and remote:
            assert reply.status == 403
        if reply.status >= 400 and method != "HEAD":
            report = json.loads(reply.body)
            assert isinstance(report["error"], str)
            if reply.status >= 500:
                # Only a backend's own failure, reported per backend (Ollama's failed pull is
                # a 500), is ever a 5xx.
                assert report["failed"] == ["sim"]
                assert "sim" in report["backends"]
        elif reply.status < 300 and reply.body:
            ctype = reply.header("content-type") or ""
            assert "json" in ctype, ctype
            for line in reply.body.splitlines():
                assert isinstance(json.loads(line), dict)

    run()
    assert_healthy(keyed)
    assert_healthy(open_)


# Over a real socket -------------------------------------------------------------------------

_GOOD = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'


def _exchange(port: int, raw: bytes, *, half_close: bool = False) -> list[int]:
    """Send ``raw`` to 127.0.0.1:``port``, read until the server closes (or 5 s), and return
    the status of every response in what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def _post(length: bytes | None, body: bytes, *, extra: bytes = b"") -> bytes:
    head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    return head + extra + b"\r\n" + body


def _chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# Each case: the raw request, the status the first answer may have (None: no answer), and
# whether the client stops sending after it (else the server closes when it is done).
SOCKET_CASES: dict[str, tuple[bytes, set[int | None], bool]] = {
    # Content-Length shorter than the body: the rest is read as the next request (garbage).
    "length-short": (_post(b"10", _GOOD + b"\r\n"), {400}, False),
    # Longer than the body, then the client stops sending: nothing to answer, no error.
    "length-long": (_post(b"500", _GOOD), {None}, True),
    "length-garbage": (_post(b"abc", _GOOD), {400}, False),
    "length-negative": (_post(b"-5", _GOOD), {400}, False),
    "length-over-limit": (_post(str(MAX_BODY_BYTES + 1).encode(), _GOOD), {413}, True),
    "two-lengths": (_post(b"5", _GOOD, extra=b"Content-Length: 6\r\n"), {400}, False),
    "chunked-over-limit": (
        _post(
            None,
            _chunked(b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}', 8192),
            extra=b"Transfer-Encoding: chunked\r\n",
        ),
        {413},
        True,
    ),
    "chunked-good": (
        _post(
            None, _chunked(_GOOD, 7), extra=b"Transfer-Encoding: chunked\r\nConnection: close\r\n"
        ),
        {200},
        False,
    ),
    # httptools has no header size limit of its own: uvicorn may serve it or hang up.
    "header-huge": (
        _post(b"%d" % len(_GOOD), _GOOD, extra=b"X-Session-ID: " + b"s" * 60_000 + b"\r\n"),
        {200, 400, 431, None},
        True,
    ),
}


@pytest.fixture(scope="module")
def served(sim: SimProcess) -> Iterator[Any]:
    """corral under uvicorn on a loopback port (the real HTTP parser in front of the app)."""
    config = make_settings(
        [{"id": "sim", "url": sim.url}], server={"max_body_mb": MAX_BODY_BYTES / 1_000_000}
    )
    with CorralThread(config) as corral:
        yield corral


@pytest.mark.parametrize("case", SOCKET_CASES)
def test_raw_http_framing(served: Any, case: str) -> None:
    """Content-Length that lies (short, long, garbage, negative, twice, over the limit),
    chunked bodies over the limit, a 60 kB header: the server's parser or corral answers
    with a 4xx or closes, never a 5xx, and corral stays healthy."""
    raw, expected, half_close = SOCKET_CASES[case]
    statuses = _exchange(served.port, raw, half_close=half_close)
    assert all(status < 500 for status in statuses), statuses
    assert (statuses[0] if statuses else None) in expected, statuses
    with served.client() as client:
        assert client.get("/healthz").status_code == 200
    assert served.call(lambda: [b.in_flight for b in served.runtime.registry.all()]) == [0]


# /v1/audio/transcriptions: a multipart upload, routed by its ``model`` form field ------------

AUDIO = "/v1/audio/transcriptions"
form_names = st.sampled_from(["model", "file", "language", "Model", 'model"', "", "mod\u00e9l"])


@st.composite
def multipart(draw: Any) -> tuple[bytes, bytes]:
    """(Content-Type, body) of a multipart form as a client might send it, or broken: parts in
    any order, with or without a file name, an odd boundary, a body cut short."""
    boundary = draw(st.sampled_from([b"xyz", b"----b0undary", b'"quoted"', b"", b"a" * 200]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(form_names).encode()
        filename = b'; filename="a.wav"' if draw(st.booleans()) else b""
        value = draw(st.sampled_from([b"llama3.2", b"no-such-model", b"", b"\xff\xfe", b"\0" * 50]))
        head = b'Content-Disposition: form-data; name="' + name + b'"' + filename
        parts.append(b"--" + boundary.strip(b'"') + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n")
    body = b"".join(parts) + b"--" + boundary.strip(b'"') + b"--\r\n"
    body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    ctype = draw(
        st.sampled_from(
            [
                b"multipart/form-data; boundary=" + boundary,
                b"multipart/form-data",
                b"MULTIPART/FORM-DATA;BOUNDARY=" + boundary,
                b"application/json",
                b"multipart/form-data; boundary=other",
            ]
        )
    )
    return ctype, body


def test_audio_uploads(front: AsgiHarness) -> None:
    """Any multipart form, well made or not, in any chunks: the answer is finished and in
    OpenAI's shape; without a readable ``model`` field it is corral's own 400 and no backend
    is asked; an unknown model is a 404; a 2xx only comes from the backend."""

    @given(form=multipart(), cuts=st.lists(st.integers(0, 400), max_size=4))
    @settings(max_examples=examples(3))
    def run(form: tuple[bytes, bytes], cuts: list[int]) -> None:
        ctype, body = form
        reply = front.request(
            "POST", AUDIO, headers=[(b"content-type", ctype)], body=chunked(body, cuts)
        )
        check_shape(reply, AUDIO)
        if 200 <= reply.status < 300:
            assert reply.header("x-corral-backend") == "sim"
        if reply.header("x-corral-backend") is None:
            assert reply.status in (400, 404), (reply.status, reply.body[:300])

    run()
    assert_healthy(front)
