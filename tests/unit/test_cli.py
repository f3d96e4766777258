"""The corral CLI: check-config exit codes, client commands against the admin API (respx)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import respx
from typer.testing import CliRunner

from corral.cli import app

runner = CliRunner()
URL = "http://corral.test:11434"
LOADS = {
    "strategy": "least_connections",
    "count": 2,
    "loads": {
        "gpu0": {
            "instance_id": "gpu0",
            "url": "http://127.0.0.1:11435",
            "active_connections": 1,
            "max_concurrent": 4,
            "total_connections": 42,
            "failures": 0,
            "ttft_ewma_s": 0.05,
            "avg_response_time": 1.5,
            "weight": 1.0,
            "healthy": True,
            "draining": False,
            "ejected": False,
        },
        "gpu1": {
            "instance_id": "gpu1",
            "url": "http://127.0.0.1:11436",
            "active_connections": 0,
            "max_concurrent": 4,
            "total_connections": 7,
            "failures": 3,
            "ttft_ewma_s": None,
            "avg_response_time": None,
            "weight": 1.0,
            "healthy": False,
            "draining": False,
            "ejected": False,
        },
    },
}


def test_check_config_ok_and_bad(tmp_path: Path) -> None:
    """A valid file prints ok (exit 0); an invalid one exits 2 with one line per problem."""
    good = tmp_path / "good.toml"
    good.write_text('[[backends]]\nid = "gpu0"\nurl = "http://127.0.0.1:11435"\n')
    result = runner.invoke(app, ["check-config", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok: 1 backend(s)" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[balancer]\nstrategy = "nope"\n[[backends]]\nid = "a"\nurl = "x"\n')
    result = runner.invoke(app, ["check-config", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("config error:")]
    assert len(lines) == 2
    assert any("balancer.strategy" in line for line in lines)
    assert any("backends.0.url" in line for line in lines)


@respx.mock
def test_status_prints_the_load_table() -> None:
    """corral status shows each backend's state, in-flight/capacity and totals."""
    respx.get(f"{URL}/api/v1/loadbalancer/loads").mock(return_value=httpx.Response(200, json=LOADS))
    result = runner.invoke(app, ["status", "--url", URL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "least_connections" in result.output
    row0 = next(line for line in result.output.splitlines() if "gpu0" in line)
    assert "up" in row0
    assert "1/4" in row0
    assert "42" in row0
    row1 = next(line for line in result.output.splitlines() if "gpu1" in line)
    assert "down" in row1


@respx.mock
def test_status_json_and_admin_key() -> None:
    """--json prints the API's JSON; CORRAL_ADMIN_KEY is sent as X-API-Key."""
    route = respx.get(f"{URL}/api/v1/loadbalancer/loads").mock(
        return_value=httpx.Response(200, json=LOADS)
    )
    result = runner.invoke(
        app, ["status", "--json"], env={"CORRAL_URL": URL, "CORRAL_ADMIN_KEY": "k"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == LOADS
    assert route.calls.last.request.headers["x-api-key"] == "k"


@respx.mock
def test_strategy_show_and_switch() -> None:
    """corral strategy shows the current one; corral strategy NAME switches it."""
    respx.get(f"{URL}/api/v1/loadbalancer/strategy").mock(
        return_value=httpx.Response(200, json={"strategy": "round_robin"})
    )
    put = respx.put(f"{URL}/api/v1/loadbalancer/strategy").mock(
        return_value=httpx.Response(
            200, json={"strategy": "score", "message": "strategy changed from round_robin to score"}
        )
    )
    assert runner.invoke(app, ["strategy", "--url", URL]).output.strip() == "round_robin"
    result = runner.invoke(app, ["strategy", "score", "--url", URL])
    assert result.exit_code == 0
    assert "to score" in result.output
    assert json.loads(put.calls.last.request.content) == {"strategy": "score"}


@respx.mock
def test_client_errors_are_one_line() -> None:
    """A 400 from corral or an unreachable corral gives one clear line and exit 1."""
    respx.put(f"{URL}/api/v1/loadbalancer/strategy").mock(
        return_value=httpx.Response(400, json={"detail": "unknown strategy 'x'; known: a, b"})
    )
    result = runner.invoke(app, ["strategy", "x", "--url", URL])
    assert result.exit_code == 1
    assert "unknown strategy 'x'" in result.output
    respx.get(f"{URL}/api/v1/loadbalancer/loads").mock(side_effect=httpx.ConnectError("refused"))
    result = runner.invoke(app, ["status", "--url", URL])
    assert result.exit_code == 1
    assert "cannot reach corral" in result.output


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["sim", "--help"]])
def test_help(args: list[str]) -> None:
    """Every command documents itself."""
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "Usage" in result.output
