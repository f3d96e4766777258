"""The CLI's client commands against the admin API (respx): status, backends, strategy, gpus,
models; their tables, --json, and the one-line errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx
from typer.testing import CliRunner, Result

from corral.cli.main import app
from tests.unit.cli import test_cli

runner = CliRunner()
URL = "http://corral.test:11434"
API = f"{URL}/api/v1/loadbalancer"
GIB = 1024**3
NARROW = {"COLUMNS": "100"}


def entry(bid: str, **fields: Any) -> dict[str, Any]:
    """A ``loads`` entry as the admin API answers it (up, idle, no GPU reading)."""
    base: dict[str, Any] = {
        "instance_id": bid,
        "url": f"http://10.0.0.{len(bid)}:11434",
        "active_connections": 0,
        "max_concurrent": 4,
        "total_connections": 0,
        "failures": 0,
        "avg_response_time": None,
        "ttft_ewma_s": None,
        "weight": 1.0,
        "healthy": True,
        "draining": False,
        "ejected": False,
        "dynamic": False,
        "fallback": False,
        "gpu": None,
        "gpu_metrics_url": None,
        "gpu_stats": None,
    }
    return {**base, **fields}


H100 = test_cli.LOADS["loads"]["gpu0"]["gpu_stats"]  # an H100 as NVML reads it
LOADS = {
    "strategy": "least_connections",
    "count": 4,
    "loads": {
        "gpu0": entry(
            "gpu0",
            active_connections=3,
            total_connections=1042,
            avg_response_time=0.412,
            weight=3.0,
            gpu=0,
            gpu_stats=H100,
        ),
        "gpu1": entry(
            "gpu1",
            total_connections=7,
            failures=3,
            healthy=False,
            weight=1.5,
            gpu_stats={**H100, "name": "NVIDIA L4", "temperature_c": 88, "hot": True},
        ),
        "gpu2": entry("gpu2", draining=True, active_connections=1, avg_response_time=2.5),
        "remote": entry(
            "remote",
            ejected=True,
            gpu_stats={"source": "ollama", "name": None, "memory_used_bytes": 2 * GIB},
        ),
    },
}
STATS = {
    "strategy": "least_connections",
    "backends": 4,
    "healthy": 2,
    "total_capacity": 8,
    "current_load": 4,
    "utilization": 0.5,
    "queued": 5,
    "retried": 2,
}


def mock_status(loads: Any = LOADS, stats: Any = STATS) -> tuple[respx.Route, respx.Route]:
    return (
        respx.get(f"{API}/loads").mock(return_value=httpx.Response(200, json=loads)),
        respx.get(f"{API}/stats").mock(return_value=httpx.Response(200, json=stats)),
    )


def ctrl_c_on_nap(monkeypatch: pytest.MonkeyPatch, naps: int) -> list[float]:
    """Stand in for ``time.sleep`` in the CLI: record each nap, press Ctrl-C on the last."""
    taken: list[float] = []

    def nap(seconds: float) -> None:
        taken.append(seconds)
        if len(taken) == naps:
            raise KeyboardInterrupt

    monkeypatch.setattr("corral.cli.client.time.sleep", nap)
    return taken


def row(output: str, *words: str) -> str:
    return next(line for line in output.splitlines() if all(w in line for w in words))


def one_error_line(result: Result) -> str:
    """The command failed with exit 1 and said why in exactly one line, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


# corral status ------------------------------------------------------------------------------


@respx.mock
def test_status_table_has_the_seed_columns_and_fits_100_columns() -> None:
    """INSTANCE, GPU, HEALTH, ACTIVE, TOTAL, AVG RT, WEIGHT; each backend's GPU in one cell;
    up/down/draining/ejected; no line wider than 100."""
    mock_status()
    result = runner.invoke(app, ["status", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100
    header = row(result.output, "INSTANCE")
    for col in ("GPU", "HEALTH", "ACTIVE", "TOTAL", "AVG RT", "WEIGHT"):
        assert col in header
    assert header.index("INSTANCE") < header.index("GPU") < header.index("HEALTH")
    assert header.index("ACTIVE") < header.index("TOTAL") < header.index("AVG RT")
    gpu0 = row(result.output, "gpu0")
    for cell in ("H100 80GB HBM3 99% 1.3/79.6 GiB 54°C", " up ", "3/4", "1042", "412 ms", " 3 "):
        assert cell in gpu0, (cell, gpu0)
    assert "NVIDIA" not in gpu0
    gpu1 = row(result.output, "gpu1")
    assert " down " in gpu1
    assert "88°C hot" in gpu1
    assert " 7 " in gpu1
    assert " 1.5 " in gpu1
    gpu2 = row(result.output, "gpu2")
    assert " draining " in gpu2
    assert "1/4" in gpu2
    assert "2.50 s" in gpu2
    remote = row(result.output, "remote")
    assert " ejected " in remote
    assert "(from /api/ps) 2.0 GiB used" in remote
    assert f"corral at {URL}" in result.output


@respx.mock
def test_status_prints_queue_and_utilization_lines() -> None:
    """Under the table: how many requests wait; slots in use, healthy backends, strategy and
    retries; failed requests per backend."""
    mock_status()
    result = runner.invoke(app, ["status", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "queue: 5 waiting" in lines
    assert (
        "utilization: 4/8 slots (50%), 2/4 backends healthy, strategy least_connections, "
        "2 retried" in lines
    )
    assert "failed requests: 3 (gpu1 3)" in lines


@respx.mock
def test_status_queue_line_by_priority() -> None:
    """A corral that reports its queue per priority gets it listed, most urgent first."""
    mock_status(stats={**STATS, "queued": {"low": 2, "normal": 0, "high": 1, "urgent": 0}})
    result = runner.invoke(app, ["status", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    assert "queue: 3 waiting (1 high, 2 low)" in result.output.splitlines()


@respx.mock
def test_status_wraps_long_gpu_names_instead_of_cutting_columns() -> None:
    """On a 100-column terminal a long GPU cell wraps; every other cell stays whole."""
    loads = {
        "strategy": "score",
        "loads": {
            "a-rather-long-backend": entry(
                "a-rather-long-backend",
                total_connections=123456,
                avg_response_time=12.5,
                gpu_stats={**H100, "name": "4× NVIDIA RTX 6000 Ada Generation + NVIDIA L40S"},
            )
        },
    }
    mock_status(loads=loads)
    result = runner.invoke(app, ["status", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    first = row(result.output, "a-rather-long-backend")
    for cell in ("123456", "12.50 s", " up ", "0/4"):
        assert cell in first
    assert "…" not in result.output


@respx.mock
def test_status_json_is_loads_with_stats() -> None:
    """--json: GET /loads as it was (strategy, count, loads) with GET /stats under "stats"."""
    mock_status()
    result = runner.invoke(app, ["status", "--json", "--url", URL])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == {**LOADS, "stats": STATS}


@respx.mock
def test_status_watch_refreshes_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """--watch asks again every --interval seconds; Ctrl-C ends it with exit 0, no traceback."""
    loads, stats = mock_status()
    naps = ctrl_c_on_nap(monkeypatch, 3)
    result = runner.invoke(
        app, ["status", "--watch", "--interval", "0.5", "--url", URL], env=NARROW
    )
    assert result.exit_code == 0, result.output
    assert naps == [0.5, 0.5, 0.5]
    assert loads.call_count == 3
    assert stats.call_count == 3
    assert "Ctrl-C to stop" in result.stderr
    assert "INSTANCE" in result.stdout
    assert "Aborted" not in result.output


@respx.mock
def test_status_watch_keeps_going_when_corral_is_briefly_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While watching, a corral that stops answering is shown as an error line under the last
    table and asked again; it does not end the watch."""
    respx.get(f"{API}/loads").mock(
        side_effect=[
            httpx.Response(200, json=LOADS),
            httpx.ConnectError("refused"),
            httpx.ConnectError("refused"),
        ]
    )
    respx.get(f"{API}/stats").mock(return_value=httpx.Response(200, json=STATS))
    ctrl_c_on_nap(monkeypatch, 3)
    result = runner.invoke(app, ["status", "--watch", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    assert "gpu0" in result.stdout
    assert f"error: cannot reach corral at {URL}: refused (retrying every 2s)" in result.stdout


@respx.mock
def test_status_watch_stops_on_a_refused_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 401 while watching is not retried: one line, exit 1."""
    respx.get(f"{API}/loads").mock(return_value=httpx.Response(401, json={"detail": "no"}))
    monkeypatch.setattr("corral.cli.client.time.sleep", lambda s: None)
    result = runner.invoke(app, ["status", "--watch", "--url", URL])
    assert "admin key" in one_error_line(result)


@respx.mock
def test_status_watch_json_prints_one_object_per_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """--watch --json: one compact JSON object per line, for scripts that tail it."""
    mock_status()
    ctrl_c_on_nap(monkeypatch, 2)
    result = runner.invoke(app, ["status", "--watch", "--json", "--url", URL])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(json.loads(line) == {**LOADS, "stats": STATS} for line in lines)


# corral backends ----------------------------------------------------------------------------

BACKENDS = {
    "backends": [
        entry("gpu1", fallback=True, gpu_stats={**H100, "name": "NVIDIA L4"}),
        entry("gpu0", active_connections=2, weight=3.0, gpu=0, gpu_stats=H100),
        entry("edge", dynamic=True, gpu_metrics_url="http://10.0.0.9:9400/metrics", gpu=[0, 1]),
    ]
}


@respx.mock
@pytest.mark.parametrize("args", [["backends"], ["backends", "list"]])
def test_backends_lists_each_backend(args: list[str]) -> None:
    """`corral backends` and `corral backends list`: one row per backend, sorted, with URL,
    health, in flight, weight, GPU and notes (fallback, dynamic, DCGM)."""
    respx.get(f"{API}/backends").mock(return_value=httpx.Response(200, json=BACKENDS))
    result = runner.invoke(app, [*args, "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    ids = [line.split()[1] for line in result.output.splitlines() if line.startswith("│")]
    assert ids == ["edge", "gpu0", "gpu1"]
    gpu0 = row(result.output, "gpu0")
    for cell in ("http://10.0.0.4:11434", " up ", "2/4", " 3 ", "H100 80GB HBM3"):
        assert cell in gpu0
    assert "fallback" in row(result.output, "gpu1")
    edge = row(result.output, "edge")
    assert "0, 1" in edge
    assert "ttl, dcgm" in edge


@respx.mock
@pytest.mark.parametrize(
    "args", [["backends", "--json"], ["backends", "list", "--json"], ["backends", "--json", "list"]]
)
def test_backends_json(args: list[str]) -> None:
    """--json prints the API's answer, given to the subcommand or to `backends` before it."""
    respx.get(f"{API}/backends").mock(return_value=httpx.Response(200, json=BACKENDS))
    result = runner.invoke(app, args, env={"CORRAL_URL": URL})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == BACKENDS


@respx.mock
def test_backends_add_posts_every_option() -> None:
    """add ID URL with its options POSTs the admin API's fields and says the new state."""
    route = respx.post(f"{API}/backends").mock(
        return_value=httpx.Response(
            201, json=entry("gpu3", url="http://10.0.0.3:11434", max_concurrent=8, weight=2.0)
        )
    )
    result = runner.invoke(
        app,
        [
            "backends",
            "add",
            "gpu3",
            "http://10.0.0.3:11434",
            "--max-concurrent",
            "8",
            "--weight",
            "2",
            "--gpu",
            "0,1",
            "--gpu",
            "GPU-abc",
            "--gpu-metrics-url",
            "http://10.0.0.3:9400/metrics",
            "--fallback",
            "--ttl",
            "30",
            "--url",
            URL,
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(route.calls.last.request.content) == {
        "id": "gpu3",
        "url": "http://10.0.0.3:11434",
        "max_concurrent": 8,
        "weight": 2.0,
        "gpu": [0, 1, "GPU-abc"],
        "gpu_metrics_url": "http://10.0.0.3:9400/metrics",
        "fallback": True,
        "ttl_s": 30.0,
    }
    assert (
        result.stdout.strip() == "added gpu3 (http://10.0.0.3:11434): up, 0/8 in flight, weight 2"
    )


@respx.mock
def test_backends_add_minimal_warns_when_the_backend_is_down() -> None:
    """Only ID and URL are sent when no option is given; a backend corral could not reach is
    added, with a warning on stderr; --json prints the new entry."""
    down = entry("gpu3", url="http://10.0.0.3:11434", healthy=False)
    route = respx.post(f"{API}/backends").mock(return_value=httpx.Response(201, json=down))
    result = runner.invoke(app, ["backends", "add", "gpu3", "http://10.0.0.3:11434", "--url", URL])
    assert result.exit_code == 0, result.output
    assert json.loads(route.calls.last.request.content) == {
        "id": "gpu3",
        "url": "http://10.0.0.3:11434",
    }
    assert "added gpu3 (http://10.0.0.3:11434): down" in result.stdout
    assert "warning: gpu3 does not answer yet; corral keeps probing it" in result.stderr
    result = runner.invoke(
        app, ["backends", "add", "gpu3", "http://10.0.0.3:11434", "--json", "--url", URL]
    )
    assert json.loads(result.stdout) == down


@respx.mock
def test_backends_add_conflict_and_invalid_are_one_line() -> None:
    """409 (the ID exists) and 422 (a bad field) each give one line naming the problem."""
    route = respx.post(f"{API}/backends").mock(
        side_effect=[
            httpx.Response(409, json={"detail": "backend 'gpu0' already exists"}),
            httpx.Response(
                422,
                json={
                    "detail": [
                        {
                            "loc": ["body", "url"],
                            "msg": "Value error, invalid URL 'x': expected http://host:port",
                            "type": "value_error",
                        }
                    ]
                },
            ),
        ]
    )
    result = runner.invoke(app, ["backends", "add", "gpu0", "http://h:1", "--url", URL])
    assert one_error_line(result) == "error: 409: backend 'gpu0' already exists"
    result = runner.invoke(app, ["backends", "add", "gpu9", "x", "--url", URL])
    assert one_error_line(result) == (
        "error: 422: url: Value error, invalid URL 'x': expected http://host:port"
    )
    assert route.call_count == 2


@respx.mock
def test_backends_remove_waits_and_reports() -> None:
    """remove DELETEs (corral drains and waits), then says so; --force adds ?force=true and
    mentions requests still running; --json prints the answer."""
    route = respx.delete(f"{API}/backends/gpu2").mock(
        side_effect=[
            httpx.Response(200, json={"removed": "gpu2", "in_flight": 0}),
            httpx.Response(200, json={"removed": "gpu2", "in_flight": 2}),
            httpx.Response(200, json={"removed": "gpu2", "in_flight": 0}),
        ]
    )
    result = runner.invoke(app, ["backends", "remove", "gpu2", "--url", URL])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "removed gpu2"
    assert "force" not in route.calls[0].request.url.params
    result = runner.invoke(app, ["backends", "remove", "gpu2", "--force", "--url", URL])
    assert result.exit_code == 0, result.output
    assert route.calls[1].request.url.params["force"] == "true"
    assert "removed gpu2 (2 request(s) still in flight finish on their own)" in result.stdout
    result = runner.invoke(app, ["backends", "remove", "gpu2", "--json", "--url", URL])
    assert json.loads(result.stdout) == {"removed": "gpu2", "in_flight": 0}


@respx.mock
def test_backends_remove_still_busy_suggests_force() -> None:
    """A 409 (requests still running after the drain timeout) says to add --force."""
    respx.delete(f"{API}/backends/gpu2").mock(
        return_value=httpx.Response(
            409,
            json={
                "detail": "backend 'gpu2' still has 1 request(s) in flight after 60s; it stays "
                "drained: retry, or DELETE with ?force=true"
            },
        )
    )
    result = runner.invoke(app, ["backends", "remove", "gpu2", "--url", URL])
    line = one_error_line(result)
    assert line.startswith("error: 409: backend 'gpu2' still has 1 request(s) in flight")
    assert line.endswith("retry, or add --force")


@respx.mock
@pytest.mark.parametrize(
    ("action", "said"),
    [
        ("drain", "gpu1 draining: no new requests; 2 in flight will finish"),
        ("enable", "gpu1 enabled: up, 2/4 in flight, weight 1"),
    ],
)
def test_backends_drain_and_enable(action: str, said: str) -> None:
    """drain and enable PATCH the action and say the backend's new state; --json prints it."""
    answer = entry("gpu1", active_connections=2, draining=action == "drain")
    route = respx.patch(f"{API}/backends/gpu1").mock(return_value=httpx.Response(200, json=answer))
    result = runner.invoke(app, ["backends", action, "gpu1", "--url", URL])
    assert result.exit_code == 0, result.output
    assert json.loads(route.calls.last.request.content) == {"action": action}
    assert result.stdout.strip() == said
    result = runner.invoke(app, ["backends", action, "gpu1", "--json", "--url", URL])
    assert json.loads(result.stdout) == answer


@respx.mock
@pytest.mark.parametrize("action", ["drain", "enable", "remove"])
def test_unknown_backend_is_one_line(action: str) -> None:
    """An unknown backend ID: `error: 404: unknown backend 'x'`, exit 1."""
    detail = {"detail": "unknown backend 'x'"}
    respx.patch(f"{API}/backends/x").mock(return_value=httpx.Response(404, json=detail))
    respx.delete(f"{API}/backends/x").mock(return_value=httpx.Response(404, json=detail))
    result = runner.invoke(app, ["backends", action, "x", "--url", URL])
    assert one_error_line(result) == "error: 404: unknown backend 'x'"


# strategy, gpus, models -------------------------------------------------------------------


@respx.mock
def test_strategy_json() -> None:
    """--json prints the API's answer for a read and for a switch."""
    respx.get(f"{API}/strategy").mock(
        return_value=httpx.Response(200, json={"strategy": "round_robin"})
    )
    switched = {"strategy": "score", "message": "strategy changed from round_robin to score"}
    respx.put(f"{API}/strategy").mock(return_value=httpx.Response(200, json=switched))
    result = runner.invoke(app, ["strategy", "--json", "--url", URL])
    assert json.loads(result.stdout) == {"strategy": "round_robin"}
    result = runner.invoke(app, ["strategy", "score", "--json", "--url", URL])
    assert json.loads(result.stdout) == switched


@respx.mock
def test_gpus_from_a_corral_fit_100_columns_and_json() -> None:
    """`corral gpus --url` on a 100-column terminal leaves the UUID out rather than cutting
    cells; --json prints the API's answer."""
    gpus = {
        "nvml": False,
        "gpus": [
            {
                "index": 0,
                "name": "NVIDIA H100 80GB HBM3",
                "uuid": "GPU-8668b62e-2c56-e219-7519-90d6ea0d5e11",
                "memory_used_bytes": 2 * GIB,
                "memory_total_bytes": 80 * GIB,
                "utilization_ratio": 0.5,
                "temperature_c": 40,
                "power_w": 300.0,
                "power_limit_w": 700.0,
                "hot": False,
                "host": "10.0.0.5:9400",
                "backends": ["gpu0"],
            }
        ],
    }
    respx.get(f"{API}/gpus").mock(return_value=httpx.Response(200, json=gpus))
    result = runner.invoke(app, ["gpus", "--url", URL], env=NARROW)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    assert "…" not in result.output
    line = row(result.output, "H100")
    for cell in ("50%", "2.0/80.0 GiB", "40°C", "300 W / 700 W", "gpu0", "10.0.0.5:9400"):
        assert cell in line
    result = runner.invoke(app, ["gpus", "--url", URL, "--json"])
    assert json.loads(result.stdout) == gpus


# errors -------------------------------------------------------------------------------------

EVERY_COMMAND = [
    ["status"],
    ["strategy"],
    ["backends"],
    ["backends", "drain", "gpu0"],
    ["gpus", "--url", URL],
    ["models"],
]


@respx.mock
@pytest.mark.parametrize("args", EVERY_COMMAND)
def test_unreachable_corral_is_one_line(args: list[str]) -> None:
    """Nothing listening: `error: cannot reach corral at URL: ...`, exit 1, every command."""
    respx.route(host="corral.test").mock(side_effect=httpx.ConnectError("Connection refused"))
    result = runner.invoke(app, args, env={"CORRAL_URL": URL})
    assert one_error_line(result) == f"error: cannot reach corral at {URL}: Connection refused"


@respx.mock
@pytest.mark.parametrize("args", EVERY_COMMAND)
def test_missing_admin_key_says_how_to_give_one(args: list[str]) -> None:
    """A 401 with no key given says one is needed and how to pass it, every command."""
    route = respx.route(host="corral.test").mock(
        return_value=httpx.Response(401, json={"detail": "unauthorized"})
    )
    result = runner.invoke(app, args, env={"CORRAL_URL": URL})
    assert one_error_line(result) == (
        "error: 401: this corral needs an admin key; pass --admin-key KEY or set CORRAL_ADMIN_KEY"
    )
    assert "x-api-key" not in route.calls.last.request.headers


@respx.mock
def test_wrong_admin_key_says_it_was_refused() -> None:
    """A 401 with a key given says the key was refused; the key went as X-API-Key."""
    route = respx.get(f"{API}/loads").mock(
        return_value=httpx.Response(401, json={"detail": "unauthorized"})
    )
    result = runner.invoke(app, ["status", "--admin-key", "nope", "--url", URL])
    assert one_error_line(result) == (
        "error: 401: the admin key was refused (wrong key?); "
        "pass --admin-key KEY or set CORRAL_ADMIN_KEY"
    )
    assert route.calls.last.request.headers["x-api-key"] == "nope"


@respx.mock
def test_flags_given_to_backends_reach_its_subcommand() -> None:
    """`corral backends --url U --admin-key K drain ID` uses U and K."""
    route = respx.patch(f"{API}/backends/gpu0").mock(
        return_value=httpx.Response(200, json=entry("gpu0", draining=True))
    )
    result = runner.invoke(
        app, ["backends", "--url", URL, "--admin-key", "k", "drain", "gpu0"], env={}
    )
    assert result.exit_code == 0, result.output
    assert route.calls.last.request.headers["x-api-key"] == "k"


@respx.mock
def test_not_a_corral_and_not_json() -> None:
    """A URL that is not a corral (a plain Ollama: 404 text; a web page: 200 HTML) gets one line
    that says so."""
    respx.get(f"{API}/strategy").mock(
        side_effect=[
            httpx.Response(404, text="404 page not found"),
            httpx.Response(200, text="<html>hello</html>"),
        ]
    )
    result = runner.invoke(app, ["strategy", "--url", URL])
    assert one_error_line(result) == (
        f"error: 404: {URL} has no /api/v1/loadbalancer/strategy: "
        "is it a corral (and a recent one)?"
    )
    result = runner.invoke(app, ["strategy", "--url", URL])
    assert one_error_line(result) == (
        f"error: {URL}/api/v1/loadbalancer/strategy did not answer JSON: is it a corral?"
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("localhost:11434", "the URL must start with http:// or https://"),
        ("http://[::1", "Invalid port"),
    ],
)
def test_malformed_url_is_one_line(url: str, why: str) -> None:
    """A URL httpx cannot use is reported like an unreachable corral, with the reason."""
    result = runner.invoke(app, ["status", "--url", url])
    line = one_error_line(result)
    assert line.startswith(f"error: cannot reach corral at {url}: ")
    assert why in line
