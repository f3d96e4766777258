"""corral models and corral place against the admin API (respx)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import respx
from typer.testing import CliRunner

from corral.cli.main import app

runner = CliRunner()
URL = "http://corral.test:11434"
GIB = 1024**3
MODELS = {
    "models": [
        {
            "name": "llama3.2:latest",
            "backends": {
                "gpu0": {
                    "installed": True,
                    "resident": "gpu",
                    "loading": False,
                    "size": 4 * GIB,
                    "size_vram": 4 * GIB,
                    "expires_at": "2318-01-01T00:00:00Z",
                },
                "gpu1": {
                    "installed": True,
                    "resident": "partial",
                    "loading": False,
                    "size": 4 * GIB,
                    "size_vram": GIB,
                    "expires_at": "2026-01-01T00:05:00Z",
                },
            },
        },
        {
            "name": "qwen2.5:7b",
            "backends": {
                "gpu0": {
                    "installed": True,
                    "resident": None,
                    "loading": False,
                    "size": 4683087332,
                    "size_vram": None,
                    "expires_at": None,
                },
                "gpu1": {
                    "installed": True,
                    "resident": "cpu",
                    "loading": False,
                    "size": 6 * GIB,
                    "size_vram": 0,
                    "expires_at": "2026-01-01T00:05:00Z",
                },
            },
        },
    ]
}
PLACE = f"{URL}/api/v1/loadbalancer/models/llama3.2/placement"


def answer(action: str, **results: dict[str, Any]) -> respx.Route:
    """The placement route, answering ``results`` per backend."""
    body = {"model": "llama3.2", "action": action, "results": results}
    return respx.post(PLACE).mock(return_value=httpx.Response(200, json=body))


def _row(output: str, *words: str) -> str:
    return next(line for line in output.splitlines() if all(w in line for w in words))


@respx.mock
def test_models_prints_where_each_model_runs_with_its_gpu_share() -> None:
    """One row per model and backend: installed, gpu/partial/cpu with the share on GPU, size
    and VRAM; a model not loaded shows dashes. --json prints the API's answer as is."""
    respx.get(f"{URL}/api/v1/loadbalancer/models").mock(
        return_value=httpx.Response(200, json=MODELS)
    )
    result = runner.invoke(app, ["models", "--url", URL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    full = _row(result.output, "llama3.2", "gpu0")
    assert "gpu" in full
    assert "100%" in full
    assert "4.0 GiB" in full
    partial = _row(result.output, "llama3.2", "gpu1")
    assert "partial" in partial
    assert "25%" in partial
    assert "1.0 GiB" in partial
    cpu = _row(result.output, "qwen2.5:7b", "gpu1")
    assert "cpu" in cpu
    assert "0%" in cpu
    idle = _row(result.output, "qwen2.5:7b", "gpu0")
    assert "yes" in idle
    assert "4.4 GiB" in idle
    assert "%" not in idle
    result = runner.invoke(app, ["models", "--json"], env={"CORRAL_URL": URL})
    assert json.loads(result.output) == MODELS


@respx.mock
def test_place_sends_the_action_and_prints_each_backend() -> None:
    """--gpu --backend gpu1 posts {"action": "gpu", "backend": "gpu1"} and says where the model
    runs now; exit 0 when every backend succeeded."""
    route = answer(
        "gpu", gpu1={"ok": True, "resident": "gpu", "size": 4 * GIB, "size_vram": 4 * GIB}
    )
    result = runner.invoke(app, ["place", "llama3.2", "--gpu", "--backend", "gpu1", "--url", URL])
    assert result.exit_code == 0, result.output
    assert json.loads(route.calls.last.request.content) == {"action": "gpu", "backend": "gpu1"}
    assert "gpu1: gpu ok; llama3.2 is on gpu" in result.output


@respx.mock
def test_place_exits_1_when_a_backend_failed() -> None:
    """One backend failing makes the exit status 1 and prints its error; --unload without
    --backend sends no backend."""
    route = answer(
        "unload",
        gpu0={"ok": True, "resident": None, "size": None, "size_vram": None},
        gpu1={"ok": False, "error": "gpu1: HTTP 500: boom"},
    )
    result = runner.invoke(app, ["place", "llama3.2", "--unload", "--url", URL])
    assert result.exit_code == 1
    assert json.loads(route.calls.last.request.content) == {"action": "unload"}
    assert "gpu0: unload ok; llama3.2 is not loaded" in result.output
    assert "gpu1: unload failed: gpu1: HTTP 500: boom" in result.output


@respx.mock
def test_place_needs_exactly_one_action_and_reports_api_errors() -> None:
    """No action flag or two give exit 2 without a request; a 404 from corral is one line."""
    route = respx.post(PLACE).mock(
        return_value=httpx.Response(
            404, json={"detail": "model 'llama3.2' is not installed on backend 'x'"}
        )
    )
    for flags in ([], ["--gpu", "--cpu"]):
        result = runner.invoke(app, ["place", "llama3.2", *flags, "--url", URL])
        assert result.exit_code == 2
        assert "exactly one of --gpu, --cpu, --preload, --unload" in result.output
    assert not route.called
    result = runner.invoke(app, ["place", "llama3.2", "--preload", "--backend", "x", "--url", URL])
    assert result.exit_code == 1
    assert "404: model 'llama3.2' is not installed on backend 'x'" in result.output


@respx.mock
def test_place_keeps_namespaced_model_names_in_the_path() -> None:
    """A model name with a namespace and tag goes into the path as it is."""
    route = respx.post(f"{URL}/api/v1/loadbalancer/models/user/m:7b/placement").mock(
        return_value=httpx.Response(
            200, json={"model": "user/m:7b", "action": "cpu", "results": {}}
        )
    )
    result = runner.invoke(app, ["place", "user/m:7b", "--cpu", "--json", "--url", URL])
    assert result.exit_code == 0, result.output
    assert route.called
    assert json.loads(result.output)["action"] == "cpu"


@respx.mock
def test_a_small_model_shows_its_size_in_mib() -> None:
    """An embedding model of 45 MB reads "43 MiB", not "0.0 GiB"; big ones stay in GiB; a
    loaded model shows its context length."""
    small = {
        "name": "all-minilm:latest",
        "backends": {
            "gpu0": {
                "installed": True,
                "resident": "gpu",
                "loading": False,
                "size": 45_000_000,
                "size_vram": 45_000_000,
                "expires_at": "2318-01-01T00:00:00Z",
                "context_length": 8192,
            }
        },
    }
    body = {"models": [*MODELS["models"], small]}
    respx.get(f"{URL}/api/v1/loadbalancer/models").mock(return_value=httpx.Response(200, json=body))
    result = runner.invoke(app, ["models", "--url", URL], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    row = _row(result.output, "all-minilm", "gpu0")
    assert row.count("43 MiB") == 2
    assert "0.0 GiB" not in row
    assert "8,192" in row  # the context length its runner was loaded with
    assert "4.0 GiB" in _row(result.output, "llama3.2", "gpu0")
