"""``corral gpus``: this host's GPUs through NVML, or with ``--url`` the ones a running
corral reads."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from corral.cli.client import API, KeyOpt, call
from corral.cli.render import JsonOpt, console, err, pct, temp, vram


def gpu_table(gpus: list[dict[str, Any]], title: str, *, wide: bool | None = None) -> Table:
    """The table ``corral gpus`` prints: one row per GPU (UUIDs only on wide terminals)."""
    if wide is None:
        wide = console.width >= 140
    table = Table(title=title, title_justify="left")
    table.add_column("gpu", justify="right", no_wrap=True)
    table.add_column("name")
    if wide:
        table.add_column("uuid", no_wrap=True)
    for col in ("util", "memory", "temp", "power"):
        table.add_column(col, justify="right", no_wrap=True)
    show_backends = any("backends" in g for g in gpus)
    if show_backends:
        table.add_column("backends", no_wrap=True)
    show_hosts = any(g.get("host") for g in gpus)
    if show_hosts:
        table.add_column("host", no_wrap=True)
    for g in gpus:
        power = g.get("power_w")
        limit = g.get("power_limit_w")
        power_text = "-" if power is None else f"{power:.0f} W"
        if power is not None and limit:
            power_text += f" / {limit:.0f} W"
        row = [
            str(g.get("index")) if (g.get("index") is not None and g["index"] >= 0) else "-",
            escape(g.get("name") or "-"),
            *([g.get("uuid") or "-"] if wide else []),
            pct(g.get("utilization_ratio")),
            vram(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
            temp(g.get("temperature_c"), bool(g.get("hot"))),
            power_text,
        ]
        if show_backends:
            row.append(", ".join(g.get("backends") or []) or "-")
        if show_hosts:
            row.append(g.get("host") or "local")
        table.add_row(*row)
    return table


def gpus(
    as_json: JsonOpt = False,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="Ask a running corral instead of this host's NVML.", show_default=False
        ),
    ] = None,
    admin_key: KeyOpt = None,
) -> None:
    """List this host's GPUs through NVML (or, with --url, the GPUs a running corral reads)."""
    if url is not None:
        data = call(url, admin_key, "GET", f"{API}/gpus")
        if as_json:
            print(json.dumps(data, indent=2))
            return
        if not data.get("gpus"):
            err.print("no GPU readings on that corral", markup=False)
            raise typer.Exit(1)
        console.print(gpu_table(data["gpus"], f"GPUs read by corral at {url}"))
        return
    from corral.fleet.gpu import detect_local_gpus

    found, reason = detect_local_gpus()
    if as_json:
        print(json.dumps({"gpus": [g.to_json() for g in found], "error": reason}, indent=2))
    elif reason is not None:
        err.print(f"no GPU found: {reason}", markup=False)
        err.print(
            "(this reads the GPUs of this host; for a running corral's view of its backends' "
            "GPUs, add --url http://HOST:11434)",
            markup=False,
        )
    else:
        console.print(gpu_table([g.to_json() for g in found], "GPUs on this host (NVML)"))
    if reason is not None:
        raise typer.Exit(1)
