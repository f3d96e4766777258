"""The corral CLI: check-config exit codes, client commands against the admin API (respx)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from typer.testing import CliRunner

from corral.cli.main import app
from corral.fleet.gpu import detect_local_gpus
from tests.fake_nvml import FakeNvml, h100_idle, l4_idle

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
            "gpu_stats": {
                "source": "nvml",
                "name": "NVIDIA H100 80GB HBM3",
                "utilization_ratio": 0.99,
                "memory_used_bytes": 1429012480,
                "memory_total_bytes": 85520809984,
                "temperature_c": 54,
                "hot": False,
            },
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
STATS = {
    "strategy": "least_connections",
    "backends": 2,
    "healthy": 1,
    "total_capacity": 4,
    "current_load": 1,
    "utilization": 0.25,
    "queued": 0,
    "retried": 0,
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


def test_check_config_tells_every_problem_at_once_one_line_each(tmp_path: Path) -> None:
    """A duplicate backend id is reported beside the other problems (not only once they are
    fixed), without a doubled "config:" prefix, and no line is broken at 80 columns."""
    bad = tmp_path / "bad.toml"
    unknown = "an_unknown_key_long_enough_to_make_this_line_wider_than_eighty_columns"
    bad.write_text(
        f'[balancer]\nstrategy = "nope"\n{unknown} = 1\n'
        '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'
        '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:2"\n'
    )
    result = runner.invoke(app, ["check-config", str(bad)], env={"COLUMNS": "80"})
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert all(line.startswith("config error: ") for line in lines), lines
    assert "config error: duplicate backend id 'a'" in lines
    assert f"config error: balancer.{unknown}: unknown key" in lines
    assert any(line.startswith("config error: balancer.strategy: unknown") for line in lines)


@respx.mock
def test_status_prints_the_load_table() -> None:
    """corral status shows each backend's state, in-flight/capacity and totals."""
    respx.get(f"{URL}/api/v1/loadbalancer/loads").mock(return_value=httpx.Response(200, json=LOADS))
    respx.get(f"{URL}/api/v1/loadbalancer/stats").mock(return_value=httpx.Response(200, json=STATS))
    result = runner.invoke(app, ["status", "--url", URL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "least_connections" in result.output
    row0 = next(line for line in result.output.splitlines() if "gpu0" in line)
    assert "up" in row0
    assert "1/4" in row0
    assert "42" in row0
    assert "H100 80GB HBM3" in row0
    assert "99%" in row0
    assert "1.3/79.6 GiB" in row0
    assert "54°C" in row0
    row1 = next(line for line in result.output.splitlines() if "gpu1" in line)
    assert "down" in row1


@respx.mock
def test_status_json_and_admin_key() -> None:
    """--json prints the API's loads with its stats added; CORRAL_ADMIN_KEY is sent as
    X-API-Key."""
    route = respx.get(f"{URL}/api/v1/loadbalancer/loads").mock(
        return_value=httpx.Response(200, json=LOADS)
    )
    respx.get(f"{URL}/api/v1/loadbalancer/stats").mock(return_value=httpx.Response(200, json=STATS))
    result = runner.invoke(
        app, ["status", "--json"], env={"CORRAL_URL": URL, "CORRAL_ADMIN_KEY": "k"}
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {**LOADS, "stats": STATS}
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


def _fake_detect(nvml: FakeNvml) -> Any:
    return lambda: detect_local_gpus(nvml)


def test_gpus_lists_this_hosts_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """`corral gpus`: one row per NVML GPU with memory, utilization, temperature and power."""
    monkeypatch.setattr(
        "corral.fleet.gpu.detect_local_gpus", _fake_detect(FakeNvml([h100_idle(), l4_idle()]))
    )
    result = runner.invoke(app, ["gpus"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    h100 = next(line for line in lines if "H100" in line)
    assert "0.5/79.6 GiB" in h100  # 503 MB used of 85.5 GB, as the real H100 read idle
    assert "36°C" in h100
    assert "112 W / 700 W" in h100
    assert h100_idle().uuid in h100
    assert any("NVIDIA L4" in line for line in lines)


def test_gpus_json_and_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """--json gives the readings; with no NVML the reason is printed and the exit code is 1."""
    monkeypatch.setattr("corral.fleet.gpu.detect_local_gpus", _fake_detect(FakeNvml()))
    result = runner.invoke(app, ["gpus", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["error"] is None
    assert data["gpus"][0]["memory_total_bytes"] == 85520809984
    monkeypatch.setattr("corral.fleet.gpu.detect_local_gpus", _fake_detect(FakeNvml(missing=True)))
    result = runner.invoke(app, ["gpus"])
    assert result.exit_code == 1
    assert "no GPU found: NVML is not available: NVML Shared Library Not Found" in result.output
    assert "--url http://HOST:11434" in result.output  # where to look instead
    result = runner.invoke(app, ["gpus", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["gpus"] == []


@respx.mock
def test_gpus_from_a_running_corral() -> None:
    """`corral gpus --url` shows the GPUs a corral reads, with the backends on each."""
    gpu = h100_idle()
    entry = {
        "index": 0,
        "name": gpu.name,
        "uuid": gpu.uuid,
        "memory_used_bytes": gpu.memory_used,
        "memory_total_bytes": gpu.memory_total,
        "utilization_ratio": 0.99,
        "temperature_c": 86,
        "power_w": 690.0,
        "power_limit_w": 700.0,
        "hot": True,
        "host": "",
        "backends": ["gpu0"],
    }
    respx.get(f"{URL}/api/v1/loadbalancer/gpus").mock(
        return_value=httpx.Response(200, json={"nvml": True, "gpus": [entry]})
    )
    result = runner.invoke(app, ["gpus", "--url", URL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "H100" in line)
    assert "99%" in row
    assert "86°C hot" in row
    assert "gpu0" in row


def test_demo_prints_each_command_whole_on_a_narrow_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a 40-column terminal the demo's commands still come out one per line, so that a
    copy and paste runs them (rich used to break them at the terminal's width)."""
    import io

    from rich.console import Console

    from corral.cli import demo

    out = io.StringIO()
    monkeypatch.setattr(demo, "console", Console(file=out, width=40, color_system=None))
    demo._banner("http://127.0.0.1:11434", 5001, 5002)
    lines = out.getvalue().splitlines()
    curl = next(line for line in lines if "curl http://127.0.0.1:11434/api/generate" in line)
    assert curl.endswith(""""Why is the sky blue?"}\'""")
    assert any(
        line.strip().startswith("OLLAMA_HOST=") and line.endswith('content)"') for line in lines
    )


def test_help_shows_no_type_for_flags() -> None:
    """`--help` of every command lists a flag without a value type (no `<bool>`), and an
    option that takes a value with its type."""
    commands = [["serve"], ["status"], ["backends", "add"], ["models"], ["gpus"], ["init"]]
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
        assert result.exit_code == 0, (command, result.output)
        assert "<bool>" not in result.output, command
    serve = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "160"}).output
    assert "<int>" in serve  # --port takes a value
