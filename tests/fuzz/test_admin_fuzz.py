"""Fuzzing the admin API from its own OpenAPI schema (/openapi.json).

Every operation in the schema gets path parameters, query strings and bodies drawn from the
schema (valid) and from anywhere (invalid: other JSON, bytes, missing, wrong Content-Type),
with the admin key, a wrong key or none, from loopback or not. No answer is a 5xx; a 422 is
FastAPI's ``{"detail": [ValidationError]}`` as the schema documents it; 400, 401, 403, 404,
405 and 409 are ``{"detail": str}``; 401 comes whenever the key is missing or wrong, 403 off
loopback when no key is set. A body the schema accepts is refused with 422 only for what the
schema cannot say (a URL's scheme, a GPU reference).

Registered backends get loopback URLs only (the simulator, or a closed port): corral probes a
backend the moment it is added.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from corral.sim.harness import SimProcess
from corral.strategies import STRATEGIES
from tests.fuzz.conftest import ADMIN_KEY, AsgiHarness, Reply, examples, start_corral
from tests.helpers import free_port

pytestmark = pytest.mark.fuzz

PREFIX = "/api/v1/loadbalancer"
# Fields whose validators check more than the schema can express.
_BEYOND_SCHEMA = {"url", "gpu", "gpu_metrics_url"}
# Keys every 200 answer of these operations has.
_ANSWER_KEYS = {
    ("get", f"{PREFIX}/strategy"): {"strategy"},
    ("get", f"{PREFIX}/loads"): {"strategy", "count", "loads"},
    ("get", f"{PREFIX}/backends"): {"backends"},
    ("get", f"{PREFIX}/models"): {"models"},
    ("get", f"{PREFIX}/stats"): {"strategy", "backends", "healthy", "current_load", "queued"},
    ("get", "/healthz"): {"status"},
    ("get", "/readyz"): {"status", "healthy"},
}


@pytest.fixture(scope="module")
def admin(sim: SimProcess) -> Iterator[dict[str, Any]]:
    keyed = start_corral(sim.url, admin_key=ADMIN_KEY)
    open_ = start_corral(sim.url, admin_key=None)
    schema = json.loads(keyed.request("GET", "/openapi.json").body)
    yield {"keyed": keyed, "open": open_, "schema": schema, "sim": sim}
    keyed.stop()
    open_.stop()


def inline(node: Any, components: dict[str, Any]) -> Any:
    """``node`` with every ``$ref`` to ``#/components/schemas/`` replaced by its schema."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            return inline(components[ref.rsplit("/", 1)[-1]], components)
        return {k: inline(v, components) for k, v in node.items()}
    if isinstance(node, list):
        return [inline(v, components) for v in node]
    return node


def operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    components = schema.get("components", {}).get("schemas", {})
    found = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            found.append(
                {
                    "method": method,
                    "path": path,
                    "params": inline(op.get("parameters", []), components),
                    "body": inline(body.get("schema"), components) if body else None,
                    "body_required": op.get("requestBody", {}).get("required", False),
                }
            )
    return found


# Strategies ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for ``schema``: the JSON Schema that FastAPI writes for pydantic models
    (types, anyOf, enum, lengths, pattern, bounds, objects without extra keys)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        above = schema.get("exclusiveMinimum")
        int_low = None if low is None else math.ceil(low)
        if above is not None:
            int_low = max(math.floor(above) + 1, int_low if int_low is not None else -math.inf)
        ints = st.integers(int_low, None if high is None else math.floor(high))
        if kind == "integer":
            return ints
        floats = st.floats(
            min_value=low if above is None else above,
            max_value=high,
            exclude_min=above is not None,
            allow_nan=False,
            allow_infinity=False,
        )
        return ints | floats
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda s: low <= len(s) <= (high if high is not None else len(s))
            )
        return st.text(min_size=low, max_size=high if high is not None else 40)
    if kind == "array":
        items = from_schema(schema.get("items", {}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    return json_values


odd_text = st.text(max_size=30) | st.sampled_from(["", " ", "/", "..", "%2F", "a/b", "\x00", "é"])


def _loopback(url: Any) -> bool:
    try:
        host = urlsplit(url.strip()).hostname
    except (ValueError, AttributeError):
        return True  # not a URL corral would take: it never leaves the validator
    return host in (None, "127.0.0.1", "localhost", "::1")


def safe(body: Any, sim_url: str, dead_url: str) -> Any:
    """``body`` with every URL corral would call pointed at loopback (the simulator or a
    closed port): nothing in a fuzz run may reach another host."""
    if isinstance(body, dict):
        body = dict(body)
        for key, target in (("url", sim_url), ("gpu_metrics_url", sim_url + "/_sim/dcgm")):
            if key in body and not _loopback(body[key]):
                body[key] = target if len(str(body[key])) % 2 else dead_url
    return body


def param_values(param: dict[str, Any]) -> st.SearchStrategy[Any]:
    name = param["name"]
    values: st.SearchStrategy[Any] = from_schema(param["schema"]) | odd_text
    if name in ("backend_id", "instance_id"):
        values = st.sampled_from(["sim", "dyn-1", "nope"]) | values
    elif name == "name":
        values = st.sampled_from(["llama3.2", "llama3.2:latest", "library/x:1", "nope"]) | values
    return values


@st.composite
def requests(draw: st.DrawFn, op: dict[str, Any], sim_url: str, dead_url: str) -> dict[str, Any]:
    """One request for ``op``: path, query string, body bytes and Content-Type."""
    path = op["path"]
    query: list[tuple[str, str]] = []
    for param in op["params"]:
        if param["in"] == "path":
            value = draw(param_values(param))
            path = path.replace("{" + param["name"] + "}", str(value))
        elif param["in"] == "query" and draw(st.integers(0, 3)):  # sometimes left out
            value = draw(param_values(param))
            text = json.dumps(value) if isinstance(value, bool) else str(value)
            query.append((param["name"], text))
    if draw(st.integers(0, 5)) == 0:
        query.append((draw(st.text(max_size=8)), draw(st.text(max_size=8))))
    valid_body = False
    raw = b""
    kind = draw(st.sampled_from(["valid", "valid", "json", "bytes", "none"]))
    if op["body"] is not None and kind == "valid":
        value = draw(from_schema(op["body"]))
        if op["path"].endswith("/strategy") and draw(st.booleans()):
            value = {"strategy": draw(st.sampled_from(sorted(STRATEGIES)))}
        value = safe(value, sim_url, dead_url)
        raw, valid_body = json.dumps(value).encode(), True
    elif kind in ("json", "valid"):
        raw = json.dumps(safe(draw(json_values), sim_url, dead_url)).encode()
    elif kind == "bytes":
        raw = draw(st.binary(max_size=80))
        with contextlib.suppress(ValueError, RecursionError):
            assume(_all_loopback(json.loads(raw)))
    ctype = draw(st.sampled_from([b"application/json", b"application/json", b"text/plain", None]))
    return {
        "path": path,
        "query": urlencode(query).encode(),
        "body": raw,
        "content_type": ctype,
        "valid_body": valid_body and ctype == b"application/json",
    }


def _all_loopback(value: Any) -> bool:
    if not isinstance(value, dict):
        return True
    return all(_loopback(value[k]) for k in ("url", "gpu_metrics_url") if k in value)


credentials = st.sampled_from(
    [
        [(b"x-api-key", ADMIN_KEY.encode())],
        [(b"authorization", b"Bearer " + ADMIN_KEY.encode())],
        [],
        [(b"x-api-key", b"")],
        [(b"x-api-key", ADMIN_KEY[:-1].encode())],
        [(b"authorization", b"Basic " + ADMIN_KEY.encode())],
        [(b"authorization", b"Bearer")],
        [(b"x-api-key", b"\xff\xfe" * 100)],
    ]
)


def _has_key(creds: list[tuple[bytes, bytes]]) -> bool:
    given_key = dict(creds).get(b"x-api-key")
    if given_key is None and b"authorization" in dict(creds):
        scheme, _, token = dict(creds)[b"authorization"].decode("latin-1").partition(" ")
        given_key = token.strip().encode() if scheme.lower() == "bearer" else None
    return given_key == ADMIN_KEY.encode()


# The oracle ---------------------------------------------------------------------------------


def check_answer(
    reply: Reply,
    op: dict[str, Any],
    request: dict[str, Any],
    *,
    admin_path: bool,
    must_deny: int | None,
    validation: dict[str, Any],
) -> None:
    assert reply.complete
    assert reply.status < 500 or (op["path"] == "/readyz" and reply.status == 503), (
        reply.status,
        reply.body[:300],
    )
    assert b"Traceback" not in reply.body
    if 300 <= reply.status < 400:
        # Starlette's trailing-slash redirect, for an empty path parameter.
        assert request["path"].endswith("/")
        assert reply.header("location")
        return
    ctype = reply.header("content-type") or ""
    if op["path"] == "/metrics" and reply.status == 200:
        assert ctype.startswith("text/plain")
        return
    if not admin_path and reply.status in (404, 405) and ctype.startswith("text/plain"):
        return  # Ollama's plain answers outside the admin API
    assert ctype.startswith("application/json"), (reply.status, ctype, reply.body[:200])
    data = json.loads(reply.body)
    if op["path"] == "/readyz":
        assert reply.status in (200, 503), reply.status
        assert {"status", "healthy"} <= set(data), data
        return
    if must_deny is not None and reply.status not in (404, 405, 307):
        assert reply.status == must_deny, (reply.status, must_deny, reply.body[:200])
    if reply.status == 422:
        check_validation_error(data, validation)
        if request["valid_body"]:
            # The schema accepted this body: only checks it cannot express may refuse it.
            for error in data["detail"]:
                assert error["loc"][0] != "body" or _BEYOND_SCHEMA & set(map(str, error["loc"])), (
                    error
                )
    elif reply.status >= 400:
        assert set(data) == {"detail"}, data
        assert isinstance(data["detail"], str), data
        if reply.status == 401:
            assert reply.header("www-authenticate") == "Bearer"
    else:
        assert isinstance(data, dict)
        expected = _ANSWER_KEYS.get((op["method"], op["path"]), set())
        assert expected <= set(data), (expected, data)


def validation_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The documented 422 body, HTTPValidationError, with its references resolved."""
    components = schema["components"]["schemas"]
    found: dict[str, Any] = inline(components["HTTPValidationError"], components)
    return found


def check_validation_error(data: Any, validation: dict[str, Any]) -> None:
    """``data`` is the documented HTTPValidationError: ``{"detail": [ValidationError]}``."""
    assert isinstance(data, dict), data
    assert set(data) == {"detail"}, data
    assert isinstance(data["detail"], list), data
    assert data["detail"], data
    error_schema = validation["properties"]["detail"]["items"]
    for error in data["detail"]:
        assert set(error_schema["required"]) <= set(error), error
        assert set(error) <= set(error_schema["properties"]), error
        assert isinstance(error["msg"], str)
        assert isinstance(error["type"], str)
        assert isinstance(error["loc"], list)
        assert all(isinstance(part, str | int) for part in error["loc"])


# Tests --------------------------------------------------------------------------------------


def test_the_schema_lists_the_admin_api(admin: dict[str, Any]) -> None:
    """/openapi.json documents every admin operation the fuzzer below relies on."""
    ops = {(op["method"], op["path"]) for op in operations(admin["schema"])}
    assert ("put", f"{PREFIX}/strategy") in ops
    assert ("post", f"{PREFIX}/backends") in ops
    assert ("delete", f"{PREFIX}/backends/{{backend_id}}") in ops
    assert len(ops) >= 15


def test_admin_api_from_its_schema(admin: dict[str, Any]) -> None:
    """Every operation, valid and invalid inputs, any credentials: no 5xx, documented shapes,
    401/403 exactly when the caller may not use the admin API."""
    schema = admin["schema"]
    ops = operations(schema)
    validation = validation_schema(schema)
    sim_url, dead_url = admin["sim"].url, f"http://127.0.0.1:{free_port()}"

    @given(
        data=st.data(),
        op=st.sampled_from(ops),
        keyed=st.booleans(),
        remote=st.booleans(),
        creds=credentials,
    )
    @settings(max_examples=examples(6))
    def run(
        data: st.DataObject,
        op: dict[str, Any],
        keyed: bool,
        remote: bool,
        creds: list[tuple[bytes, bytes]],
    ) -> None:
        request = data.draw(requests(op, sim_url, dead_url))
        corral: AsgiHarness = admin["keyed" if keyed else "open"]
        headers = list(creds)
        if request["content_type"] is not None:
            headers.append((b"content-type", request["content_type"]))
        client = ("192.0.2.9", 40000) if remote else ("127.0.0.1", 40000)
        reply = corral.request(
            op["method"].upper(),
            request["path"],
            headers=headers,
            body=request["body"],
            query=request["query"],
            client=client,
        )
        admin_path = op["path"].startswith(PREFIX)
        must_deny = None
        if admin_path and keyed and not _has_key(creds):
            must_deny = 401
        elif admin_path and not keyed and remote:
            must_deny = 403
        check_answer(
            reply,
            op,
            request,
            admin_path=admin_path,
            must_deny=must_deny,
            validation=validation,
        )

    run()
    for corral in (admin["keyed"], admin["open"]):
        assert corral.request("GET", "/healthz").status == 200
        assert corral.call(lambda c=corral: c.runtime.admission.queued) == 0


def test_admin_api_wrong_methods(admin: dict[str, Any]) -> None:
    """A method a path does not have: 405 ``{"detail": str}`` under the admin prefix."""
    schema = admin["schema"]
    paths = [p for p in schema["paths"] if p.startswith(PREFIX)]

    @given(
        path=st.sampled_from(paths),
        method=st.sampled_from(["GET", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE"]),
        creds=credentials,
    )
    @settings(max_examples=examples(1))
    def run(path: str, method: str, creds: list[tuple[bytes, bytes]]) -> None:
        assume(method.lower() not in schema["paths"][path])
        concrete = path.replace("{backend_id}", "sim").replace("{name}", "llama3.2")
        reply = admin["keyed"].request(method, concrete, headers=creds)
        assert reply.status == 405, (reply.status, reply.body[:200])
        assert json.loads(reply.body) == {"detail": "Method Not Allowed"}

    run()


_KEY = (b"x-api-key", ADMIN_KEY.encode())
_JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"\x80\xff", b"text/plain"),
        (b'{"strategy": "' + b"\\ud800" * 70 + b'"}', b"application/json"),
        (b'{"strategy": NaN}', b"application/json"),
        (b'{"weight": -Infinity}', b"application/json"),
    ],
    ids=["not-utf8", "lone-surrogate", "nan", "infinity"],
)
def test_unencodable_input_is_a_422(admin: dict[str, Any], body: bytes, ctype: bytes) -> None:
    """Regression: FastAPI's 422 handler echoes the input back, and failed with a 500 on bytes
    that are not UTF-8, a lone surrogate or NaN; the admin API answers the 422 itself."""
    validation = validation_schema(admin["schema"])
    for method, path in (("PUT", f"{PREFIX}/strategy"), ("PATCH", f"{PREFIX}/backends/sim")):
        reply = admin["keyed"].request(
            method, path, headers=[_KEY, (b"content-type", ctype)], body=body
        )
        assert reply.status == 422, reply.body[:300]
        check_validation_error(json.loads(reply.body), validation)


@pytest.mark.parametrize("body", [b"\x00", b"{", b"[" * 5000, b'{"strategy": 1}'])
def test_caller_is_checked_before_the_body(admin: dict[str, Any], body: bytes) -> None:
    """Regression: a body that was not JSON got a 422 (read and parsed in full) before the
    admin key was checked; a caller without the key gets 401 (403 off loopback when no key
    is set) whatever it sends, and one with the key the 422 or 400."""
    path = f"{PREFIX}/strategy"
    denied = admin["keyed"].request("PUT", path, headers=[_JSON], body=body)
    assert denied.status == 401
    assert json.loads(denied.body) == {"detail": "unauthorized"}
    remote = admin["open"].request("PUT", path, headers=[_JSON], body=body, client=("192.0.2.9", 1))
    assert remote.status == 403
    allowed = admin["keyed"].request("PUT", path, headers=[_KEY, _JSON], body=body)
    assert allowed.status in (400, 422)
