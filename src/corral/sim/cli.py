"""``corral sim`` / ``python -m corral.sim``: run a simulated Ollama server."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from corral.sim.config import (
    GB,
    GIB,
    Faults,
    SimConfig,
    SimModel,
    default_models,
    registry_models,
)


def parse_models(spec: str) -> list[SimModel]:
    """Models from a comma list: known names (defaults or the simulated registry, with or
    without ``:latest``) or ``name:size_gb`` for a made-up model of that size."""
    known = {**registry_models(), **{m.name: m for m in default_models()}}
    models: list[SimModel] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        for candidate in (item, f"{item}:latest"):
            if candidate in known:
                models.append(known[candidate])
                break
        else:
            name, _, size = item.rpartition(":")
            try:
                size_gb = float(size)
            except ValueError:
                raise typer.BadParameter(
                    f"unknown model {item!r}; known: {', '.join(sorted(known))} "
                    "(or give name:size_gb)"
                ) from None
            if not name:
                raise typer.BadParameter(f"model {item!r} has no name")
            models.append(SimModel(name if ":" in name else f"{name}:latest", int(size_gb * GB)))
    now = time.time()
    for i, model in enumerate(models):  # /api/tags lists them in the order given
        model.modified_at = now - i
    return models


def sim_command(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 11435,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    name: Annotated[str, typer.Option(help="Name reported in /_sim/stats.")] = "sim",
    ttft_ms: Annotated[float, typer.Option(help="Time to first token (ms).")] = 0.0,
    token_interval_ms: Annotated[float, typer.Option(help="Gap between tokens (ms).")] = 0.0,
    tokens: Annotated[int, typer.Option(help="Tokens per generation.")] = 16,
    load_ms: Annotated[float, typer.Option(help="Cold model load time (ms).")] = 0.0,
    load_gbps: Annotated[
        float, typer.Option(min=0, help="Load speed (GB/s): loads also take size / this.")
    ] = 0.0,
    prefill_tps: Annotated[
        float,
        typer.Option(min=0, help="Prompt tokens/s: TTFT also takes uncached tokens / this."),
    ] = 0.0,
    shared_compute: Annotated[
        bool,
        typer.Option(
            "--shared-compute",
            help="Models on the GPU share its compute: k generating at once each run k× slower.",
        ),
    ] = False,
    max_loaded_models: Annotated[
        int, typer.Option(min=0, help="Models loaded at once before one is evicted (0: no cap).")
    ] = 3,
    keep_alive_s: Annotated[float, typer.Option(help="Default keep_alive (s).")] = 300.0,
    num_parallel: Annotated[int, typer.Option(help="Parallel requests per model.")] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a load.")] = 512,
    vram_gb: Annotated[float, typer.Option(help="GPU memory budget (GiB).")] = 24.0,
    models: Annotated[
        str | None, typer.Option(help="Comma list of model names, or name:size_gb.")
    ] = None,
    error_rate: Annotated[float, typer.Option(help="Fraction of inference answered 500.")] = 0.0,
    hang: Annotated[bool, typer.Option("--hang", help="Never answer inference.")] = False,
    slow_ms: Annotated[float, typer.Option(help="Extra delay before the first byte.")] = 0.0,
    drop_after: Annotated[
        int | None, typer.Option(help="Abort the connection after N tokens.")
    ] = None,
    mid_stream_error_after: Annotated[
        int | None, typer.Option(help="Send Ollama's error line after N tokens.")
    ] = None,
    busy: Annotated[bool, typer.Option("--busy", help="Answer inference 503 busy.")] = False,
    check_host: Annotated[
        bool, typer.Option("--check-host", help="403 for Host headers Ollama rejects.")
    ] = False,
    gpu_name: Annotated[
        str, typer.Option(help="GPU model name in /_sim/dcgm (default: from --vram-gb).")
    ] = "",
    gpu_uuid: Annotated[
        str, typer.Option(help="GPU UUID in /_sim/dcgm (default: derived from --name).")
    ] = "",
    gpu_index: Annotated[int, typer.Option(min=0, help="GPU index in /_sim/dcgm.")] = 0,
    gpu_temp_c: Annotated[
        float | None, typer.Option(help="Report this GPU temperature (C) instead of the load's.")
    ] = None,
    gpu_util_pct: Annotated[
        float | None,
        typer.Option(min=0, max=100, help="Report this GPU utilization (%) instead of the load's."),
    ] = None,
    power_limit_w: Annotated[float, typer.Option(help="GPU power limit (W).")] = 350.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Run a simulated Ollama server (every Ollama route, timing, VRAM and faults)."""
    from corral.sim.server import serve  # uvicorn only when actually serving

    config = SimConfig(
        name=name,
        ttft_s=ttft_ms / 1000,
        token_interval_s=token_interval_ms / 1000,
        tokens=tokens,
        load_s=load_ms / 1000,
        load_gbps=load_gbps,
        prefill_tps=prefill_tps,
        shared_compute=shared_compute,
        max_loaded_models=max_loaded_models,
        keep_alive_s=keep_alive_s,
        num_parallel=num_parallel,
        max_queue=max_queue,
        vram_bytes=int(vram_gb * GIB),
        check_host=check_host,
        gpu_name=gpu_name,
        gpu_uuid=gpu_uuid,
        gpu_index=gpu_index,
        gpu_temp_c=gpu_temp_c,
        gpu_util_pct=gpu_util_pct,
        power_limit_w=power_limit_w,
        faults=Faults(
            error_rate=error_rate,
            hang=hang,
            slow_s=slow_ms / 1000,
            drop_after_tokens=drop_after,
            busy=busy,
            mid_stream_error_after=mid_stream_error_after,
        ),
    )
    if models is not None:
        config.models = parse_models(models)
    serve(config, host=host, port=port, log_level=log_level)
